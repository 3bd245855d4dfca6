"""The llava backbone: contract equalities with the plain transformers model, original-layout
checkpoints, LLaVA-1.5 preprocessing, the tiny-model command."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone
from mllm_pib.tokenizer import train_tokenizer

QUESTION = "Is there a cat in the image?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava")
    assert main(["tiny-model", "--backbone", "llava", str(out)]) == 0
    return str(out)


def image(size=(48, 48), colour=(220, 40, 40)):
    return Image.new("RGB", size, colour)


def hf_inputs(backbone, question=QUESTION, picture=None):
    ids = torch.tensor([backbone.prompt_ids(question)])
    return ids, torch.ones_like(ids), backbone.preprocess([picture or image()], [question])


def test_tiny_model_layout_and_prompt(tiny):
    backbone = get_backbone("llava").load(tiny)
    config = json.loads(open(f"{tiny}/config.json").read())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    ids = backbone.prompt_ids(QUESTION)
    assert ids.count(backbone.image_token_id) == 36  # 48 px / patch 8, CLS dropped
    text = backbone.tokenizer.decode([i for i in ids if i != backbone.image_token_id])
    assert text.startswith("<s>A chat between a curious user") and text.endswith(f"USER: \n{QUESTION} ASSISTANT:")
    assert backbone.tokenizer.decode(backbone.answer_ids("Yes.")) == " Yes.</s>"


@pytest.mark.parametrize("feature,width", [("clip", 32), ("projector", 64)])
def test_feature_options(tiny, feature, width):
    backbone = get_backbone("llava").load(tiny, feature=feature)
    vision = backbone.encode_vision(**backbone.preprocess([image()], [QUESTION]))
    assert vision.pib.shape == (1, 36, width) and vision.llm.shape == (1, 36, 64)
    assert backbone.pib_vision_size == width
    if feature == "projector":
        assert torch.equal(vision.pib, vision.llm)


def test_contract_pieces_equal_plain_model_logits(tiny):
    backbone = get_backbone("llava").load(tiny)
    ids, mask, inputs = hf_inputs(backbone)
    out = backbone.lm_forward(backbone.embed(ids), backbone.encode_vision(**inputs), mask, image_mask=ids == backbone.image_token_id)
    expected = backbone.model(input_ids=ids, attention_mask=mask, **inputs).logits
    assert torch.allclose(backbone.lm_head(out.hidden), expected, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_identity_pib_generation_equals_transformers_generate(tiny, num_beams):
    model = load_model(tiny, backbone="llava")
    bb = model.backbone
    for question, picture in ((QUESTION, image()), ("Describe this image in detail.", image((60, 30), (10, 200, 90)))):
        ids, mask, inputs = hf_inputs(bb, question, picture)
        ours = model.generate(ids, mask, inputs, max_new_tokens=10, num_beams=num_beams)
        theirs = bb.model.generate(input_ids=ids, attention_mask=mask, **inputs, max_new_tokens=10,
                                   num_beams=num_beams, do_sample=False)[:, ids.shape[1]:]
        assert ours[0].tolist() == theirs[0, : ours.shape[1]].tolist()


def test_pad_to_square_with_mean_colour(tiny):
    backbone = get_backbone("llava").load(tiny)
    wide = image((40, 20), (0, 0, 255))
    mean = tuple(int(255 * m) for m in backbone.image_processor.image_mean)
    square = Image.new("RGB", (40, 40), mean)
    square.paste(wide, (0, 10))
    got = backbone.preprocess([wide], [QUESTION])["pixel_values"]
    expected = backbone.image_processor([square], return_tensors="pt").pixel_values
    assert torch.equal(got, expected)
    stretched = backbone.image_processor([wide], return_tensors="pt").pixel_values
    assert not torch.equal(got, stretched)


# ------------------------------------------------------------------ original (liuhaotian) layout


def write_original_layout(root, weights_format):
    """A tiny LLaVA-1.5 checkpoint as the original repository saves it, plus its CLIP tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(3)
    tower_dir, model_dir = root / "clip", root / "llava-v1.5-tiny"
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=48, patch_size=8))
    clip.save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(tower_dir)
    tokenizer = train_tokenizer(vocab_size=400)  # no <image> token, as in the original
    llama_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    llama = LlamaForCausalLM(llama_config)
    state = dict(llama.state_dict())
    state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"] = torch.randn(64, 32) * 0.1, torch.randn(64) * 0.1
    state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"] = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    model_dir.mkdir()
    if weights_format == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, model_dir / "model.safetensors")
    else:
        torch.save(state, model_dir / "pytorch_model.bin")
    config = {**llama_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(model_dir)
    return model_dir, tower_dir, state, clip, tokenizer


def write_hf_layout(out, state, clip, tokenizer):
    """The same weights in the llava-hf layout, mapped here independently of the plugin."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vocab = len(tokenizer)
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=clip.config, text_config=text, image_token_index=vocab - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)
    mapped = {"model.vision_tower." + k: v for k, v in clip.state_dict().items()}
    for key, value in state.items():
        if key.startswith("model.mm_projector."):
            index = key.split(".")[2]
            mapped[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{key.split('.')[-1]}"] = value
        elif key.startswith("lm_head."):
            mapped[key] = value
        else:
            mapped["model.language_model." + key[len("model."):]] = value
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        mapped[key] = torch.cat([mapped[key], torch.zeros(1, 64)])
    model.load_state_dict(mapped, strict=True)
    model.save_pretrained(out)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 48},
                               crop_size={"height": 48, "width": 48}), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(out)


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_original_layout_loads_to_identical_logits(tmp_path, weights_format):
    model_dir, _, state, clip, tokenizer = write_original_layout(tmp_path, weights_format)
    write_hf_layout(tmp_path / "hf", state, clip, tokenizer)
    original = PIBModel(get_backbone("llava").load(str(model_dir)))
    native = PIBModel(get_backbone("llava").load(str(tmp_path / "hf")))
    assert original.backbone.prompt_ids(QUESTION) == native.backbone.prompt_ids(QUESTION)
    ids, mask, inputs = hf_inputs(original.backbone, picture=image((50, 40)))
    assert torch.equal(original(ids, mask, inputs), native(ids, mask, inputs))


def test_original_layout_errors(tmp_path):
    from mllm_pib.errors import UserError

    model_dir, tower_dir, *_ = write_original_layout(tmp_path, "safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(UserError, match="vision_tower=DIR"):
        get_backbone("llava").load(str(model_dir))
    assert get_backbone("llava").load(str(model_dir), vision_tower=str(tower_dir)).hidden_size == 64
    (model_dir / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(UserError, match="mlp2x_gelu"):
        get_backbone("llava").load(str(model_dir))
    with pytest.raises(UserError, match="no config.json"):
        get_backbone("llava").load(str(tmp_path / "nowhere"))
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown llava feature"):
        get_backbone("llava").load(str(model_dir), feature="qformer")
    from safetensors.torch import load_file

    weights = load_file(model_dir / "model.safetensors")
    del weights["model.mm_projector.2.bias"]
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(UserError, match="multi_modal_projector.linear_2.bias"):
        get_backbone("llava").load(str(model_dir))
