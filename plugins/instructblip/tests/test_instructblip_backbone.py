"""InstructBLIP backbone: the contract pieces on processor inputs and generation against the plain
transformers model, the LAVIS layout against the transformers one, the processor, and loading
errors. The backbone contract itself is checked by test_instructblip_contract.py (the kit)."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

from mllm_pib.checkpoint import load_model
from mllm_pib.errors import UserError
from mllm_pib_instructblip.backbone import InstructBlipBackbone, load
from mllm_pib.tokenizer import DEFAULT_CORPUS
from mllm_pib_instructblip.tiny import tiny_config, tiny_processor, write_tiny

QUESTIONS = ["Is there a dog next to the bench in the image?", "Describe this image in detail."]
ANSWERS = ["Yes, there is.", "A red circle."]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructblip") / "tiny"
    write_tiny(str(path), seed=0)
    return path


@pytest.fixture(scope="module")
def backbone(tiny_dir):
    return load(str(tiny_dir))


@pytest.fixture(scope="module")
def native_lavis_eps(tiny_dir):
    """The transformers-layout model with LAVIS's ``ln_vision`` epsilon: what a LAVIS checkpoint of
    the same weights must give."""
    bb = load(str(tiny_dir))
    bb.model.vision_model.post_layernorm.eps = 1e-5
    return bb


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return InstructBlipForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return InstructBlipProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)) for _ in QUESTIONS]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def contract_logits(backbone, ids, mask, vision_inputs):
    with torch.no_grad():
        vision = backbone.encode_vision(**vision_inputs)
        out = backbone.lm_forward(backbone.embed(ids), vision, mask, image_mask=ids == backbone.image_token_id)
        return backbone.lm_head(out.hidden)


def plain_logits(model, vision_inputs, ids, mask, **kwargs):
    with torch.no_grad():
        return model(**vision_inputs, input_ids=ids, attention_mask=mask, **kwargs).logits


# --- LAVIS layout, written by inverting the mapping independently of the loader -------------------

LAVIS_VISION_TOP = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "ln_vision.weight",
    "vision_model.post_layernorm.bias": "ln_vision.bias",
    "query_tokens": "query_tokens",
}
LAVIS_BLOCK_MODULES = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def to_lavis(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers InstructBLIP state dict in ``blip2_vicuna_instruct`` naming."""
    out = {}
    for key, value in hf_state.items():
        block = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in LAVIS_VISION_TOP:
            out[LAVIS_VISION_TOP[key]] = value
        elif block and block.group(2) == "self_attn.qkv" and block.group(3) == "bias":
            width = value.shape[0] // 3
            assert torch.all(value[width : 2 * width] == 0), "EVA-ViT has no key bias"
            out[f"visual_encoder.blocks.{block.group(1)}.attn.q_bias"] = value[:width]
            out[f"visual_encoder.blocks.{block.group(1)}.attn.v_bias"] = value[2 * width :]
        elif block:
            module = LAVIS_BLOCK_MODULES[block.group(2)]
            out[f"visual_encoder.blocks.{block.group(1)}.{module}.{block.group(3)}"] = value
        elif key.startswith("qformer."):
            name = key.removeprefix("qformer.").replace("embeddings.layernorm.", "embeddings.LayerNorm.")
            name = re.sub(r"\b(attention|crossattention)\.attention\.", r"\1.self.", name)
            out[f"Qformer.bert.{name}"] = value
        elif key.startswith("language_projection."):
            out["llm_proj." + key.removeprefix("language_projection.")] = value
        elif key.startswith("language_model."):
            out["llm_model." + key.removeprefix("language_model.")] = value
        else:
            raise KeyError(key)
    # BERT checkpoints of that time saved the position-id buffer too
    positions = hf_state["qformer.embeddings.position_embeddings.weight"].shape[0]
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def test_contract_matches_plain_model(backbone, plain, processor, images):
    inputs = processor(images=images[:1], text=QUESTIONS[:1], return_tensors="pt")
    vision_inputs = {k: inputs[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    ours = contract_logits(backbone, inputs.input_ids, inputs.attention_mask, vision_inputs)
    theirs = plain_logits(plain, vision_inputs, inputs.input_ids, inputs.attention_mask)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("feature", ["vit", "qformer"])
def test_vision_features(tiny_dir, plain, images, feature):
    bb = load(str(tiny_dir), feature=feature)
    inputs = bb.preprocess(images, QUESTIONS)
    with torch.no_grad():
        feats = bb.encode_vision(**inputs)
        image_embeds = plain.vision_model(inputs["pixel_values"]).last_hidden_state
        queries = plain.query_tokens.expand(len(images), -1, -1)
        qmask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), inputs["qformer_attention_mask"]], 1)
        query_out = plain.qformer(
            input_ids=inputs["qformer_input_ids"], attention_mask=qmask, query_embeds=queries,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state[:, : queries.shape[1]]
        projected = plain.language_projection(query_out)
    config = plain.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    expected_pib = image_embeds if feature == "vit" else query_out
    width = config.vision_config.hidden_size if feature == "vit" else config.qformer_config.hidden_size
    assert feats.pib.shape == (2, patches + 1 if feature == "vit" else config.num_query_tokens, width)
    assert feats.llm.shape == (2, config.num_query_tokens, config.text_config.hidden_size)
    assert bb.pib_vision_size == width and bb.hidden_size == config.text_config.hidden_size
    assert feats.pib_mask is None
    torch.testing.assert_close(feats.pib, expected_pib, atol=ATOL, rtol=0)
    torch.testing.assert_close(feats.llm, projected, atol=ATOL, rtol=0)


def until_end(row: list[int], end: int) -> list[int]:
    return row[: row.index(end) + 1] if end in row else row


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_transformers_generate(tiny_dir, plain, processor, images, num_beams):
    """A batch of two prompts of different lengths (left padded by the processor) generated by
    ``InstructBlipForConditionalGeneration.generate`` and by the identity PIB model. The Q-Former
    text is padded on the right, as LAVIS's BERT tokenizer does (the processor pads it on the left,
    which shifts the Q-Former's absolute positions and changes the visual tokens)."""
    model = load_model(str(tiny_dir), backbone="instructblip", pib=None)
    tokenizer = processor.tokenizer
    inputs = processor(images=images, text=QUESTIONS, padding=True, return_tensors="pt")
    assert (inputs.attention_mask == 0).any() and tokenizer.padding_side == "left"
    lavis_qformer = processor.qformer_tokenizer(QUESTIONS, padding="longest", padding_side="right", return_tensors="pt")
    assert (lavis_qformer.attention_mask[:, -1] == 0).any()
    inputs.update(qformer_input_ids=lavis_qformer.input_ids, qformer_attention_mask=lavis_qformer.attention_mask)
    with torch.no_grad():
        theirs = plain.generate(
            **inputs, max_new_tokens=12, num_beams=num_beams, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[:, inputs.input_ids.shape[1]:]
        batch = model.prompt_batch(images, QUESTIONS)
        ours = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"],
                              max_new_tokens=12, num_beams=num_beams)
    eos = tokenizer.eos_token_id
    assert [until_end(row, eos) for row in ours.tolist()] == [until_end(row, eos) for row in theirs.tolist()]
    assert ours.shape[1] > 1


def test_processor_round_trip(backbone, processor, images):
    for image, question in zip(images, QUESTIONS):
        inputs = processor(images=[image], text=[question], return_tensors="pt")
        prompt = backbone.prompt_ids(question)
        assert prompt == inputs.input_ids[0].tolist()
        assert prompt.count(backbone.image_token_id) == processor.num_query_tokens == backbone.num_image_tokens
        ours = backbone.preprocess([image], [question])
        for key in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"):
            torch.testing.assert_close(ours[key], inputs[key], atol=0, rtol=0)


PROMPTS = QUESTIONS + [
    "What is in the picture?\nAnswer the question using a single word or phrase.",
    "  Is there a   dog next to the bench? ",
]
TARGETS = ANSWERS + ["No", "There is a dog.\n", " two people sitting"]


def lavis_ids(tokenizer, question: str, answer: str, num_queries: int, image_token_id: int):
    """``blip2_vicuna_instruct.forward``'s LLM input: the query embeddings (placeholders here),
    ``llm_tokenizer(text_input)`` (its BOS is ``</s>``), then ``llm_tokenizer(text_output + eos)``
    without its first token (``output_ids[i][1:]``), which is the part scored."""
    prompt = tokenizer(question).input_ids
    target = tokenizer(answer + tokenizer.eos_token).input_ids[1:]
    return [image_token_id] * num_queries + prompt, target


@pytest.mark.parametrize("legacy", [False, True])
def test_prompt_and_answer_ids_are_lavis(legacy):
    processor = tiny_processor([DEFAULT_CORPUS], image_size=32, num_query_tokens=6, legacy=legacy)
    bb = InstructBlipBackbone(InstructBlipForConditionalGeneration(tiny_config(processor)), processor)
    tokenizer = bb.tokenizer
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    for question, answer in zip(PROMPTS, TARGETS):
        prompt, target = lavis_ids(tokenizer, question, answer, bb.num_image_tokens, bb.image_token_id)
        assert bb.prompt_ids(question) == prompt, question
        assert bb.answer_ids(answer) == target, answer
        assert prompt[bb.num_image_tokens] == tokenizer.eos_token_id and target[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(bb.answer_ids("Yes"))[0] == "▁Yes"


def test_named_image_token_string_is_accepted(tiny_dir, images, tmp_path):
    copy = tmp_path / "named"
    shutil.copytree(tiny_dir, copy)
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["extra_special_tokens"] = {"image_token": "<image>"}  # the tokenizer then has a str attribute
    config_file.write_text(json.dumps(config))
    bb = load(str(copy))
    assert isinstance(bb.tokenizer.image_token, str)
    inputs = bb.processor(images=images[:1], text=QUESTIONS[:1])
    assert inputs["input_ids"][0] == bb.prompt_ids(QUESTIONS[0])


def test_wrong_image_token_count_is_detected(backbone, images):
    prompt = backbone.prompt_ids(QUESTIONS[0])[1:]  # one query token short
    ids = torch.tensor([prompt])
    vision = backbone.encode_vision(**backbone.preprocess(images[:1], QUESTIONS[:1]))
    with pytest.raises(ValueError, match="placeholder"):
        backbone.lm_forward(
            backbone.embed(ids), vision, torch.ones_like(ids), image_mask=ids == backbone.image_token_id
        )


def test_query_tokens_belong_to_the_qformer_part(backbone):
    qformer = backbone.parts()["qformer"]
    assert any(param is backbone.model.query_tokens for param in qformer.parameters())


def _batch(backbone, images):
    rows = [backbone.prompt_ids(q) + backbone.answer_ids(a) for q, a in zip(QUESTIONS, ANSWERS)]
    ids, mask = left_pad(rows, backbone.pad_token_id)
    return ids, mask, backbone.preprocess(images, QUESTIONS)


def test_lavis_full_checkpoint_matches_native(backbone, native_lavis_eps, tiny_dir, images, tmp_path):
    path = tmp_path / "instruct_blip_tiny.pth"
    torch.save({"model": to_lavis(backbone.model.state_dict()), "epoch": 1}, path)
    lavis = load(str(path), config_path=str(tiny_dir))
    native_state = backbone.model.state_dict()
    lavis_state = lavis.model.state_dict()
    assert lavis_state.keys() == native_state.keys()
    for key, value in native_state.items():
        assert torch.equal(lavis_state[key], value), key
    ids, mask, vision_inputs = _batch(backbone, images)
    torch.testing.assert_close(
        contract_logits(lavis, ids, mask, vision_inputs), contract_logits(native_lavis_eps, ids, mask, vision_inputs),
        atol=0, rtol=0,
    )


def test_lavis_checkpoint_uses_lavis_ln_vision_eps(backbone, plain, tiny_dir, images, tmp_path):
    """LAVIS's ``ln_vision`` is ``LayerNorm(1408)`` with PyTorch's default epsilon 1e-5 (transformers
    uses the ViT's 1e-6); the epsilon survives ``save_pretrained``."""
    path = tmp_path / "instruct_blip_tiny.pth"
    torch.save({"model": to_lavis(backbone.model.state_dict())}, path)
    lavis = load(str(path), config_path=str(tiny_dir))
    inputs = lavis.preprocess(images, QUESTIONS)
    with torch.no_grad():
        features = lavis.encode_vision(**inputs).pib
        before_norm = plain.vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1]
        norm = plain.vision_model.post_layernorm
        lavis_norm = torch.nn.functional.layer_norm(before_norm, norm.normalized_shape, norm.weight, norm.bias, 1e-5)
        transformers_norm = torch.nn.functional.layer_norm(
            before_norm, norm.normalized_shape, norm.weight, norm.bias, 1e-6
        )
    assert torch.equal(features, lavis_norm)
    assert not torch.equal(features, transformers_norm)
    lavis.save_pretrained(str(tmp_path / "saved"))
    again = load(str(tmp_path / "saved"))
    assert again.model.vision_model.post_layernorm.eps == 1e-5
    assert backbone.model.vision_model.post_layernorm.eps == 1e-6  # a transformers directory keeps its own


def test_lavis_trimmed_checkpoint_with_vit_and_llm_files(backbone, native_lavis_eps, tiny_dir, images, tmp_path):
    lavis_state = to_lavis(backbone.model.state_dict())
    trimmed = {k: v for k, v in lavis_state.items() if not k.startswith(("visual_encoder.", "llm_model."))}
    torch.save(trimmed, tmp_path / "trimmed.pth")
    # eva_vit_g.pth: unprefixed keys, one block more than InstructBLIP uses, plus a head
    vit = {k.removeprefix("visual_encoder."): v for k, v in lavis_state.items() if k.startswith("visual_encoder.")}
    layers = backbone.model.config.vision_config.num_hidden_layers
    extra = {k.replace("blocks.0.", f"blocks.{layers}."): v + 1 for k, v in vit.items() if k.startswith("blocks.0.")}
    torch.save({**vit, **extra, "head.weight": torch.ones(3, 3)}, tmp_path / "eva_vit_g.pth")
    backbone.model.language_model.save_pretrained(tmp_path / "vicuna")
    lavis = load(
        str(tmp_path / "trimmed.pth"), config_path=str(tiny_dir),
        vit_path=str(tmp_path / "eva_vit_g.pth"), llm_path=str(tmp_path / "vicuna"),
    )
    ids, mask, vision_inputs = _batch(backbone, images)
    torch.testing.assert_close(
        contract_logits(lavis, ids, mask, vision_inputs), contract_logits(native_lavis_eps, ids, mask, vision_inputs),
        atol=0, rtol=0,
    )


def test_llm_with_smaller_vocabulary_gets_mean_rows(backbone, native_lavis_eps, tiny_dir, images, tmp_path):
    lavis_state = to_lavis(backbone.model.state_dict())
    torch.save({k: v for k, v in lavis_state.items() if not k.startswith("llm_model.")}, tmp_path / "ckpt.pth")
    llm = {k: v.clone() for k, v in backbone.model.language_model.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[key] = llm[key][:-1].contiguous()  # the LLM file lacks the last token
    (tmp_path / "vicuna").mkdir()
    save_file(llm, tmp_path / "vicuna" / "model.safetensors")
    lavis = load(str(tmp_path / "ckpt.pth"), config_path=str(tiny_dir), llm_path=str(tmp_path / "vicuna"))
    for module in (lavis.model.language_model.model.embed_tokens, lavis.model.language_model.lm_head):
        torch.testing.assert_close(module.weight[-1], module.weight[:-1].mean(0))
    ids, mask, vision_inputs = _batch(backbone, images)
    # the missing row is the image token's, whose input embedding the visual tokens replace
    assert len(backbone.tokenizer) - 1 == backbone.image_token_id
    torch.testing.assert_close(
        contract_logits(lavis, ids, mask, vision_inputs)[..., :-1],
        contract_logits(native_lavis_eps, ids, mask, vision_inputs)[..., :-1], atol=0, rtol=0,
    )


def test_lavis_errors(backbone, tiny_dir, tmp_path):
    lavis_state = to_lavis(backbone.model.state_dict())
    full = tmp_path / "full.pth"
    torch.save(lavis_state, full)
    with pytest.raises(UserError, match="config_path"):
        load(str(full))
    no_vit = tmp_path / "no_vit.pth"
    torch.save({k: v for k, v in lavis_state.items() if not k.startswith("visual_encoder.")}, no_vit)
    with pytest.raises(UserError, match=r"no_vit\.pth.*vit_path"):
        load(str(no_vit), config_path=str(tiny_dir))
    opt = tmp_path / "opt.pth"
    torch.save({**lavis_state, "opt_proj.weight": torch.zeros(2, 2)}, opt)
    with pytest.raises(UserError, match=r"opt\.pth.*OPT"):
        load(str(opt), config_path=str(tiny_dir))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": lavis_state, "args": argparse.Namespace(lr=1e-5)}, pickled)
    with pytest.raises(UserError, match=r"pickled\.pth.*weights_only"):
        load(str(pickled), config_path=str(tiny_dir))


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "absent"))):
        load(str(tmp_path / "absent"))
    with pytest.raises(UserError, match=r"'clip'.*vit, qformer"):
        load(str(tiny_dir), feature="clip")
    with pytest.raises(UserError, match="config.json"):
        load(str(tmp_path))
    with pytest.raises(UserError, match="only apply to LAVIS"):
        load(str(tiny_dir), llm_path=str(tmp_path))
