"""The LAVIS key mapping against the full-size ``blip2_vicuna_instruct`` (Vicuna-7B).

The LAVIS state-dict names and shapes are generated here from LAVIS's module definitions (read
from salesforce/LAVIS on GitHub: the 1.0.2 wheel on PyPI predates ``blip2_vicuna_instruct.py``;
LAVIS itself needs transformers 4.2x and cannot be instantiated):

- ``visual_encoder``: ``lavis/models/eva_vit.py`` ``create_eva_vit_g``: ``VisionTransformer`` with
  patch 14 at 224 px, width 1408, 39 blocks, 16 heads, ``mlp_ratio=4.3637``, ``qkv_bias=True``
  (``q_bias`` / ``v_bias`` beside a bias-free ``qkv``), absolute position embedding, no relative
  position bias, no layer-scale ``gamma``; no final norm, no head.
- ``ln_vision``: ``blip2.py`` ``LayerNorm(1408)``.
- ``Qformer``: ``Qformer.py`` ``BertLMHeadModel`` from ``bert-base-uncased`` (12 layers, 768 wide,
  3072 FFN, 512 positions) with ``cross_attention_freq=2`` (cross-attention in even layers, keys
  and values read the 1408-wide ViT), ``intermediate_query``/``output_query`` in every layer, the
  vocabulary resized to 30523 (``[DEC]`` added) and ``cls`` removed by ``blip2_vicuna_instruct``;
  ``embeddings.position_ids`` is a persistent buffer in that code.
- ``query_tokens`` ``[1, 32, 768]``, ``llm_proj`` ``Linear(768, 4096)``.
- ``llm_model``: LAVIS's ``modeling_llama.py`` ``LlamaForCausalLM`` for Vicuna-7B (32 layers,
  4096 wide, 11008 MLP, vocabulary 32000 + ``[PAD]``), whose ``rotary_emb.inv_freq`` buffer is
  persistent.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from mllm_pib_instructblip.checkpoints import _fit_to_config, lavis_to_transformers

VIT_WIDTH, VIT_DEPTH, VIT_PATCH, IMAGE_SIZE = 1408, 39, 14, 224
VIT_MLP = int(VIT_WIDTH * 4.3637)
QF_WIDTH, QF_LAYERS, QF_FFN, QF_POSITIONS, QF_VOCAB, CROSS_FREQ = 768, 12, 3072, 512, 30522 + 1, 2
QUERIES = 32
LLM_WIDTH, LLM_LAYERS, LLM_MLP, LLM_VOCAB = 4096, 32, 11008, 32000 + 1
LLM_HEAD_DIM = 128


def eva_vit_g() -> dict[str, tuple[int, ...]]:
    patches = (IMAGE_SIZE // VIT_PATCH) ** 2
    names = {
        "cls_token": (1, 1, VIT_WIDTH),
        "pos_embed": (1, patches + 1, VIT_WIDTH),
        "patch_embed.proj.weight": (VIT_WIDTH, 3, VIT_PATCH, VIT_PATCH),
        "patch_embed.proj.bias": (VIT_WIDTH,),
    }
    for i in range(VIT_DEPTH):
        block = {
            "norm1.weight": (VIT_WIDTH,), "norm1.bias": (VIT_WIDTH,),
            "attn.q_bias": (VIT_WIDTH,), "attn.v_bias": (VIT_WIDTH,),
            "attn.qkv.weight": (3 * VIT_WIDTH, VIT_WIDTH),
            "attn.proj.weight": (VIT_WIDTH, VIT_WIDTH), "attn.proj.bias": (VIT_WIDTH,),
            "norm2.weight": (VIT_WIDTH,), "norm2.bias": (VIT_WIDTH,),
            "mlp.fc1.weight": (VIT_MLP, VIT_WIDTH), "mlp.fc1.bias": (VIT_MLP,),
            "mlp.fc2.weight": (VIT_WIDTH, VIT_MLP), "mlp.fc2.bias": (VIT_WIDTH,),
        }
        names.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return names


def linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    names = {f"{prefix}.weight": (out_features, in_features)}
    if bias:
        names[f"{prefix}.bias"] = (out_features,)
    return names


def layer_norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def bert_attention(prefix: str, key_width: int) -> dict[str, tuple[int, ...]]:
    return {
        **linear(f"{prefix}.self.query", QF_WIDTH, QF_WIDTH),
        **linear(f"{prefix}.self.key", QF_WIDTH, key_width),
        **linear(f"{prefix}.self.value", QF_WIDTH, key_width),
        **linear(f"{prefix}.output.dense", QF_WIDTH, QF_WIDTH),
        **layer_norm(f"{prefix}.output.LayerNorm", QF_WIDTH),
    }


def qformer_bert() -> dict[str, tuple[int, ...]]:
    names = {
        "embeddings.word_embeddings.weight": (QF_VOCAB, QF_WIDTH),
        "embeddings.position_embeddings.weight": (QF_POSITIONS, QF_WIDTH),
        **layer_norm("embeddings.LayerNorm", QF_WIDTH),
        "embeddings.position_ids": (1, QF_POSITIONS),
    }
    for i in range(QF_LAYERS):
        layer = f"encoder.layer.{i}"
        names.update(bert_attention(f"{layer}.attention", QF_WIDTH))
        if i % CROSS_FREQ == 0:
            names.update(bert_attention(f"{layer}.crossattention", VIT_WIDTH))
        for ffn in ("", "_query"):
            names.update(linear(f"{layer}.intermediate{ffn}.dense", QF_FFN, QF_WIDTH))
            names.update(linear(f"{layer}.output{ffn}.dense", QF_WIDTH, QF_FFN))
            names.update(layer_norm(f"{layer}.output{ffn}.LayerNorm", QF_WIDTH))
    return names


def vicuna_7b() -> dict[str, tuple[int, ...]]:
    names = {"model.embed_tokens.weight": (LLM_VOCAB, LLM_WIDTH)}
    for i in range(LLM_LAYERS):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.update(linear(f"{layer}.self_attn.{proj}", LLM_WIDTH, LLM_WIDTH, bias=False))
        names[f"{layer}.self_attn.rotary_emb.inv_freq"] = (LLM_HEAD_DIM // 2,)
        names.update(linear(f"{layer}.mlp.gate_proj", LLM_MLP, LLM_WIDTH, bias=False))
        names.update(linear(f"{layer}.mlp.down_proj", LLM_WIDTH, LLM_MLP, bias=False))
        names.update(linear(f"{layer}.mlp.up_proj", LLM_MLP, LLM_WIDTH, bias=False))
        names[f"{layer}.input_layernorm.weight"] = (LLM_WIDTH,)
        names[f"{layer}.post_attention_layernorm.weight"] = (LLM_WIDTH,)
    names["model.norm.weight"] = (LLM_WIDTH,)
    names.update(linear("lm_head", LLM_VOCAB, LLM_WIDTH, bias=False))
    return names


def blip2_vicuna_instruct() -> dict[str, tuple[int, ...]]:
    """Every state-dict name of LAVIS's ``blip2_vicuna_instruct`` (vicuna7b) with its shape."""
    names = {f"visual_encoder.{k}": v for k, v in eva_vit_g().items()}
    names.update(layer_norm("ln_vision", VIT_WIDTH))
    names.update({f"Qformer.bert.{k}": v for k, v in qformer_bert().items()})
    names["query_tokens"] = (1, QUERIES, QF_WIDTH)
    names.update({f"llm_model.{k}": v for k, v in vicuna_7b().items()})
    names.update(linear("llm_proj", LLM_WIDTH, QF_WIDTH))
    return names


def full_size_config() -> InstructBlipConfig:
    """``Salesforce/instructblip-vicuna-7b``'s structure: the LLM vocabulary also holds ``<image>``."""
    return InstructBlipConfig(
        vision_config=dict(hidden_size=VIT_WIDTH, intermediate_size=VIT_MLP, num_hidden_layers=VIT_DEPTH,
                           num_attention_heads=16, image_size=IMAGE_SIZE, patch_size=VIT_PATCH, qkv_bias=True),
        qformer_config=dict(vocab_size=QF_VOCAB, hidden_size=QF_WIDTH, num_hidden_layers=QF_LAYERS,
                            intermediate_size=QF_FFN, max_position_embeddings=QF_POSITIONS,
                            cross_attention_frequency=CROSS_FREQ, encoder_hidden_size=VIT_WIDTH),
        text_config=dict(model_type="llama", vocab_size=LLM_VOCAB + 1, hidden_size=LLM_WIDTH,
                         intermediate_size=LLM_MLP, num_hidden_layers=LLM_LAYERS, num_attention_heads=32),
        num_query_tokens=QUERIES,
        image_token_index=LLM_VOCAB,
    )


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(full_size_config())
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def lavis_state() -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in blip2_vicuna_instruct().items()}


def test_generator_counts(lavis_state):
    """The generated list has the size of the real model: 7.9B weights (ViT-g 1.0B, Q-Former 0.19B
    with its text embeddings, Vicuna-7B 6.7B)."""
    params = sum(t.numel() for name, t in lavis_state.items() if not name.endswith(("position_ids", "inv_freq")))
    vit = sum(t.numel() for name, t in lavis_state.items() if name.startswith("visual_encoder."))
    assert 0.98e9 < vit < 0.99e9
    assert 7.9e9 < params < 7.95e9
    assert sum(".crossattention.self.query.weight" in name for name in lavis_state) == QF_LAYERS // CROSS_FREQ


def test_every_lavis_key_maps_onto_the_transformers_model(lavis_state, expected):
    renamed = lavis_to_transformers(lavis_state, source="blip2_vicuna_instruct")
    missing = sorted(set(expected) - set(renamed))
    extra = sorted(set(renamed) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
    wrong = {k: (tuple(v.shape), tuple(expected[k])) for k, v in renamed.items()
             if v.shape != expected[k] and not k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    assert not wrong
    # the loader's own check accepts it, growing the vocabulary by the <image> row
    fitted = _fit_to_config(renamed, full_size_config(), "blip2_vicuna_instruct", torch.float16)
    assert {k: v.shape for k, v in fitted.items()} == expected


def test_the_mapping_pairs_the_right_tensors(lavis_state):
    """Names can match while pairing the wrong tensors: check the renames that change structure."""
    renamed = lavis_to_transformers(lavis_state)
    layers = {name.split(".")[3] for name in renamed if ".crossattention." in name}
    assert layers == {str(i) for i in range(0, QF_LAYERS, CROSS_FREQ)}
    assert renamed["vision_model.encoder.layers.38.self_attn.qkv.bias"].shape == (3 * VIT_WIDTH,)
    assert renamed["qformer.encoder.layer.4.crossattention.attention.key.weight"].shape == (QF_WIDTH, VIT_WIDTH)
    assert "vision_model.post_layernorm.weight" in renamed and "qformer.embeddings.layernorm.weight" in renamed
