"""Registers the ``llava`` backbone with mllm-pib."""

from __future__ import annotations

from mllm_pib.spec import BackboneSpec
from mllm_pib.hookspecs import hookimpl


def _load(model_path=None, **options):
    from mllm_pib_llava.backbone import load

    return load(model_path, **options)


def _write_tiny(out_dir, **options):
    from mllm_pib_llava.tiny import write_tiny

    return write_tiny(out_dir, **options)


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(
            name="llava",
            description="LLaVA-1.5 (CLIP ViT-L/14-336 + MLP projector + Vicuna), llava-hf or original layout",
            load=_load,
            options={
                "feature": "PIB vision features: clip (layer -2, CLS dropped; default) | projector",
                "vision_tower": "CLIP tower directory for original (liuhaotian) checkpoints",
            },
            write_tiny=_write_tiny,
            tiny_options={
                "corpus": "texts the tokenizer is trained on (default: a small built-in corpus)",
                "legacy": "the tokenizer's legacy setting (default false, as LLaVA-1.5 publishes it)",
                "tokenizer": "llama (default, shaped like Vicuna's) | byte-level (the demo world's)",
            },
            # llava-hf's config.json, and the original layout's (LLaVA's LlavaConfig saves llava_llama;
            # the published llava-v1.5 checkpoints say llava)
            model_types=("llava", "llava_llama"),
        )
    ]
