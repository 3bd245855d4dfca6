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
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from mllm_pib.backbone import DecoderBackbone, VisionFeatures, position_ids_from_mask, resolve_dtype
from mllm_pib.errors import UserError
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


class QwenVLBackbone(DecoderBackbone):
    """Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT -> patch merger -> Qwen2 decoder (M-RoPE).

    ``feature="vision"`` gives the PIB the ViT's patch features before the merger (4 per visual
    token, ``[N_patches, D_vision]`` per image); ``"merger"`` the merged tokens the LLM receives
    (``[N_patches / 4, H]``). Images of a batch give different counts: both come padded with
    validity masks, and each image's patch grid travels in ``VisionFeatures.extra``.
    """

    feature_choices = FEATURES

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
        self.image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.decoder = model.model.language_model
        self._lm_head = model.lm_head
        self.merge_size = config.vision_config.spatial_merge_size
        self.hidden_size = config.text_config.hidden_size
        vision_width = getattr(config.vision_config, variant.vision_width)
        self.pib_vision_size = vision_width if feature == "vision" else self.hidden_size
        self.eos_token_ids = _as_list(model.generation_config.eos_token_id) or [self.tokenizer.eos_token_id]

    def parts(self):
        inner = self.model.model
        return {
            "vision": inner.visual,
            "projector": inner.visual.merger,
            "llm": inner.language_model,
            "lm_head": self.model.lm_head,
        }

    # --- template ---------------------------------------------------------------------------
    def prompt_ids(self, question: str, image: Any = None) -> list[int]:
        if image is None:
            raise ValueError(f"{self.name} prompts need their image: its size sets the number of visual tokens")
        text = self.processor.apply_chat_template(_conversation(question), add_generation_prompt=True, tokenize=False)
        return self.processor(text=[text], images=[image.convert("RGB")])["input_ids"][0]

    def answer_ids(self, answer: str) -> list[int]:
        # the ids the chat template gives the assistant turn, through its end-of-turn token
        turn = self.processor.apply_chat_template(_conversation("", answer), tokenize=False)
        prompt = self.processor.apply_chat_template(_conversation(""), add_generation_prompt=True, tokenize=False)
        if not turn.startswith(prompt):
            raise ValueError(f"the chat template does not continue its generation prompt with the answer {answer!r}")
        ids = self.tokenizer(turn[len(prompt):], add_special_tokens=False).input_ids
        end = next((i for i, token in enumerate(ids) if token in self.eos_token_ids), None)
        if end is None:
            raise ValueError("the chat template ends the assistant turn without an end-of-turn token")
        return ids[: end + 1]

    @property
    def stop_sequences(self) -> list[list[int]]:
        return [[token] for token in self.eos_token_ids]

    # --- vision -----------------------------------------------------------------------------
    def preprocess(self, images: list, questions: list[str] | None = None) -> dict:
        """The processor's patches (all images' patches in one ``[N, C*2*14*14]`` tensor) and
        each image's patch grid ``[B, 3]``."""
        out = self.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
        visual = self.model.model.visual
        return {"pixel_values": out["pixel_values"].to(visual.device, visual.dtype),
                "image_grid_thw": out["image_grid_thw"].to(visual.device)}

    def encode_vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        visual = self.model.model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
        patches = out.last_hidden_state
        if self.variant.windowed:
            patches = self._patch_order(patches, image_grid_thw)
        counts = image_grid_thw.prod(-1)
        merged, merged_mask = _pad_split(out.pooler_output, counts // self.merge_size**2)
        if self.feature == "vision":
            pib, pib_mask = _pad_split(patches, counts)
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
        save_processor(self.processor, path)


def _conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _pad_split(rows: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[sum(counts), D]`` -> ``[B, max(counts), D]`` zero-padded, and the ``[B, max]`` validity mask."""
    counts = counts.tolist()
    padded = pad_sequence(list(rows.split(counts)), batch_first=True)
    mask = torch.arange(padded.shape[1], device=rows.device)[None] < torch.tensor(counts, device=rows.device)[:, None]
    return padded, mask


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def images_only_processor(variant: Variant, image_processor, tokenizer, chat_template: str | None):
    """The variant's processor without its video processor: videos are not used here, and
    transformers' video processor needs torchvision (which this stack must not install)."""
    import transformers

    base = getattr(transformers, variant.processor_class)

    class ImagesOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = variant.processor_class
    return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def save_processor(processor, path: str) -> None:
    """Write the processor in the published layout: tokenizer files, ``preprocessor_config.json``
    and ``chat_template.json``."""
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    target = Path(path) / "chat_template.json"
    target.write_text(json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n")


def load_processor(variant: Variant, path: Path, **image_options):
    from transformers import AutoImageProcessor, AutoTokenizer

    template_file = path / "chat_template.json"
    template = json.loads(template_file.read_text())["chat_template"] if template_file.is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if template is None:
        template = tokenizer.chat_template
    if template is None:
        raise UserError(f"{path}: no chat template (chat_template.json or the tokenizer's); {variant.name} prompts need it")
    image_processor = AutoImageProcessor.from_pretrained(path, **image_options)
    return images_only_processor(variant, image_processor, tokenizer, template)


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
    bounds = {name: int(value) for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if value is not None}
    processor = load_processor(spec, path, **bounds)
    return QwenVLBackbone(model, processor, spec, feature=feature, model_id=str(model_path))
