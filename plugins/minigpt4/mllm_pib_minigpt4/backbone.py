"""MiniGPT-4 as an mllm-pib backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mllm_pib.backbone import DecoderBackbone, VisionFeatures, resolve_dtype
from mllm_pib.errors import UserError
from torch import nn

from .modeling import MiniGPT4ForConditionalGeneration
from .template import IMAGE_PLACEHOLDER, stop_sequences, template

FEATURES = ("vit", "qformer", "projected")
DEFAULT_FEATURE = "vit"


def check_feature(feature: str, variant: str | None = None) -> None:
    """Refuse an unknown feature, and ``qformer`` for the variant without a Q-Former."""
    if feature not in FEATURES:
        raise UserError(f"unknown minigpt4 feature {feature!r}; choose one of {', '.join(FEATURES)}")
    if feature == "qformer" and variant == "llama2":
        raise UserError("feature 'qformer' needs a Q-Former, which the MiniGPT-4 llama2 variant does "
                        "not have; choose feature 'vit' or 'projected'")


class QFormerPart(nn.Module):
    """The Q-Former with its learned queries, as one part for the freezing policy."""

    def __init__(self, qformer: nn.Module, query_tokens: nn.Parameter):
        super().__init__()
        self.qformer = qformer
        self.query_tokens = query_tokens


class MiniGPT4Backbone(DecoderBackbone):
    """MiniGPT-4 (``v1`` Vicuna with Q-Former, or ``llama2`` without) cut before ``lm_head``.

    PIB features (option ``feature``):

    - ``vit`` (default): EVA-ViT-g output after ``ln_vision``, CLS included: ``[B, 257, 1408]``.
    - ``qformer``: Q-Former output ``[B, 32, 768]`` (``v1`` only).
    - ``projected``: ``llama_proj`` output, the LLM's visual tokens: ``[B, 32 or 64, H]``.

    Answers end as MiniGPT-4 trained them, and that end is scored: ``###`` for ``v1`` (Vicuna),
    ``</s>`` for ``llama2``. Generation stops at ``</s>`` and, for ``v1``, at any form of ``###``.

    Args:
        model: the plain :class:`MiniGPT4ForConditionalGeneration`.
        tokenizer: its tokenizer, holding the ``<ImageHere>`` placeholder.
        image_processor: its image processor.
        feature: which vision features the PIB reads.
        model_id: identity of the base weights, recorded in checkpoints.
    """

    name = "minigpt4"
    feature_choices = FEATURES

    def __init__(
        self,
        model: MiniGPT4ForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any,
        *,
        feature: str = DEFAULT_FEATURE,
        model_id: str = "",
    ):
        super().__init__()
        config = model.config
        check_feature(feature, config.variant)
        if config.image_token_id is None or config.image_token_id >= len(tokenizer):
            raise UserError(f"the MiniGPT-4 config's image_token_id {config.image_token_id} is not a "
                            "token of its tokenizer; the model and tokenizer do not belong together")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature = feature
        self.model_id = model_id
        self.variant = config.variant
        self.image_token_id = config.image_token_id
        self.image_token = IMAGE_PLACEHOLDER
        self.template = template(config.variant, tokenizer)
        self.num_image_tokens = config.num_image_tokens
        self.hidden_size = config.text_config.hidden_size
        self.pib_vision_size = {
            "vit": config.vision_config.hidden_size,
            "qformer": config.qformer_config.hidden_size if config.qformer_config else None,
            "projected": config.text_config.hidden_size,
        }[feature]
        self.eval()

    @property
    def decoder(self) -> nn.Module:
        return self.model.language_model.model

    @property
    def _lm_head(self) -> nn.Module:
        return self.model.language_model.lm_head

    # --- vision -----------------------------------------------------------------------------
    def preprocess(self, images: list, questions: list[str]) -> dict[str, torch.Tensor]:
        """Pixel values of the images (MiniGPT-4's vision side does not read the question)."""
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}

    def encode_vision(self, pixel_values: torch.Tensor, **vision_inputs) -> VisionFeatures:
        vision = self.model.vision_model
        pixel_values = pixel_values.to(device=vision.device, dtype=vision.dtype)
        features = self.model.get_image_features(pixel_values)
        return VisionFeatures(pib=getattr(features, self.feature), llm=features.projected)

    # --- template ---------------------------------------------------------------------------
    @property
    def stop_sequences(self) -> list[list[int]]:
        return stop_sequences(self.tokenizer, self.variant)

    # --- parts and persistence --------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        parts = {"vision": self.model.vision_model}
        if self.model.qformer is not None:
            parts["qformer"] = QFormerPart(self.model.qformer, self.model.query_tokens)
        parts.update(projector=self.model.llama_proj, llm=self.decoder, lm_head=self.lm_head)
        return parts

    def save_pretrained(self, path: str) -> None:
        from .persistence import save_model_dir

        save_model_dir(path, self.model, self.tokenizer, self.image_processor)


def load(
    model_path: str | Path | None = None,
    *,
    feature: str = DEFAULT_FEATURE,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    blip2_path: str | Path | None = None,
    proj_path: str | Path | None = None,
    llm_path: str | Path | None = None,
) -> MiniGPT4Backbone:
    """Load a MiniGPT-4 backbone.

    Either from ``model_path``, a directory written by :meth:`MiniGPT4Backbone.save_pretrained`
    (or ``write_tiny``), or assembled from the published pieces: ``blip2_path`` (transformers
    BLIP-2 directory), ``proj_path`` (MiniGPT-4 ``.pth`` with ``llama_proj``) and ``llm_path``
    (transformers Vicuna / Llama-2-chat directory); ``variant`` (``v1``/``llama2``) is inferred from
    ``llama_proj`` when omitted; ``model_path`` is then ``None`` (or empty).

    Args:
        feature: PIB vision features: ``vit`` (default), ``qformer`` (``v1`` only), ``projected``.
        dtype: model dtype; by default the checkpoint's.
        device: where to put the model.
    """
    check_feature(feature, variant)
    dtype = resolve_dtype(dtype, default=None)  # None keeps the checkpoint's
    pieces = {"blip2_path": blip2_path, "proj_path": proj_path, "llm_path": llm_path}
    given = [name for name, value in pieces.items() if value is not None]
    if model_path:
        if given or variant is not None:
            raise UserError(f"pass either a MiniGPT-4 model path ({model_path}) or the pieces "
                            "blip2_path=, proj_path=, llm_path= (with variant=), not both")
        from .persistence import load_model_dir

        model, tokenizer, image_processor = load_model_dir(model_path, dtype)
        model_id = str(model_path)
    else:
        missing = [name for name in pieces if name not in given]
        if missing:
            raise UserError("the minigpt4 backbone needs a model path, or all of blip2_path=, "
                            f"proj_path= and llm_path=; missing: {', '.join(missing)}")
        from .checkpoints import assemble

        model, tokenizer, image_processor = assemble(
            blip2_path, proj_path, llm_path, variant=variant, dtype=dtype
        )
        model_id = f"minigpt4:{blip2_path}+{proj_path}+{llm_path}"
    backbone = MiniGPT4Backbone(model, tokenizer, image_processor, feature=feature, model_id=model_id)
    if device is not None:
        backbone.to(device)
    return backbone
