"""Registers this distribution's backbones with mllm-pib (imports no model code)."""

from __future__ import annotations

from functools import partial
from importlib import import_module

from mllm_pib.hookspecs import hookimpl
from mllm_pib.spec import BackboneSpec

TINY = "tiny models only: "
QWEN_OPTIONS = {
    "feature": "PIB vision features: vision (ViT patch features before the merger; default) | projector "
               "(the merger's output, the LLM's visual tokens)",
    "min_pixels": "smallest resized image area in pixels (default: the checkpoint's; sets the fewest visual tokens)",
    "max_pixels": "largest resized image area in pixels (default: the checkpoint's; sets the most visual tokens)",
    "corpus": TINY + "texts the tokenizer is trained on",
    "vocab_size": TINY + "trained tokenizer size",
}


def _lazy(module: str, function: str):
    def call(*args, **kwargs):
        return getattr(import_module(f"mllm_pib_hf.{module}"), function)(*args, **kwargs)
    return call


def _qwen(name: str, description: str) -> BackboneSpec:
    """Qwen2-VL and Qwen2.5-VL share one implementation; ``variant`` picks the classes."""
    return BackboneSpec(
        name=name, description=description, load=partial(_lazy("qwen2_vl", "load"), variant=name),
        options=QWEN_OPTIONS, write_tiny=partial(_lazy("qwen2_vl_tiny", "write_tiny"), variant=name),
        model_types=(name,),
    )


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(
            name="llava_next",
            description="LLaVA-NeXT / LLaVA-1.6 (CLIP anyres tiles + image_newline + Mistral), llava-hf layout",
            load=_lazy("llava_next", "load"),
            options={
                "feature": "PIB vision features: clip (layer -2 patches of every tile, CLS dropped; default) | projector",
                "corpus": TINY + "texts the tokenizer is trained on",
                "legacy": TINY + "the Llama tokenizer's legacy setting (default true)",
                "vocab_size": TINY + "trained tokenizer size",
            },
            write_tiny=_lazy("llava_next", "write_tiny"),
            model_types=("llava_next",),
        ),
        BackboneSpec(
            name="llava_onevision",
            description="LLaVA-OneVision (SigLIP anyres_max_9 tiles + image_newline + Qwen2), llava-hf layout",
            load=_lazy("llava_onevision", "load"),
            options={
                "feature": "PIB vision features: siglip (last-layer patches of every tile; default) | projector",
                "corpus": TINY + "texts the tokenizer is trained on",
                "vocab_size": TINY + "trained tokenizer size",
            },
            write_tiny=_lazy("llava_onevision", "write_tiny"),
            model_types=("llava_onevision",),
        ),
        _qwen("qwen2_vl", "Qwen2-VL (dynamic-resolution ViT + patch merger + Qwen2, M-RoPE), published layout"),
        _qwen("qwen2_5_vl", "Qwen2.5-VL (windowed ViT + patch merger + Qwen2.5, M-RoPE), published layout"),
    ]
