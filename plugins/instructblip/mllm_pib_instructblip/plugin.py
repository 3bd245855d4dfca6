"""Registers the ``instructblip`` backbone with mllm-pib."""

from __future__ import annotations

from mllm_pib.backbone import BackboneSpec
from mllm_pib.hookspecs import hookimpl


def _load(model_path=None, **options):
    from mllm_pib_instructblip.backbone import load

    return load(model_path, **options)


def _write_tiny(out_dir, **options):
    from mllm_pib_instructblip.tiny import write_tiny

    return write_tiny(out_dir, **options)


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(
            name="instructblip",
            description="InstructBLIP (EVA-ViT-g + Q-Former + Vicuna), transformers or LAVIS layout",
            load=_load,
            options={
                "feature": "PIB vision features: vit (EVA-ViT output after ln_vision, CLS included; "
                "default) | qformer (Q-Former query outputs)",
                "config_path": "LAVIS .pth only: transformers InstructBLIP directory with config.json "
                "and the processor files",
                "llm_path": "LAVIS .pth without llm_model.* weights: the Vicuna (transformers Llama) directory",
                "vit_path": "LAVIS .pth without visual_encoder.* weights: eva_vit_g.pth",
            },
            write_tiny=_write_tiny,
            model_types=("instructblip",),  # the transformers layout; a LAVIS .pth has no config.json
        )
    ]
