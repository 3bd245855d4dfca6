"""Registers this distribution's backbones with mllm-pib (imports no model code)."""

from __future__ import annotations

from importlib import import_module

from mllm_pib.hookspecs import hookimpl
from mllm_pib.spec import BackboneSpec

TINY_OPTIONS = {
    "corpus": "texts the tokenizer is trained on",
    "vocab_size": "trained tokenizer size",
}
QWEN_OPTIONS = {
    "min_pixels": "smallest resized image area in pixels (default: the checkpoint's; sets the fewest visual tokens)",
    "max_pixels": "largest resized image area in pixels (default: the checkpoint's; sets the most visual tokens)",
}
IDEFICS3_FEATURES = "siglip (tower patches of every tile; default) | projector (the pixel-shuffled, projected tokens)"
QWEN_FEATURES = "vision (ViT patch features before the merger; default) | projector (the merger's output)"
# name -> (description, feature option help, other load options, tiny-model options besides TINY_OPTIONS)
BACKBONES = {
    "llava_next": (
        "LLaVA-NeXT / LLaVA-1.6 (CLIP anyres tiles + image_newline + Mistral), llava-hf layout",
        "clip (layer -2 patches of every tile, CLS dropped; default) | projector",
        {}, {"legacy": "the Llama tokenizer's legacy setting (default true)"},
    ),
    "llava_onevision": (
        "LLaVA-OneVision (SigLIP anyres_max_9 tiles + image_newline + Qwen2), llava-hf layout",
        "siglip (last-layer patches of every tile; default) | projector",
        {}, {},
    ),
    "gemma3": (
        "Gemma 3 (SigLIP 896 px pooled to 256 tokens, bidirectional over the image), Google layout",
        "siglip (tower output, 4096 patches; default) | projector (the 256 tokens)",
        {}, {},
    ),
    "qwen2_vl": (
        "Qwen2-VL (dynamic-resolution ViT + patch merger + Qwen2, M-RoPE), published layout",
        QWEN_FEATURES, QWEN_OPTIONS, {},
    ),
    "qwen2_5_vl": (
        "Qwen2.5-VL (windowed ViT + patch merger + Qwen2.5, M-RoPE), published layout",
        QWEN_FEATURES, QWEN_OPTIONS, {},
    ),
    "idefics3": (
        "Idefics3 (SigLIP on split tiles + global view, pixel shuffle, Llama 3), published layout",
        IDEFICS3_FEATURES, {}, {},
    ),
    "smolvlm": (
        "SmolVLM2 (model_type smolvlm) and SmolVLM-Instruct (model_type idefics3: named with --backbone), "
        "Idefics3 with SmolLM2",
        IDEFICS3_FEATURES, {},
        {"layout": "smolvlm (SmolVLM2's classes; default) | idefics3 (SmolVLM-Instruct's)"},
    ),
}


def _lazy(module: str, function: str):
    def call(*args, **kwargs):
        return getattr(import_module(f"mllm_pib_hf.{module}"), function)(*args, **kwargs)
    return call


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(
            name=name, description=description, load=_lazy(name, "load"),
            options={"feature": f"PIB vision features: {feature}", **load_options},
            write_tiny=_lazy(name, "write_tiny"), model_types=(name,), tiny_options={**TINY_OPTIONS, **tiny},
        )
        for name, (description, feature, load_options, tiny) in BACKBONES.items()
    ]
