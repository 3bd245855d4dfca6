"""LLaVA-1.5 as an mllm-pib backbone, on ``transformers.LlavaForConditionalGeneration``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mllm_pib.backbone import DecoderBackbone, PromptTemplate, VisionFeatures, resolve_dtype
from mllm_pib.errors import UserError

# LLaVA v1 conversation template (``conv_vicuna_v1``), single turn.
LLAVA_V1 = PromptTemplate(
    prompt=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: {image}\n{question} ASSISTANT:"
    ),
    answer=" {answer}</s>",
)
FEATURES = ("clip", "projector")


class LlavaBackbone(DecoderBackbone):
    """LLaVA-1.5: CLIP tower (layer -2, CLS dropped) -> 2-layer MLP projector -> LLaMA.

    ``feature="clip"`` gives the PIB the CLIP patch features (576 x 1024 at 336 px), as the
    research used; ``"projector"`` the projector output (576 x H).
    """

    name = "llava"
    feature_choices = FEATURES

    def __init__(self, model, processor, feature: str = "clip", model_id: str = ""):
        super().__init__()
        if feature not in FEATURES:
            raise UserError(f"unknown llava feature {feature!r}; choose one of {', '.join(FEATURES)}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        config = model.config
        self.feature = feature
        self.model_id = model_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.image_token_id = config.image_token_id
        self.decoder = model.model.language_model
        self._lm_head = model.lm_head
        self.template = LLAVA_V1
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        self.num_image_tokens = patches + (0 if config.vision_feature_select_strategy == "default" else 1)
        self.hidden_size = config.text_config.hidden_size
        self.pib_vision_size = vision.hidden_size if feature == "clip" else self.hidden_size

    def parts(self):
        inner = self.model.model
        return {
            "vision": inner.vision_tower,
            "projector": inner.multi_modal_projector,
            "llm": inner.language_model,
            "lm_head": self.model.lm_head,
        }

    def preprocess(self, images: list[Image.Image], questions: list[str] | None = None) -> dict:
        """LLaVA-1.5 preprocessing: pad to a square with the mean colour, then CLIP's."""
        fill = tuple(int(255 * m) for m in self.image_processor.image_mean)
        squares = [pad_to_square(image.convert("RGB"), fill) for image in images]
        pixels = self.image_processor(squares, return_tensors="pt").pixel_values
        return {"pixel_values": pixels.to(self.model.device, self.model.dtype)}

    def encode_vision(self, pixel_values: torch.Tensor) -> VisionFeatures:
        config = self.model.config
        tower = self.model.model.vision_tower(pixel_values, output_hidden_states=True)
        selected = tower.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = self.model.model.multi_modal_projector(selected)
        return VisionFeatures(pib=selected if self.feature == "clip" else projected, llm=projected)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA-1.5 ``pad`` aspect)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load(
    model_path: str | None,
    *,
    feature: str = "clip",
    vision_tower: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> LlavaBackbone:
    """Load LLaVA-1.5 from a llava-hf directory or an original (liuhaotian) checkpoint."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm_pib_llava.checkpoints import is_original_layout, load_original

    if model_path is None:
        raise UserError("the llava backbone needs a model path (a llava-hf or original LLaVA-1.5 directory)")
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; expected a llava-hf or original LLaVA-1.5 model directory")
    dtype = resolve_dtype(dtype)
    if is_original_layout(path):
        model, processor = load_original(path, vision_tower=vision_tower, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    return LlavaBackbone(model, processor, feature=feature, model_id=str(model_path))
