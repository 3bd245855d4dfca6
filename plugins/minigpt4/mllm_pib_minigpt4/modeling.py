"""MiniGPT-4 as a transformers model, built from transformers' own BLIP-2 and LLaMA classes.

The published model (Vision-CAIR/MiniGPT-4) encodes an image as
``inputs_llama = llama_proj(Q-Former(ln_vision(EVA-ViT-g(image))))`` (``v1``, Vicuna) or
``llama_proj(concat4(ln_vision(EVA-ViT-g(image))[:, 1:]))`` (``llama2``) and splices these visual
tokens into the prompt embeddings where ``<ImageHere>`` stands. Here:

- ``vision_model`` is a ``Blip2VisionModel``; its ``post_layernorm`` *is* MiniGPT-4's ``ln_vision``
  (LAVIS's EVA-ViT-g has no final norm of its own; transformers' BLIP-2 conversion stores
  ``ln_vision`` as ``vision_model.post_layernorm``), with ``ln_vision``'s epsilon
  (``config.ln_vision_eps``), so its ``last_hidden_state`` is ``ln_vision(ViT(image))``.
- ``qformer`` + ``query_tokens`` are BLIP-2's (``v1`` only), ``llama_proj`` is MiniGPT-4's linear
  layer, ``language_model`` is a ``LlamaForCausalLM``.

Parameter names follow the published pieces (``vision_model.*``, ``qformer.*``, ``query_tokens`` as
in transformers BLIP-2 checkpoints; ``llama_proj.*`` as in MiniGPT-4's ``.pth``), so assembling a
model from them is a prefix mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Blip2QFormerModel, Blip2VisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration import MiniGPT4Config


@dataclass
class MiniGPT4ImageFeatures(ModelOutput):
    """The stages of MiniGPT-4's image encoding.

    Args:
        vit: ``[B, 1 + P, Dv]`` ViT output after ``ln_vision`` (CLS first).
        qformer: ``[B, Q, Dq]`` Q-Former output (``None`` for ``llama2``).
        projected: ``[B, M, H]`` ``llama_proj`` output: the visual tokens of the LLM input.
    """

    vit: torch.Tensor | None = None
    qformer: torch.Tensor | None = None
    projected: torch.Tensor | None = None


class MiniGPT4PreTrainedModel(PreTrainedModel):
    config_class = MiniGPT4Config  # explicit: postponed annotations make `config:` a string
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer", "LlamaDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MiniGPT4ForConditionalGeneration) and module.query_tokens is not None:
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)


class MiniGPT4ForConditionalGeneration(MiniGPT4PreTrainedModel):
    """MiniGPT-4: the plain model whose logits the backbone must reproduce.

    ``forward(input_ids, pixel_values, attention_mask)`` expects prompts whose ``<ImageHere>``
    placeholder is already expanded to ``config.num_image_tokens`` tokens per image.
    """

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps
        if config.variant == "v1":
            self.query_tokens = nn.Parameter(
                torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
            )
            self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        else:
            self.query_tokens = None
            self.qformer = None
        self.llama_proj = nn.Linear(config.projector_input_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> MiniGPT4ImageFeatures:
        """Encode ``[B, 3, S, S]`` images; see :class:`MiniGPT4ImageFeatures`."""
        vit = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if self.config.variant == "v1":
            queries = self.query_tokens.expand(vit.shape[0], -1, -1)
            qformer = self.qformer(query_embeds=queries, encoder_hidden_states=vit).last_hidden_state
            projected = self.llama_proj(qformer.to(self.llama_proj.weight.dtype))
            return MiniGPT4ImageFeatures(vit=vit, qformer=qformer, projected=projected)
        patches = vit[:, 1:, :]
        merged = patches.reshape(
            patches.shape[0], -1, patches.shape[-1] * self.config.num_merged_patches
        )
        return MiniGPT4ImageFeatures(vit=vit, projected=self.llama_proj(merged))

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Prompt ids with `config.num_image_tokens` placeholder ids per image (one image per row).
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, image_size, image_size)`, *optional*):
            The images; required when `input_ids` holds placeholders.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for (left) padding.
        position_ids (`torch.LongTensor`, *optional*):
            Defaults to counting real tokens only, as generation with left padding does.
        """
        embeds = self.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.config.image_token_id
        if placeholders.any():
            if pixel_values is None:
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            visual = self.get_image_features(pixel_values).projected
            if int(placeholders.sum()) != visual.shape[0] * visual.shape[1]:
                raise ValueError(
                    f"input_ids hold {int(placeholders.sum())} image placeholders, the images give "
                    f"{visual.shape[0] * visual.shape[1]} visual tokens"
                )
            embeds = embeds.clone()
            embeds[placeholders] = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
        if position_ids is None and attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = positions[:, -input_ids.shape[1] :]
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )


__all__ = ["MiniGPT4ForConditionalGeneration", "MiniGPT4ImageFeatures", "MiniGPT4PreTrainedModel"]
