"""Original LLaVA-1.5 checkpoints (the ``liuhaotian/llava-v1.5-7b`` layout), read by key mapping.

The original repository saves ``LlavaLlamaForCausalLM``: LLaMA weights under ``model.*`` and
``lm_head.*``, the projector under ``model.mm_projector.{0,2}.*``, and config fields
``mm_vision_tower``, ``mm_hidden_size``, ``mm_projector_type``, ``mm_vision_select_layer``,
``mm_vision_select_feature``. The CLIP tower is not in it: it comes from its own checkpoint
(``openai/clip-vit-large-patch14-336``, a transformers ``CLIPVisionModel`` directory). Its
tokenizer has no ``<image>`` token (the original code splices image features at a sentinel id);
loading appends one, with a zero embedding and head row, as the llava-hf conversion did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mllm_pib.errors import UserError
from mllm_pib.torch_files import load_torch_file

IMAGE_TOKEN = "<image>"
KEY_PREFIXES = (  # original prefix -> llava-hf prefix
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    # a fine-tuned CLIP tower, saved with the CLIPVisionModel names of its day
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
# config field -> (LLaVA-1.5's value, what the original code assumes when the field is absent)
LLAVA_15_SETTINGS: dict[str, tuple[Any, Any]] = {
    "mm_projector_type": ("mlp2x_gelu", "linear"),
    "image_aspect_ratio": ("pad", "square"),  # anything else is not padded to a square
    "mm_patch_merge_type": ("flat", "flat"),
    "mm_use_im_start_end": (False, False),
    "mm_use_im_patch_token": (False, True),  # the original's loader adds <im_patch> when absent
}
LLAVA_16_SIGNS = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial"}
LLAVA_16_WEIGHT = "model.image_newline"
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
)


def is_original_layout(path: Path) -> bool:
    return "mm_vision_tower" in json.loads((path / "config.json").read_text())


def map_key(key: str) -> str:
    """llava-hf name of an original LLaVA-1.5 weight."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise UserError(f"unexpected weight {key!r} in an original LLaVA-1.5 checkpoint")


def check_llava15(raw: dict, config_path: Path) -> None:
    """Refuse a configuration the llava backbone would not run as the original code does."""
    for field, (expected, absent) in LLAVA_15_SETTINGS.items():
        value = raw.get(field, absent)
        if value == expected:
            continue
        given = f"{field} {value!r}" + ("" if field in raw else " (absent: the original's default)")
        sign = LLAVA_16_SIGNS.get(field)
        if sign is not None and str(value).startswith(sign):
            raise UserError(f"{config_path}: {given} is LLaVA-1.6 (LLaVA-NeXT); the llava backbone runs "
                            "LLaVA-1.5 only; LLaVA-1.6 in the llava-hf layout loads with the llava_next backbone")
        raise UserError(f"{config_path}: {given} is not LLaVA-1.5's {expected!r}; the llava backbone "
                        "runs LLaVA-1.5 checkpoints only")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory: safetensors, or ``.bin`` read weights-only."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(file))
        else:
            state.update(load_torch_file(file, what="LLaVA weights file"))
    return state


def load_original(path: Path, *, vision_tower: str | None, dtype: torch.dtype):
    """Build a ``LlavaForConditionalGeneration`` + processor from an original checkpoint."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                              LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    raw = json.loads((path / "config.json").read_text())
    check_llava15(raw, path / "config.json")
    tower_path = Path(vision_tower or raw["mm_vision_tower"])
    if not (tower_path / "config.json").is_file():
        raise UserError(
            f"{path / 'config.json'}: the CLIP tower {str(tower_path)!r} is not a local directory; "
            "pass the CLIPVisionModel checkpoint with the backbone option vision_tower=DIR"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    vision_config = CLIPVisionConfig.from_pretrained(tower_path)
    text_config = LlamaConfig(**{k: raw[k] for k in LLAMA_FIELDS if k in raw}, tie_word_embeddings=False)
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    original = read_state_dict(path)
    if LLAVA_16_WEIGHT in original:
        raise UserError(f"{path}: weight {LLAVA_16_WEIGHT!r} is LLaVA-1.6 (LLaVA-NeXT)'s; the llava backbone "
                        "runs LLaVA-1.5 only; LLaVA-1.6 in the llava-hf layout loads with the llava_next backbone")
    state = _mapped_state(original, len(tokenizer))
    if not any(key.startswith("model.vision_tower.") for key in state):
        tower = CLIPVisionModel.from_pretrained(tower_path)
        state.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    try:
        # from_pretrained with a state dict allocates no random weights first and keeps buffers
        model = LlavaForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"{path}: weights do not match LLaVA-1.5: {err}") from None
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise UserError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:5])}")
    image_processor = CLIPImageProcessor.from_pretrained(tower_path)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
    )
    return model.to(dtype).eval(), processor


def _mapped_state(original: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    state = {map_key(key): tensor for key, tensor in original.items()}
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = state[key]
        if rows.shape[0] < vocab_size:  # the appended <image> (and pad) rows
            extra = rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])
            state[key] = torch.cat([rows, extra])
    return state
