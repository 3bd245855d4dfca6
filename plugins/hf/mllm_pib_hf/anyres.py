"""The LLaVA anyres family (LLaVA-NeXT, LLaVA-OneVision) as mllm-pib backbones.

Both split an image into a base view plus a grid of tiles, encode every tile with the vision
tower, project, unpad to the image's aspect ratio (OneVision then pools a grid larger than
``anyres_max_9`` allows) and add an ``image_newline`` embedding after each feature row. The
number of visual tokens therefore depends on the image size. Everything runs on the
transformers model's own ``get_image_features`` (which packs the tiles); this module only pads
the per-image results into a batch with their validity masks.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from mllm_pib.backbone import VisionFeatures, pad_visual
from mllm_pib_hf.base import HFBackbone


class AnyresBackbone(HFBackbone):
    """A LLaVA anyres model (``Llava{Next,Onevision}ForConditionalGeneration``) + its processor.

    Feature options: the vision tower's selected-layer patch features of all tiles (base view
    first; the first option, named after the tower) or ``projector``: the visual tokens exactly as
    the LLM receives them (projected, unpadded, pooled, with the newline tokens).
    """

    # the modeling module's image_size_to_num_patches(image_size, grid_pinpoints, patch_size)
    num_views: ClassVar[Callable[..., int]]

    def tower_width(self) -> int:
        config = self.model.config
        return config.vision_config.hidden_size * _layer_count(config.vision_feature_layer)

    def parts(self):
        inner = self.model.model
        return {
            "vision": inner.vision_tower,
            # the newline embedding is part of what the projector side gives the LLM
            "projector": _Projector(inner.multi_modal_projector, inner.image_newline),
            "llm": inner.language_model,
            "lm_head": self.model.lm_head,
        }

    def encode_vision(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, **image_inputs) -> VisionFeatures:
        out = self.model.model.get_image_features(
            pixel_values, image_sizes, output_hidden_states=True, return_dict=True, **image_inputs
        )
        llm, llm_mask = pad_visual(list(out.pooler_output))
        if self.feature == "projector":
            return VisionFeatures(pib=llm, llm=llm, pib_mask=llm_mask, llm_mask=llm_mask)
        pib, pib_mask = pad_visual(self._tower_features(out.hidden_states, image_sizes))
        return VisionFeatures(pib=pib, llm=llm, pib_mask=pib_mask, llm_mask=llm_mask)

    def _tower_features(self, hidden_states, image_sizes) -> list[torch.Tensor]:
        """The selected layer(s) of every tile, CLS dropped as the model does, per image
        ``[tiles * patches, Dv]``."""
        config = self.model.config
        layers = config.vision_feature_layer
        selected = (hidden_states[layers] if isinstance(layers, int)
                    else torch.cat([hidden_states[i] for i in layers], dim=-1))
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        tiles = [self.tiles(size) for size in image_sizes]
        return [image.flatten(0, 1) for image in torch.split(selected, tiles, dim=0)]

    def tiles(self, image_size) -> int:
        """How many views (base + grid tiles) the model encodes for an image of ``(H, W)``."""
        config = self.model.config
        return type(self).num_views(image_size=image_size, grid_pinpoints=config.image_grid_pinpoints,
                                    patch_size=config.vision_config.image_size)


class _Projector(torch.nn.Module):
    """The projector MLP and the newline embedding, as one part for the freezing policy."""

    def __init__(self, mlp: torch.nn.Module, newline: torch.nn.Parameter):
        super().__init__()
        self.mlp = mlp
        self.newline = newline


def _layer_count(layers) -> int:
    return 1 if isinstance(layers, int) else len(layers)
