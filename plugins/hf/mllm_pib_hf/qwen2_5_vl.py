"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``) on ``transformers.Qwen2_5_VLForConditionalGeneration``
and its processor: Qwen2-VL's backbone (:mod:`mllm_pib_hf.qwen2_vl`) with its windowed ViT."""

from __future__ import annotations

import torch

from mllm_pib_hf.qwen2_vl import QwenVLBackbone


class Qwen2_5_VLBackbone(QwenVLBackbone):
    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"

    def patch_features(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The ViT runs, and returns, its 2 x 2 merge windows reordered by attention window;
        put them back in the processor's order."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge_size,
                                                  window_size=vision.window_size, patch_size=vision.patch_size)
        windows = patches.reshape(-1, self.merge_size**2, patches.shape[-1])
        return windows[torch.argsort(window_index.to(patches.device))].reshape(patches.shape)


load = Qwen2_5_VLBackbone.load
write_tiny = Qwen2_5_VLBackbone.write_tiny
