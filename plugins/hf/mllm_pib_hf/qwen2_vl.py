"""Qwen2-VL and Qwen2.5-VL as mllm-pib backbones, on transformers'
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` and their processors.

Both cut the same way: a ViT over 14 px patches at the image's own resolution, a merger that
turns each 2 x 2 patch window into one visual token of the LLM's width, and a Qwen2 decoder with
3-D rotary positions (:mod:`mllm_pib_hf.mrope`). They differ in the vision tower (Qwen2.5-VL
runs windowed attention over a reordered patch sequence) and in their configs' field names;
:class:`Variant` holds those differences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mllm_pib.backbone import VisionFeatures, pad_visual, position_ids_from_mask, resolve_dtype
from mllm_pib.errors import UserError
from mllm_pib.processor_backbone import ProcessorBackbone, image_only_processor
from mllm_pib_hf.mrope import llm_grids, mrope_positions

FEATURES = ("vision", "projector")


@dataclass(frozen=True)
class Variant:
    """What differs between Qwen2-VL and Qwen2.5-VL."""

    name: str
    model_class: str
    processor_class: str
    vision_width: str  # the vision config's field holding the ViT width
    windowed: bool  # the ViT's output is in window order (Qwen2.5-VL)


QWEN2_VL = Variant("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "embed_dim", False)
QWEN2_5_VL = Variant("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "hidden_size", True)
VARIANTS = {v.name: v for v in (QWEN2_VL, QWEN2_5_VL)}


class QwenVLBackbone(ProcessorBackbone):
    """Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT -> patch merger -> Qwen2 decoder (M-RoPE).

    ``feature="vision"`` gives the PIB the ViT's patch features before the merger (4 per visual
    token, ``[N_patches, D_vision]`` per image); ``"projector"`` the merger's output, the tokens
    the LLM receives (``[N_patches / 4, H]``). Images of a batch give different counts: both come
    padded with validity masks, and each image's patch grid travels in ``VisionFeatures.extra``.
    """

    feature_choices = FEATURES
    # the instruct checkpoints end a turn with <|im_end|>; generation also stops at <|endoftext|>
    end_of_turn = ("<|im_end|>", "<|endoftext|>")

    def __init__(self, model, processor, variant: Variant, feature: str = "vision", model_id: str = ""):
        super().__init__()
        if feature not in FEATURES:
            raise UserError(f"unknown {variant.name} feature {feature!r}; choose one of {', '.join(FEATURES)}")
        self.name = variant.name
        self.variant = variant
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        config = model.config
        self.feature = feature
        self.model_id = model_id
        self.image_token_id = config.image_token_id
        self.decoder = model.model.language_model
        self._lm_head = model.lm_head
        self.merge_size = config.vision_config.spatial_merge_size
        self.hidden_size = config.text_config.hidden_size
        vision_width = getattr(config.vision_config, variant.vision_width)
        self.pib_vision_size = vision_width if feature == "vision" else self.hidden_size

    def parts(self):
        inner = self.model.model
        # the merger lives inside the ViT module: "vision" is the ViT without it
        tower = nn.ModuleList(module for name, module in inner.visual.named_children() if name != "merger")
        return {
            "vision": tower,
            "projector": inner.visual.merger,
            "llm": inner.language_model,
            "lm_head": self.model.lm_head,
        }

    # --- vision -----------------------------------------------------------------------------
    def encode_vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        visual = self.model.model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
        patches = out.last_hidden_state
        if self.variant.windowed:
            patches = self._patch_order(patches, image_grid_thw)
        counts = image_grid_thw.prod(-1).tolist()
        merged, merged_mask = pad_visual(out.pooler_output.split([n // self.merge_size**2 for n in counts]))
        if self.feature == "vision":
            pib, pib_mask = pad_visual(patches.split(counts))
        else:
            pib, pib_mask = merged, merged_mask
        return VisionFeatures(pib=pib, llm=merged, pib_mask=pib_mask, llm_mask=merged_mask,
                              extra={"image_grid_thw": image_grid_thw})

    def _patch_order(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's ViT output back in the processor's patch order (it runs, and returns,
        the merge windows of 2 x 2 patches reordered by attention window)."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge_size,
                                                  window_size=vision.window_size, patch_size=vision.patch_size)
        unit = self.merge_size**2
        windows = patches.reshape(-1, unit, patches.shape[-1])
        return windows[torch.argsort(window_index.to(patches.device))].reshape(patches.shape)

    # --- language ---------------------------------------------------------------------------
    def lm_forward(self, hidden, vision_feats, attention_mask, cache=None, *, image_mask=None, position_ids=None):
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, hidden.shape[1])
        grids = None
        if vision_feats is not None:
            grids = llm_grids(vision_feats.extra["image_grid_thw"], self.merge_size).to(position_ids.device)
        positions = mrope_positions(position_ids, image_mask, grids)
        return super().lm_forward(hidden, vision_feats, attention_mask, cache, image_mask=image_mask,
                                  position_ids=positions)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def processor_class(variant: Variant):
    import transformers

    return image_only_processor(getattr(transformers, variant.processor_class))


def load(
    model_path: str | None,
    *,
    variant: str,
    feature: str = "vision",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> QwenVLBackbone:
    """Load a Qwen2-VL / Qwen2.5-VL directory in the published layout (e.g. a download of
    ``Qwen/Qwen2-VL-7B-Instruct``); ``min_pixels``/``max_pixels`` override the image
    processor's bounds on an image's resized area (and so on its visual-token count)."""
    import transformers
    from transformers import AutoImageProcessor

    spec = VARIANTS[variant]
    if model_path is None:
        raise UserError(f"the {variant} backbone needs a model path (a {spec.model_class} directory)")
    path = Path(model_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; expected a {variant} model directory")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != variant:
        raise UserError(f"{config_file}: model_type {model_type!r} is not {variant!r}")
    model = getattr(transformers, spec.model_class).from_pretrained(path, dtype=resolve_dtype(dtype))
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    processor = processor_class(spec).from_pretrained(path)
    bounds = {name: int(value) for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if value is not None}
    if bounds:
        processor.image_processor = AutoImageProcessor.from_pretrained(path, **bounds)
    return QwenVLBackbone(model, processor, spec, feature=feature, model_id=str(model_path))
