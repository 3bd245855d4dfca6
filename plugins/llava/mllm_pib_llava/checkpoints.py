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

import torch

from mllm_pib.errors import UserError
from mllm_pib.torch_files import load_torch_file

IMAGE_TOKEN = "<image>"
KEY_PREFIXES = (  # original prefix -> llava-hf prefix
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.", None),  # some finetunes save the tower too; it is read from its own checkpoint
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
)


def is_original_layout(path: Path) -> bool:
    return "mm_vision_tower" in json.loads((path / "config.json").read_text())


def map_key(key: str) -> str | None:
    """llava-hf name of an original LLaVA-1.5 weight (``None``: not taken from this file)."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return None if new is None else new + key[len(old):]
    raise UserError(f"unexpected weight {key!r} in an original LLaVA-1.5 checkpoint")


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
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise UserError(
            f"{path / 'config.json'}: mm_projector_type {raw.get('mm_projector_type')!r} is not "
            "LLaVA-1.5's 'mlp2x_gelu'; only LLaVA-1.5 checkpoints are supported"
        )
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
    state = _mapped_state(read_state_dict(path), len(tokenizer))
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
    state = {}
    for key, tensor in original.items():
        new = map_key(key)
        if new is not None:
            state[new] = tensor
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = state[key]
        if rows.shape[0] < vocab_size:  # the appended <image> (and pad) rows
            extra = rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])
            state[key] = torch.cat([rows, extra])
    return state
