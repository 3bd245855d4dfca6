"""Qwen2-VL (``Qwen/Qwen2-VL-7B-Instruct``) on ``transformers.Qwen2VLForConditionalGeneration``
and its processor, and what Qwen2.5-VL (:mod:`mllm_pib_hf.qwen2_5_vl`) shares with it.

Both cut the same way: a ViT over 14 px patches at the image's own resolution, a merger that
turns each 2 x 2 patch window into one visual token of the LLM's width, and a Qwen2 decoder with
3-D rotary positions (:mod:`mllm_pib_hf.mrope`). :class:`QwenVLBackbone` holds all of it; a
variant names its transformers classes and overrides what differs (the ViT width's config field
here, the window order of Qwen2.5-VL's ViT output there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from mllm_pib.backbone import VisionFeatures, pad_visual, position_ids_from_mask
from mllm_pib.tokenizer import DEFAULT_CORPUS
from mllm_pib_hf.base import HFBackbone
from mllm_pib_hf.mrope import llm_grids, mrope_positions


class QwenVLBackbone(HFBackbone):
    """Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT -> patch merger -> Qwen2 decoder (M-RoPE).

    ``feature="vision"`` gives the PIB the ViT's patch features before the merger (4 per visual
    token, ``[N_patches, D_vision]`` per image); ``"projector"`` the merger's output, the tokens
    the LLM receives (``[N_patches / 4, H]``). Images of a batch give different counts: both come
    padded with validity masks, and each image's patch grid travels in ``VisionFeatures.extra``.
    """

    feature_choices = ("vision", "projector")
    # the instruct checkpoints end a turn with <|im_end|>; generation also stops at <|endoftext|>
    end_of_turn = ("<|im_end|>", "<|endoftext|>")
    model_class: ClassVar[str]
    processor_class: ClassVar[str]

    def __init__(self, model, processor, feature: str | None = None, model_id: str = ""):
        super().__init__(model, processor, feature, model_id)
        self.merge_size = model.config.vision_config.spatial_merge_size

    def parts(self):
        inner = self.model.model
        # the merger lives inside the ViT module: "vision" is the ViT without it
        tower = nn.ModuleList(module for name, module in inner.visual.named_children() if name != "merger")
        return {"vision": tower, "projector": inner.visual.merger, "llm": inner.language_model,
                "lm_head": self.model.lm_head}

    # --- vision -----------------------------------------------------------------------------
    def encode_vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        visual = self.model.model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
        counts = image_grid_thw.prod(-1).tolist()
        merged, merged_mask = pad_visual(out.pooler_output.split([n // self.merge_size**2 for n in counts]))
        if self.feature == "vision":
            pib, pib_mask = pad_visual(self.patch_features(out.last_hidden_state, image_grid_thw).split(counts))
        else:
            pib, pib_mask = merged, merged_mask
        return VisionFeatures(pib=pib, llm=merged, pib_mask=pib_mask, llm_mask=merged_mask,
                              extra={"image_grid_thw": image_grid_thw})

    def patch_features(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The ViT's output ``[sum N_patches, D]`` in the processor's patch order."""
        return patches

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

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_path: str | None, *, feature: str | None = None, min_pixels: int | None = None,
             max_pixels: int | None = None, dtype=None, device=None) -> "QwenVLBackbone":
        """A directory in the published layout (e.g. a download of ``Qwen/Qwen2-VL-7B-Instruct``);
        ``min_pixels`` / ``max_pixels`` override the image processor's bounds on an image's
        resized area (and so on its visual-token count)."""
        import transformers
        from transformers import AutoImageProcessor

        from mllm_pib_hf.loading import load_published

        backbone = load_published(cls, getattr(transformers, cls.model_class),
                                  getattr(transformers, cls.processor_class), model_path,
                                  feature=feature, dtype=dtype, device=device)
        bounds = {name: int(value) for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                  if value is not None}
        if bounds:
            backbone.processor.image_processor = AutoImageProcessor.from_pretrained(model_path, **bounds)
        return backbone

    @classmethod
    def write_tiny(cls, out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *,
                   vocab_size: int = 512) -> None:
        from mllm_pib_hf.qwen2_vl_tiny import write_tiny

        write_tiny(cls, out_dir, seed, corpus, vocab_size=vocab_size)


class Qwen2VLBackbone(QwenVLBackbone):
    name = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"

    def tower_width(self) -> int:
        return self.model.config.vision_config.embed_dim  # its hidden_size is the merger's output


load = Qwen2VLBackbone.load
write_tiny = Qwen2VLBackbone.write_tiny
