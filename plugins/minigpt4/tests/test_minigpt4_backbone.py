"""MiniGPT-4 backbone: the decoder input against MiniGPT-4's, features, persistence, assembly from
the published pieces. The backbone contract itself is checked by test_minigpt4_contract.py (the kit)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

import minigpt4_reference as original
from mllm_pib.errors import UserError
from mllm_pib.plugins import get_backbone
from mllm_pib.tokenizer import train_llama_tokenizer
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from mllm_pib_minigpt4.backbone import load
from mllm_pib_minigpt4.configuration import MiniGPT4Config
from mllm_pib_minigpt4.modeling import MiniGPT4ForConditionalGeneration
from mllm_pib_minigpt4.tiny import (
    jitter_,
    tiny_qformer_config,
    tiny_text_config,
    tiny_vision_config,
    write_tiny,
)

VARIANTS = ("v1", "llama2")
QUESTIONS = ("Is there a cat in the image?", "Describe this image in detail.")
ANSWERS = ("Yes, there is.", "The image shows a red circle and a blue square next to a tree.")
ATOL = 1e-5


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def contract_logits(backbone, inputs, ids, mask) -> torch.Tensor:
    vision = backbone.encode_vision(**inputs)
    out = backbone.lm_forward(backbone.embed(ids), vision, mask, image_mask=ids == backbone.image_token_id)
    return backbone.lm_head(out.hidden)


def batch(backbone, n: int = 2):
    """Two prompts + answers of different lengths, left padded, with their images."""
    rows = [backbone.prompt_ids(q) + backbone.answer_ids(a) for q, a in zip(QUESTIONS[:n], ANSWERS[:n])]
    ids, mask = left_padded(rows, backbone.pad_token_id)
    return backbone.preprocess(images(n), list(QUESTIONS[:n])), ids, mask


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4")
    for variant in VARIANTS:
        write_tiny(root / variant, seed=0, variant=variant)
    return {variant: root / variant for variant in VARIANTS}


@pytest.fixture(scope="module")
def backbones(tiny_dirs):
    return {variant: load(path) for variant, path in tiny_dirs.items()}


# --- the decoder input equals MiniGPT-4's segment concatenation ----------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_placeholders_equal_minigpt4_segment_concatenation(backbones, variant):
    """MiniGPT-4 concatenates [embed(before), visual tokens, embed(after)]; the expanded
    placeholders must give the decoder the same input."""
    backbone = backbones[variant]
    ids = backbone.prompt_ids(QUESTIONS[0])
    first = ids.index(backbone.image_token_id)
    last = first + backbone.num_image_tokens
    assert ids[first:last] == [backbone.image_token_id] * backbone.num_image_tokens
    assert backbone.image_token_id not in ids[:first] + ids[last:]
    pixels = backbone.preprocess(images(1), [QUESTIONS[0]])["pixel_values"]
    with torch.no_grad():
        visual = backbone.model.get_image_features(pixels).projected
        embed = backbone.model.get_input_embeddings()
        pieces = [embed(torch.tensor([ids[:first]])), visual, embed(torch.tensor([ids[last:]]))]
        expected = backbone.model.language_model(inputs_embeds=torch.cat(pieces, dim=1)).logits
        tensor = torch.tensor([ids])
        ours = contract_logits(backbone, {"pixel_values": pixels}, tensor, torch.ones_like(tensor))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


# --- vision features ----------------------------------------------------------------------------

FEATURES = [("v1", "vit"), ("v1", "qformer"), ("v1", "projected"), ("llama2", "vit"), ("llama2", "projected")]


@pytest.mark.parametrize(("variant", "feature"), FEATURES)
def test_features_equal_blip2_run_directly(tiny_dirs, variant, feature):
    backbone = load(tiny_dirs[variant], feature=feature)
    inputs = backbone.preprocess(images(3), list(QUESTIONS[:1]) * 3)
    with torch.no_grad():
        vision = backbone.encode_vision(**inputs)
        expected = original.image_embeddings(backbone.model, inputs["pixel_values"])
    config = backbone.model.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    tokens = config.num_query_tokens if variant == "v1" else patches // 4
    widths = {"vit": config.vision_config.hidden_size, "projected": backbone.hidden_size,
              "qformer": config.qformer_config.hidden_size if config.qformer_config else None}
    counts = {"vit": patches + 1, "qformer": config.num_query_tokens, "projected": tokens}
    assert vision.pib.shape == (3, counts[feature], widths[feature]) and backbone.pib_vision_size == widths[feature]
    assert vision.llm.shape == (3, tokens, backbone.hidden_size) and backbone.num_image_tokens == tokens
    torch.testing.assert_close(vision.pib, expected[feature], atol=1e-6, rtol=0)
    torch.testing.assert_close(vision.llm, expected["projected"], atol=1e-6, rtol=0)
    assert (vision.llm[0] - vision.llm[1]).abs().max() > 1e-3, "the visual tokens must depend on the image"


def test_ln_vision_uses_minigpt4_epsilon(backbones):
    """MiniGPT-4's ``ln_vision`` is ``LayerNorm(1408)``: epsilon 1e-5, not the ViT blocks' 1e-6."""
    for backbone in backbones.values():
        vision = backbone.model.vision_model
        assert vision.post_layernorm.eps == 1e-5
        assert {layer.layer_norm1.eps for layer in vision.encoder.layers} == {1e-6}


def test_train_mode_changes_nothing(backbones):
    """MiniGPT-4 never trains with dropout in its frozen vision side (Q-Former included)."""
    backbone = backbones["v1"]
    inputs, ids, mask = batch(backbone)
    with torch.no_grad():
        reference = contract_logits(backbone, inputs, ids, mask)
        backbone.train()
        try:
            again = contract_logits(backbone, inputs, ids, mask)
        finally:
            backbone.eval()
    torch.testing.assert_close(again, reference, atol=0, rtol=0)


def test_parts(backbones):
    v1, llama2 = backbones["v1"], backbones["llama2"]
    assert set(v1.parts()) == {"vision", "qformer", "projector", "llm", "lm_head"}
    assert set(llama2.parts()) == {"vision", "projector", "llm", "lm_head"}
    qformer = dict(v1.parts()["qformer"].named_parameters())
    assert qformer["query_tokens"] is v1.model.query_tokens
    assert v1.parts()["lm_head"] is v1.model.language_model.lm_head
    assert not v1.training and not v1.model.training


# --- persistence ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(backbones, tmp_path, variant):
    backbone = backbones[variant]
    target = tmp_path / "saved"
    target.mkdir()
    (target / "stale.txt").write_text("replaced by the save")
    backbone.save_pretrained(str(target))
    again = load(target, feature="projected")
    assert not (target / "stale.txt").exists()
    assert again.model.config.variant == variant and again.feature == "projected"
    ours, theirs = backbone.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=0, rtol=0)


def test_registered_through_the_entry_point():
    (entry,) = [e for e in importlib.metadata.entry_points(group="mllm_pib") if e.name == "minigpt4"]
    assert entry.value == "mllm_pib_minigpt4.plugin"
    registered = get_backbone("minigpt4")
    assert {"feature", "variant", "blip2_path", "proj_path", "llm_path"} <= set(registered.spec.options)


# --- assembly from the published pieces ----------------------------------------------------------


def write_pieces(root, variant: str, *, ln_vision: bool = False, shard: bool = False):
    """Tiny BLIP-2 / MiniGPT-4 .pth / Llama checkpoints in the published layouts."""
    torch.manual_seed(1)
    blip2 = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=tiny_vision_config(variant),
        qformer_config=tiny_qformer_config(),
        text_config=original.TINY_OPT,
        num_query_tokens=8,
    ))
    jitter_(blip2, seed=1).save_pretrained(root / "blip2", max_shard_size="40KB" if shard else "50GB")
    tokenizer = train_llama_tokenizer(pad_token=None)  # like Vicuna's: no <ImageHere>, no pad
    llama = jitter_(LlamaForCausalLM(LlamaConfig(**tiny_text_config(tokenizer))), seed=2)
    llama.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    width = 32 if variant == "v1" else 4 * 32
    proj = {"llama_proj.weight": torch.randn(64, width) * 0.1, "llama_proj.bias": torch.randn(64) * 0.1}
    if ln_vision:
        proj.update({"ln_vision.weight": torch.rand(32) + 0.5, "ln_vision.bias": torch.randn(32)})
    torch.save({"model": proj, "optimizer": None, "epoch": 3}, root / "minigpt4.pth")
    return blip2, llama, tokenizer, proj


def direct_model(variant, blip2, llama, proj, image_token_id, vocab) -> MiniGPT4ForConditionalGeneration:
    """A MiniGPT-4 built directly with the pieces' weights (one embedding row more for
    <ImageHere>, whose value never reaches the decoder)."""
    config = MiniGPT4Config(
        variant=variant,
        vision_config=tiny_vision_config(variant),
        qformer_config=tiny_qformer_config() if variant == "v1" else None,
        text_config={**llama.config.to_dict(), "vocab_size": vocab + 1},
        num_query_tokens=8,
        image_token_id=image_token_id,
    )
    model = MiniGPT4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.vision_model.load_state_dict(blip2.vision_model.state_dict())
        if variant == "v1":
            model.qformer.load_state_dict(blip2.qformer.state_dict())
            model.query_tokens.copy_(blip2.query_tokens)
        else:  # MiniGPT-4 (Llama-2) never loads BLIP-2's ln_vision: LayerNorm's initial affine
            model.vision_model.post_layernorm.reset_parameters()
        if "ln_vision.weight" in proj:
            model.vision_model.post_layernorm.weight.copy_(proj["ln_vision.weight"])
            model.vision_model.post_layernorm.bias.copy_(proj["ln_vision.bias"])
        model.llama_proj.weight.copy_(proj["llama_proj.weight"])
        model.llama_proj.bias.copy_(proj["llama_proj.bias"])
        for name, tensor in llama.state_dict().items():
            model.language_model.state_dict()[name][: tensor.shape[0]].copy_(tensor)
    return model


@pytest.mark.parametrize(
    ("variant", "ln_vision", "shard"), [("v1", False, True), ("llama2", False, False), ("llama2", True, False)]
)
def test_assembled_model_equals_direct_model(tmp_path, variant, ln_vision, shard):
    blip2, llama, tokenizer, proj = write_pieces(tmp_path, variant, ln_vision=ln_vision, shard=shard)
    if shard:
        assert (tmp_path / "blip2" / "model.safetensors.index.json").is_file()
    backbone = load(None, blip2_path=tmp_path / "blip2", proj_path=tmp_path / "minigpt4.pth",
                    llm_path=tmp_path / "llm", feature="projected")
    assert backbone.variant == variant  # inferred from llama_proj's width
    if variant == "v1":  # the frozen Q-Former never drops out, in train mode neither
        assert backbone.model.config.qformer_config.hidden_dropout_prob == 0.0
        assert backbone.model.config.qformer_config.attention_probs_dropout_prob == 0.0
    vocab = len(tokenizer)
    assert backbone.image_token_id == vocab and len(backbone.tokenizer) == vocab + 1
    direct = direct_model(variant, blip2, llama, proj, backbone.image_token_id, vocab)
    inputs, ids, mask = batch(backbone)
    real = mask.bool()
    with torch.no_grad():
        ours = contract_logits(backbone, inputs, ids, mask)
        expected = direct(**inputs, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[real][:, :vocab], expected[real][:, :vocab], atol=ATOL, rtol=0)
    assert (ours[real] - ours[real].mean()).abs().max() > 1e-3, "logits must not be constant"


# --- errors -------------------------------------------------------------------------------------


def test_qformer_feature_refused_for_llama2(tiny_dirs):
    with pytest.raises(UserError, match="llama2 variant does not have"):
        load(tiny_dirs["llama2"], feature="qformer")
    with pytest.raises(UserError, match="llama2 variant does not have"):
        load(None, variant="llama2", feature="qformer", blip2_path="b", proj_path="p", llm_path="l")
    with pytest.raises(UserError, match="unknown minigpt4 feature 'clip'"):
        load(tiny_dirs["v1"], feature="clip")


def test_missing_pieces(tmp_path, tiny_dirs):
    for absent in (None, ""):
        with pytest.raises(UserError, match="missing: blip2_path, proj_path, llm_path"):
            load(absent)
    with pytest.raises(UserError, match="missing: llm_path"):
        load(None, blip2_path=tmp_path, proj_path=tmp_path / "x.pth")
    with pytest.raises(UserError, match="not both"):
        load(tiny_dirs["v1"], llm_path=tmp_path)
    with pytest.raises(UserError, match="nowhere has no config.json"):
        load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown dtype"):
        load(tiny_dirs["v1"], dtype="float77")


def test_bad_pieces(tmp_path):
    write_pieces(tmp_path, "v1")
    pieces = {"blip2_path": tmp_path / "blip2", "proj_path": tmp_path / "minigpt4.pth",
              "llm_path": tmp_path / "llm"}
    with pytest.raises(UserError, match="llama2 variant needs 128"):
        load(None, variant="llama2", **pieces)
    with pytest.raises(UserError, match="does not exist"):
        load(None, **{**pieces, "proj_path": tmp_path / "absent.pth"})
    torch.save({"model": {"other.weight": torch.zeros(2)}}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match=r"empty\.pth holds no llama_proj\.weight, llama_proj\.bias"):
        load(None, **{**pieces, "proj_path": tmp_path / "empty.pth"})
    with pytest.raises(UserError, match="'llama' model, not BLIP-2"):
        load(None, **{**pieces, "blip2_path": tmp_path / "llm"})
    with pytest.raises(UserError, match="'blip-2' model, not MiniGPT-4"):
        load(tmp_path / "blip2")
    (tmp_path / "blip2" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds no model.safetensors"):
        load(None, **pieces)
