"""Registers the backbones of current open VLMs from transformers with mllm-pib."""

from __future__ import annotations

from functools import partial

from mllm_pib.hookspecs import hookimpl
from mllm_pib.spec import BackboneSpec

QWEN_OPTIONS = {
    "feature": "PIB vision features: vision (ViT patch features before the merger; default) | projector "
               "(the merger's output, the LLM's visual tokens)",
    "min_pixels": "smallest resized image area in pixels (default: the checkpoint's; sets the fewest visual tokens)",
    "max_pixels": "largest resized image area in pixels (default: the checkpoint's; sets the most visual tokens)",
    "corpus": "tiny models only: texts the tokenizer is trained on (default: a small built-in corpus)",
}


def _load_qwen(variant, model_path=None, **options):
    from mllm_pib_hf.qwen2_vl import load

    return load(model_path, variant=variant, **options)


def _write_tiny_qwen(variant, out_dir, **options):
    from mllm_pib_hf.qwen2_vl_tiny import write_tiny

    return write_tiny(out_dir, variant=variant, **options)


def _qwen_spec(name: str, description: str) -> BackboneSpec:
    return BackboneSpec(
        name=name, description=description, load=partial(_load_qwen, name), options=QWEN_OPTIONS,
        write_tiny=partial(_write_tiny_qwen, name), model_types=(name,),
    )


@hookimpl
def mllm_pib_register_backbones():
    return [
        _qwen_spec("qwen2_vl", "Qwen2-VL (dynamic-resolution ViT + patch merger + Qwen2, M-RoPE), Qwen/Qwen2-VL-*-Instruct"),
        _qwen_spec("qwen2_5_vl", "Qwen2.5-VL (windowed ViT + patch merger + Qwen2.5, M-RoPE), Qwen/Qwen2.5-VL-*-Instruct"),
    ]
