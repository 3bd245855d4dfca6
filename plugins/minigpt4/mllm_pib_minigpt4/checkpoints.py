"""Assemble MiniGPT-4 from its published pieces.

MiniGPT-4 was never published as one transformers checkpoint. Its pieces are:

- the vision tower, Q-Former and query tokens of BLIP-2 (FlanT5-XXL), available as a transformers
  BLIP-2 checkpoint directory (``Blip2ForConditionalGeneration`` / ``Blip2Model`` layout:
  ``vision_model.*``, ``qformer.*``, ``query_tokens``; safetensors, possibly sharded). Only those
  tensors are read: the BLIP-2 language model is never loaded;
- ``llama_proj`` from MiniGPT-4's own ``.pth`` (``{"model": {"llama_proj.weight",
  "llama_proj.bias"}}``), read with ``torch.load(weights_only=True)``;
- the LLM (Vicuna for ``v1``, Llama-2-chat for ``llama2``) as a transformers directory.

``ln_vision``: for ``v1`` MiniGPT-4 loads it from the BLIP-2 checkpoint, where transformers keeps it
as ``vision_model.post_layernorm``. The ``llama2`` variant never loads the BLIP-2 checkpoint, so its
``ln_vision`` keeps LayerNorm's initial affine (weight 1, bias 0) on top of the same EVA-ViT-g
weights; the assembly reproduces that by resetting ``post_layernorm``'s affine, unless the ``.pth``
itself holds ``ln_vision.weight`` / ``ln_vision.bias`` (then those are used, for both variants).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from mllm_pib.errors import UserError
from mllm_pib.torch_files import load_torch_file
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Blip2Config

from .configuration import MiniGPT4Config
from .modeling import MiniGPT4ForConditionalGeneration
from .processing import minigpt4_image_processor
from .template import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

BLIP2_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
LN_VISION_KEYS = {
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
}


def read_projection(proj_path: str | Path) -> dict[str, torch.Tensor]:
    """``llama_proj.*`` (and ``ln_vision.*`` when present) from a MiniGPT-4 ``.pth``."""
    path = Path(proj_path)
    if not path.is_file():
        raise UserError(f"MiniGPT-4 projection checkpoint {path} does not exist; pass the published "
                        "pretrained_minigpt4*.pth file")
    checkpoint = load_torch_file(path, what="MiniGPT-4 projection checkpoint")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    missing = [key for key in PROJ_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path} holds no {', '.join(missing)}; a MiniGPT-4 checkpoint is a dict "
                        '{"model": {"llama_proj.weight": ..., "llama_proj.bias": ...}}')
    ignored = sorted(set(state) - set(PROJ_KEYS) - set(LN_VISION_KEYS))
    if ignored:
        logger.warning("%s: ignoring %d tensors MiniGPT-4 assembly does not use: %s",
                       path, len(ignored), ", ".join(ignored[:8]))
    return {key: state[key] for key in (*PROJ_KEYS, *LN_VISION_KEYS) if key in state}


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a plain or sharded checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    raise UserError(f"{directory} holds no model.safetensors or model.safetensors.index.json; "
                    "save the BLIP-2 model with transformers' save_pretrained (safetensors)")


def read_blip2_vision(blip2_path: str | Path) -> tuple[Blip2Config, dict[str, torch.Tensor]]:
    """The BLIP-2 config and its ``vision_model.*``, ``qformer.*`` and ``query_tokens`` tensors."""
    directory = Path(blip2_path)
    if not (directory / "config.json").is_file():
        raise UserError(f"BLIP-2 checkpoint directory {directory} has no config.json; pass a "
                        "transformers BLIP-2 directory (e.g. a copy of Salesforce/blip2-flan-t5-xxl)")
    config = _read_config(directory)
    if not isinstance(config, Blip2Config):
        raise UserError(f"{directory / 'config.json'} describes a {config.model_type!r} model, "
                        "not BLIP-2 (model_type 'blip-2')")
    wanted = {name: file for name, file in _safetensors_files(directory).items()
              if name.startswith(BLIP2_PREFIXES)}
    if not any(name.startswith("vision_model.") for name in wanted):
        raise UserError(f"{directory} holds no vision_model.* tensors; it is not a "
                        "Blip2ForConditionalGeneration/Blip2Model checkpoint")
    tensors = {}
    for file in sorted(set(wanted.values())):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if name in wanted:
                    tensors[name] = handle.get_tensor(name)
    return config, tensors


def _read_config(directory: Path):
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise UserError(f"{directory / 'config.json'} is not a transformers config: {err}") from err


def infer_variant(blip2: Blip2Config, proj_weight: torch.Tensor, variant: str | None,
                  num_merged_patches: int = 4) -> str:
    """``v1`` if ``llama_proj`` reads Q-Former outputs, ``llama2`` if it reads merged ViT patches."""
    in_features = proj_weight.shape[1]
    widths = {"v1": blip2.qformer_config.hidden_size,
              "llama2": blip2.vision_config.hidden_size * num_merged_patches}
    matching = [name for name, width in widths.items() if width == in_features]
    if variant is not None:
        if variant not in widths:
            raise UserError(f"unknown MiniGPT-4 variant {variant!r}; choose one of {tuple(widths)}")
        if variant not in matching:
            raise UserError(f"llama_proj reads {in_features} features but the {variant} variant "
                            f"needs {widths[variant]}; the .pth belongs to another variant")
        return variant
    if len(matching) != 1:
        raise UserError(f"cannot tell the MiniGPT-4 variant from llama_proj's input width "
                        f"{in_features} (v1 needs {widths['v1']}, llama2 {widths['llama2']}); "
                        "pass variant=")
    return matching[0]


def load_llm(llm_path: str | Path, dtype: torch.dtype | str | None):
    """The LLM and its tokenizer, with ``<ImageHere>`` added as a special token if missing.

    A new placeholder id gets an embedding row (its input embedding is always replaced by a
    visual token) and an output row initialised to the mean of the others (transformers'
    default), so generating it is as unlikely as an average token.
    """
    directory = Path(llm_path)
    if not (directory / "config.json").is_file():
        raise UserError(f"LLM directory {directory} has no config.json; pass a transformers "
                        "Vicuna / Llama-2-chat directory")
    config = _read_config(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, config=config)
    try:
        llm = AutoModelForCausalLM.from_pretrained(
            directory, config=config, dtype=dtype if dtype is not None else "auto"
        )
    except (ValueError, OSError) as err:
        raise UserError(f"{directory} does not hold a transformers causal LM: {err}") from err
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return llm, tokenizer


def assemble(
    blip2_path: str | Path,
    proj_path: str | Path,
    llm_path: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Build MiniGPT-4 from its published pieces.

    Args:
        blip2_path: transformers BLIP-2 checkpoint directory (vision tower, Q-Former, queries).
        proj_path: MiniGPT-4 ``.pth`` holding ``llama_proj``.
        llm_path: transformers Vicuna (``v1``) or Llama-2-chat (``llama2``) directory.
        variant: ``"v1"`` or ``"llama2"``; inferred from ``llama_proj``'s shape when omitted.
        dtype: dtype of the whole model; by default the LLM checkpoint's.

    Returns:
        ``(model, tokenizer, image_processor)``; ``model`` is in eval mode.
    """
    projection = read_projection(proj_path)
    blip2, vision_tensors = read_blip2_vision(blip2_path)
    variant = infer_variant(blip2, projection["llama_proj.weight"], variant)
    llm, tokenizer = load_llm(llm_path, dtype)
    # MiniGPT-4 keeps its frozen Q-Former in eval mode ("disabled_train"): no dropout, ever.
    blip2.qformer_config.hidden_dropout_prob = 0.0
    blip2.qformer_config.attention_probs_dropout_prob = 0.0
    config = MiniGPT4Config(
        variant=variant,
        vision_config=blip2.vision_config,
        qformer_config=blip2.qformer_config if variant == "v1" else None,
        text_config=llm.config,
        num_query_tokens=blip2.num_query_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
    )
    with torch.device("meta"):
        model = MiniGPT4ForConditionalGeneration(config)
    model.language_model = llm
    state = {name: tensor for name, tensor in vision_tensors.items()
             if variant == "v1" or name.startswith("vision_model.")}
    if variant == "llama2":
        post_norm = model.vision_model.post_layernorm
        state["vision_model.post_layernorm.weight"] = torch.ones(post_norm.normalized_shape)
        state["vision_model.post_layernorm.bias"] = torch.zeros(post_norm.normalized_shape)
    state.update({LN_VISION_KEYS.get(name, name): tensor for name, tensor in projection.items()})
    _load_pieces(model, state, blip2_path, proj_path)
    image_processor = minigpt4_image_processor(config.vision_config.image_size)
    return model.to(llm.dtype).eval(), tokenizer, image_processor


def _load_pieces(model: MiniGPT4ForConditionalGeneration, state: dict[str, torch.Tensor],
                 blip2_path, proj_path) -> None:
    """Load the non-LLM tensors, refusing shape mismatches and anything left uninitialised."""
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise UserError(f"the tensors of {blip2_path} and {proj_path} do not fit together: {err}") from err
    missing = [name for name in result.missing_keys if not name.startswith("language_model.")]
    if missing:
        raise UserError(f"{blip2_path} lacks tensors MiniGPT-4 needs: {', '.join(missing[:8])}")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        raise UserError(f"the assembled model has no weights for {', '.join(meta[:8])}")
