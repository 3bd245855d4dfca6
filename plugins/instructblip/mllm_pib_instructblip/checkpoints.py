"""InstructBLIP checkpoints in the LAVIS layout (``blip2_vicuna_instruct``), read by key mapping.

LAVIS itself is not needed: the state dict is renamed into
``transformers.InstructBlipForConditionalGeneration`` the way transformers' own conversion
script does it, and read with ``torch.load(..., weights_only=True)``.

Expected inputs:

- ``model_path``: the LAVIS checkpoint, a ``.pth`` holding the state dict (or a dict with it under
  ``"model"``, as LAVIS saves training checkpoints) with ``ln_vision.*``, ``Qformer.bert.*``,
  ``query_tokens``, ``llm_proj.*`` and, optionally, ``visual_encoder.*`` and ``llm_model.*``.
  The published ``instruct_blip_vicuna{7b,13b}_trimmed.pth`` hold neither of the optional groups:
  LAVIS builds the ViT from ``eva_vit_g.pth`` and the LLM from a Vicuna directory.
- ``config_path`` (required): a transformers InstructBLIP directory giving ``config.json`` and the
  processor files (``preprocessor_config.json`` or ``processor_config.json``, the LLM tokenizer,
  ``qformer_tokenizer/``), e.g. ``Salesforce/instructblip-vicuna-7b`` without its weight files.
  The configuration is not inferred from tensor shapes: the LLM's RoPE base, norm epsilon and
  special tokens, and the tokenizers, are not in the state dict.
- ``vit_path``: ``eva_vit_g.pth`` (keys without the ``visual_encoder.`` prefix), needed when
  the checkpoint has no ``visual_encoder.*``. It holds EVA-CLIP-g's 40 blocks; InstructBLIP uses
  the first ``num_hidden_layers`` (39) of them, so later blocks are dropped.
- ``llm_path``: the Vicuna directory (transformers ``LlamaForCausalLM`` weights, ``*.safetensors``
  or ``pytorch_model*.bin``), needed when the checkpoint has no ``llm_model.*``. When its vocabulary
  is smaller than the configuration's (Vicuna's 32000 rows against InstructBLIP's added ``[PAD]``
  and image tokens) the missing embedding and output rows are set to the mean row: the image
  placeholder's input embedding is replaced by the visual tokens anyway, and LAVIS never
  trained either row.

LAVIS normalises the ViT output with ``ln_vision = LayerNorm(1408)``, whose epsilon is PyTorch's
default 1e-5; transformers builds that norm (``vision_model.post_layernorm``) with the ViT blocks'
1e-6. The LAVIS loader records 1e-5 in the configuration (``vision_config.ln_vision_eps``), which
the backbone applies, so the model saved from it keeps LAVIS's epsilon.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from mllm_pib.errors import UserError
from mllm_pib.torch_files import load_torch_file

logger = logging.getLogger(__name__)

# ``torch.nn.LayerNorm``'s default, which LAVIS's ``ln_vision`` keeps.
LAVIS_LN_VISION_EPS = 1e-5

# LAVIS prefix -> transformers prefix, first match wins.
PREFIXES = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.", "vision_model.encoder.layers."),
    ("ln_vision.", "vision_model.post_layernorm."),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.embeddings.layernorm."),
    ("Qformer.bert.", "qformer."),
    ("llm_proj.", "language_projection."),
    ("llm_model.", "language_model."),
)
# Renames inside an EVA-ViT block and a Q-Former layer.
VIT_BLOCK_PARTS = (
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
)
QFORMER_PARTS = (
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
)
# Buffers some checkpoints carry that the transformers model recomputes.
IGNORED = re.compile(r"(^Qformer\.bert\.embeddings\.position_ids$|\.rotary_emb\.inv_freq$)")
QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
VOCAB_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
# Key prefixes that name what another model family has instead of the Vicuna parts.
OTHER_FAMILIES = {
    "opt_proj.": "BLIP-2 OPT", "opt_model.": "BLIP-2 OPT", "t5_proj.": "Flan-T5", "t5_model.": "Flan-T5",
}


def lavis_to_transformers(
    state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a ``blip2_vicuna_instruct`` state dict to ``InstructBlipForConditionalGeneration`` keys.

    EVA-ViT attention has a fused ``qkv`` projection with separate ``q_bias``/``v_bias`` and no key
    bias; they become one ``qkv.bias`` with zeros for the key part.

    Raises:
        UserError: naming ``source`` and the keys that are not part of the LAVIS layout.
    """
    renamed, biases, unknown = {}, {}, []
    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        match = QV_BIAS.match(key)
        if match:
            biases.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        new_key = rename_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = value
    if unknown:
        raise UserError(_unknown_keys_message(source, unknown))
    for block, pair in sorted(biases.items()):
        if set(pair) != {"q", "v"}:
            raise UserError(f"{source}: visual_encoder.blocks.{block}.attn has a q_bias or a v_bias but not both")
        renamed[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            (pair["q"], torch.zeros_like(pair["v"]), pair["v"])
        )
    return renamed


def rename_key(key: str) -> str | None:
    """The transformers name of one LAVIS key (``q_bias``/``v_bias`` aside), ``None`` if unknown."""
    for old, new in PREFIXES:
        if key.startswith(old):
            renamed = new + key[len(old) :]
            break
    else:
        return None
    parts = VIT_BLOCK_PARTS if old == "visual_encoder.blocks." else QFORMER_PARTS if old == "Qformer.bert." else ()
    for part_old, part_new in parts:
        renamed = renamed.replace(part_old, part_new)
    return renamed


def _unknown_keys_message(source: str, unknown: list[str]) -> str:
    families = sorted(
        {family for key in unknown for prefix, family in OTHER_FAMILIES.items() if key.startswith(prefix)}
    )
    hint = (
        f"it looks like a {' / '.join(families)} checkpoint; only blip2_vicuna_instruct is supported"
        if families
        else "expected a LAVIS blip2_vicuna_instruct state dict"
    )
    first = ", ".join(unknown[:3])
    return f"{source}: {len(unknown)} keys outside the InstructBLIP layout (first: {first}); {hint}"


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file, unwrapping LAVIS's ``{"model": ...}``; tensors only."""
    loaded = load_torch_file(path, what="LAVIS checkpoint")
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return loaded


def read_eva_vit(path: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """EVA-ViT-g weights from ``eva_vit_g.pth``, in LAVIS naming, cut to ``num_layers`` blocks."""
    block = re.compile(r"^blocks\.(\d+)\.")
    weights, dropped = {}, []
    for key, value in read_torch_file(path).items():
        key = key.removeprefix("visual_encoder.")
        match = block.match(key)
        if match and int(match.group(1)) >= num_layers:
            dropped.append(key)
            continue
        if match or key in ("cls_token", "pos_embed") or key.startswith("patch_embed."):
            weights[f"visual_encoder.{key}"] = value
        else:
            dropped.append(key)
    if dropped:
        logger.info("%s: not used by InstructBLIP's %d-block ViT: %d tensors", path, num_layers, len(dropped))
    return weights


def read_llm_dir(path: Path) -> dict[str, torch.Tensor]:
    """A transformers ``LlamaForCausalLM`` directory's weights, under ``language_model.``."""
    if not path.is_dir():
        raise UserError(f"{path}: llm_path must be a directory holding the Vicuna (transformers Llama) weights")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    weights = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights.update(load_file(file))
        else:
            weights.update(read_torch_file(file))
    outside = [key for key in weights if not key.startswith(("model.", "lm_head."))]
    if outside:
        raise UserError(
            f"{path}: {len(outside)} tensors outside a LlamaForCausalLM layout (first: {', '.join(outside[:3])})"
        )
    return {f"language_model.{key}": value for key, value in weights.items() if not IGNORED.search(key)}


def load_lavis(
    path: Path,
    *,
    config_path: str | None,
    llm_path: str | None = None,
    vit_path: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Build ``InstructBlipForConditionalGeneration`` and its processor from a LAVIS checkpoint.

    See the module docstring for the inputs. Returns ``(model, processor)``.
    """
    from transformers import InstructBlipForConditionalGeneration

    from mllm_pib_instructblip.backbone import read_config, read_processor

    if config_path is None:
        raise UserError(
            f"{path}: a LAVIS checkpoint holds no configuration or tokenizer; pass config_path=<a "
            "transformers InstructBLIP directory with config.json and the processor files, e.g. "
            "Salesforce/instructblip-vicuna-7b without its weights>"
        )
    config = read_config(Path(config_path))
    config.vision_config.ln_vision_eps = LAVIS_LN_VISION_EPS
    processor = read_processor(Path(config_path), config)
    state = read_torch_file(path)
    state.update(_extra_weights(path, state, "visual_encoder.", vit_path, "vit_path",
                                lambda p: read_eva_vit(p, config.vision_config.num_hidden_layers)))
    weights = lavis_to_transformers(state, source=str(path))
    weights.update(_extra_weights(path, state, "llm_model.", llm_path, "llm_path", read_llm_dir))
    weights = _fit_to_config(weights, config, path, dtype)
    model = InstructBlipForConditionalGeneration.from_pretrained(None, config=config, state_dict=weights, dtype=dtype)
    return model.eval(), processor


def _extra_weights(path: Path, state: dict, prefix: str, extra_path: str | None, option: str, read) -> dict:
    """Weights of a group the checkpoint may lack (the ViT, the LLM), read from ``extra_path``."""
    present = any(key.startswith(prefix) for key in state)
    if present and extra_path is not None:
        raise UserError(f"{path}: holds {prefix}* weights and {option} was given too; use one of them")
    if present:
        return {}
    if extra_path is None:
        what = "EVA-ViT-g weights (eva_vit_g.pth)" if option == "vit_path" else "Vicuna directory"
        raise UserError(f"{path}: holds no {prefix}* weights; pass {option}=<the {what}>")
    extra = Path(extra_path)
    if not extra.exists():
        raise UserError(f"{extra}: not found ({option})")
    return read(extra)


def _fit_to_config(weights: dict, config, path: Path, dtype: torch.dtype) -> dict:
    """Check names and shapes against the model ``config`` describes; cast to ``dtype``."""
    from transformers import InstructBlipForConditionalGeneration

    with torch.device("meta"):
        expected = {k: v.shape for k, v in InstructBlipForConditionalGeneration(config).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if extra:
            details.append(f"{len(extra)} not in the configured model (first: {', '.join(extra[:3])})")
        raise UserError(f"{path}: the weights do not match config_path's model: {'; '.join(details)}")
    fitted = {}
    for key, value in weights.items():
        if key in VOCAB_ROWS and value.shape[0] < expected[key][0] and value.shape[1:] == expected[key][1:]:
            value = _append_mean_rows(value, expected[key][0])
        if value.shape != expected[key]:
            raise UserError(
                f"{path}: {key} has shape {tuple(value.shape)} but config_path's model needs {tuple(expected[key])}"
            )
        fitted[key] = value.to(dtype) if value.is_floating_point() else value
    return fitted


def _append_mean_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])
