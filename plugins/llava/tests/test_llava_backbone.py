"""The llava backbone: prompt and answer ids equal to the original LLaVA code's, generation equal
to the transformers model's, original-layout checkpoints, LLaVA-1.5 preprocessing, the tiny-model
command. The backbone contract itself is checked by test_llava_contract.py (the kit)."""

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone
from mllm_pib.tokenizer import train_llama_tokenizer
from mllm_pib_llava.tiny import write_tiny
from llava_original import load_original_llava

QUESTION = "Is there a cat in the image?"
# as the backbone sees them: a plain question, a POPE question with LLaVA's suffix, a description
QUESTIONS = [QUESTION, "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
             "Describe this image in detail."]
ANSWERS = ["Yes, there is a cat.", "No", "The image shows a red circle, a blue square and a green tree."]


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


def test_tiny_model_layout(tiny):
    backbone = get_backbone("llava").load(tiny)
    config = json.loads(open(f"{tiny}/config.json").read())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert backbone.prompt_ids(QUESTION).count(backbone.image_token_id) == 36  # 48 px / patch 8, CLS dropped
    tokenizer = backbone.tokenizer
    saved = json.loads(open(f"{tiny}/tokenizer_config.json").read())
    assert saved["tokenizer_class"] == "LlamaTokenizer" and saved["legacy"] is False  # as published
    # llava-hf appends <image> then <pad> to Vicuna's vocabulary
    assert [backbone.image_token_id, tokenizer.pad_token_id] == [len(tokenizer) - 2, len(tokenizer) - 1]
    assert backbone.stop_sequences == [[tokenizer.eos_token_id]]


# ------------------------------------------------------------------ ids against the original code


@pytest.fixture(scope="module")
def original():
    return load_original_llava()


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    """``{(layout, legacy): backbone}``: tiny llava-hf and original-layout models, each with a
    tokenizer of either ``legacy`` setting."""
    made = {}
    for legacy in (False, True):
        root = tmp_path_factory.mktemp(f"layouts-{legacy}")
        write_tiny(str(root / "hf"), seed=0, legacy=legacy)
        made["hf", legacy] = get_backbone("llava").load(str(root / "hf"))
        model_dir = write_original_layout(root, "safetensors", legacy=legacy)[0]
        made["original", legacy] = get_backbone("llava").load(str(model_dir))
    return made


def original_conversation(original, question, answer=None):
    """LLaVA's evaluation prompt (answer ``None``) or training conversation, vicuna_v1 template."""
    conv = original.conversation.conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], answer)
    return conv


def expanded(original, ids, backbone):
    """The original's ids with its image sentinel replaced by the backbone's image tokens."""
    out = []
    for token in ids:
        out += [backbone.image_token_id] * backbone.num_image_tokens if token == original.constants.IMAGE_TOKEN_INDEX else [token]
    return out


def original_answer_targets(original, tokenizer, conv):
    """The token ids LLaVA's training scores for a one-round conversation (``preprocess_v1``):
    the round without its ``</s>`` separator, minus the instruction up to ``ASSISTANT: `` (its
    length less 2: BOS and the trailing space), plus one position for ``</s>``."""
    tokenize = lambda text: original.mm_utils.tokenizer_image_token(text, tokenizer)  # noqa: E731
    text = conv.get_prompt()
    ids = tokenize(text)
    sep = conv.sep + conv.roles[1] + ": "
    round_text = text.split(conv.sep2)[0]
    instruction = round_text.split(sep)[0] + sep
    start = 1 + len(tokenize(instruction)) - 2
    end = 1 + len(tokenize(round_text))
    assert end == len(ids), "the original would drop this sample (tokenization mismatch)"
    return ids[start:end]


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy-false", "legacy-true"])
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_prompt_and_answer_ids_equal_the_original(original, both_layouts, layout, legacy):
    backbone = both_layouts[layout, legacy]
    tokenizer = backbone.tokenizer
    tokenize = original.mm_utils.tokenizer_image_token
    for question, answer in zip(QUESTIONS, ANSWERS):
        prompt = tokenize(original_conversation(original, question).get_prompt(), tokenizer)
        assert backbone.prompt_ids(question) == expanded(original, prompt, backbone)
        conv = original_conversation(original, question, answer)
        answer_ids = backbone.answer_ids(answer)
        assert answer_ids == original_answer_targets(original, tokenizer, conv)
        assert answer_ids[-1] == tokenizer.eos_token_id
        whole = tokenize(conv.get_prompt(), tokenizer)
        assert backbone.prompt_ids(question) + answer_ids == expanded(original, whole, backbone)
    # the token the issue is about: "▁" before the newline that follows the image
    ids = backbone.prompt_ids(QUESTION)
    after = ids[len(ids) - ids[::-1].index(backbone.image_token_id):][:2]
    assert tokenizer.convert_ids_to_tokens(after) == ["▁", "<0x0A>"]


@pytest.mark.parametrize("feature,width", [("clip", 32), ("projector", 64)])
def test_features_equal_transformers_image_features(tiny, feature, width):
    backbone = get_backbone("llava").load(tiny, feature=feature)
    pixels = backbone.preprocess([image()], [QUESTION])["pixel_values"]
    vision = backbone.encode_vision(pixel_values=pixels)
    config = backbone.model.config
    theirs = torch.stack(backbone.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output)
    assert vision.pib.shape == (1, 36, width) and backbone.pib_vision_size == width
    assert torch.allclose(vision.llm, theirs, atol=1e-6)
    if feature == "clip":  # the features the projector maps to transformers' image features
        assert torch.allclose(backbone.model.model.multi_modal_projector(vision.pib), theirs, atol=1e-6)
    else:
        assert torch.allclose(vision.pib, theirs, atol=1e-6)


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


def test_preprocessing_equals_the_original_process_images(tiny, original):
    """LLaVA-1.5's ``process_images`` with ``image_aspect_ratio='pad'`` (pad to a square with the
    mean colour, then CLIP's processor), on wide, tall and square pictures with detail."""
    import types

    backbone = get_backbone("llava").load(tiny)
    generator = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
                for h, w in ((20, 40), (64, 30), (48, 48))]
    expected = original.mm_utils.process_images(pictures, backbone.image_processor, types.SimpleNamespace(image_aspect_ratio="pad"))
    got = backbone.preprocess(pictures, [QUESTION] * 3)["pixel_values"]
    assert torch.equal(got, expected)
    stretched = backbone.image_processor(pictures[:1], return_tensors="pt").pixel_values
    assert not torch.equal(got[:1], stretched)


# ------------------------------------------------------------------ original (liuhaotian) layout


def write_original_layout(root, weights_format, legacy=False):
    """A tiny LLaVA-1.5 checkpoint as the original repository saves it, plus its CLIP tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(3)
    tower_dir, model_dir = root / "clip", root / "llava-v1.5-tiny"
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=48, patch_size=8))
    clip.save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(tower_dir)
    tokenizer = train_llama_tokenizer(vocab_size=400, legacy=legacy, pad_token=None)  # Vicuna's: no <image>, no pad
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
    # the fields of liuhaotian/llava-v1.5-7b's config.json (which has no mm_patch_merge_type)
    config = {**llama_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "freeze_mm_mlp_adapter": False,
              "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_padding_side": "right"}
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


# LLaVA-1.6 (llava-v1.6-vicuna-7b) settings that LLaVA-1.5 does not have
LLAVA_16 = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True,
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}


@pytest.mark.parametrize("change,message", [
    (LLAVA_16, r"image_aspect_ratio 'anyres' is LLaVA-1.6 \(LLaVA-NeXT\); the llava backbone runs LLaVA-1.5 only"),
    ({"mm_patch_merge_type": "spatial_unpad"}, r"mm_patch_merge_type 'spatial_unpad' is LLaVA-1.6"),
    ({"mm_use_im_start_end": True}, r"mm_use_im_start_end True is not LLaVA-1.5's False"),
    ({"mm_use_im_patch_token": None}, r"mm_use_im_patch_token True \(absent: the original's default\)"),
    ({"image_aspect_ratio": None}, r"image_aspect_ratio 'square' \(absent: the original's default\) is not LLaVA-1.5's 'pad'"),
    ({"image_aspect_ratio": "square"}, r"image_aspect_ratio 'square' is not LLaVA-1.5's 'pad'"),
], ids=["llava-1.6", "spatial-unpad", "im-start-end", "no-im-patch-setting", "no-aspect-setting", "square"])
def test_refuses_what_is_not_llava_15(tmp_path, change, message):
    from mllm_pib.errors import UserError

    model_dir, *_ = write_original_layout(tmp_path, "safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"config.json: {message}"):
        get_backbone("llava").load(str(model_dir))


def test_refuses_llava_16_image_newline_weight(tmp_path):
    from safetensors.torch import load_file
    from mllm_pib.errors import UserError

    model_dir, *_ = write_original_layout(tmp_path, "safetensors")
    weights = load_file(model_dir / "model.safetensors")
    save_file({**weights, "model.image_newline": torch.zeros(64)}, model_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"weight 'model.image_newline' is LLaVA-1.6 \(LLaVA-NeXT\)'s"):
        get_backbone("llava").load(str(model_dir))


def test_finetuned_vision_tower_in_the_checkpoint_is_used(tmp_path):
    """A checkpoint that holds its tower (``model.vision_tower.vision_tower.vision_model.*``, as
    the original saves a fine-tuned one, with the ``position_ids`` buffer of its day) runs with
    those weights, not the separate CLIP checkpoint's."""
    from safetensors.torch import load_file

    model_dir, _, state, clip, tokenizer = write_original_layout(tmp_path, "safetensors")
    tuned = copy.deepcopy(clip)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.05 * torch.randn_like(param))
    prefix = "model.vision_tower.vision_tower.vision_model."  # CLIPVisionModel's names in transformers 4
    tower = {prefix + k: v for k, v in tuned.state_dict().items()}
    tower[prefix + "embeddings.position_ids"] = torch.arange(37)[None]
    weights = load_file(model_dir / "model.safetensors")
    save_file({**weights, **tower}, model_dir / "model.safetensors")
    write_hf_layout(tmp_path / "hf", state, tuned, tokenizer)
    loaded = PIBModel(get_backbone("llava").load(str(model_dir)))
    native = PIBModel(get_backbone("llava").load(str(tmp_path / "hf")))
    ids, mask, inputs = hf_inputs(loaded.backbone, picture=image((50, 40)))
    assert torch.equal(loaded(ids, mask, inputs), native(ids, mask, inputs))
    patch = "embeddings.patch_embedding.weight"
    ours = loaded.backbone.model.model.vision_tower.state_dict()[patch]
    assert torch.equal(ours, tuned.state_dict()[patch]) and not torch.equal(ours, clip.state_dict()[patch])


def test_tiny_model_options_reach_write_tiny_only(tmp_path, capsys):
    out = tmp_path / "legacy"
    assert main(["tiny-model", "--backbone", "llava", "--option", "legacy=true", "--option", "vocab_size=700", str(out)]) == 2
    assert "has no option 'vocab_size'; its options are: feature, vision_tower; its tiny-model options: corpus, legacy, " \
           "tokenizer" in capsys.readouterr().err
    assert not out.exists()
    assert main(["tiny-model", "--backbone", "llava", "--option", "legacy=true", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is True  # YAML true, not the text
    with pytest.raises(UserError, match=r"'legacy' only shapes a tiny model when it is written"):
        get_backbone("llava").load(str(out), legacy=True)
