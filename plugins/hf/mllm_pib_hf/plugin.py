"""Registers this distribution's backbones with mllm-pib (imports no model code)."""

from __future__ import annotations

from importlib import import_module

from mllm_pib.hookspecs import hookimpl
from mllm_pib.spec import BackboneSpec

TINY = "tiny models only: "


def _lazy(module: str, function: str):
    def call(*args, **kwargs):
        return getattr(import_module(f"mllm_pib_hf.{module}"), function)(*args, **kwargs)
    return call


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
    ]
