"""Registers the ``minigpt4`` backbone; heavy modules are imported only when it is used."""

from __future__ import annotations

from mllm_pib.spec import BackboneSpec
from mllm_pib.hookspecs import hookimpl


def load(model_path=None, **options):
    """Load MiniGPT-4; see :func:`mllm_pib_minigpt4.backbone.load`."""
    from .backbone import load as load_backbone

    return load_backbone(model_path, **options)


def write_tiny(out_dir, seed=0, **options):
    """Write a tiny random MiniGPT-4; see :func:`mllm_pib_minigpt4.tiny.write_tiny`."""
    from .tiny import write_tiny as write

    write(out_dir, seed=seed, **options)


OPTIONS = {
    "feature": "PIB vision features: vit (ViT after ln_vision, 257x1408, default), qformer "
    "(Q-Former output, 32x768, v1 only) or projected (llama_proj output, 32/64 x H)",
    "variant": "v1 (Vicuna, Q-Former) or llama2 (no Q-Former); with the pieces below, "
    "inferred from llama_proj when omitted; for write_tiny, the tiny model's variant",
    "blip2_path": "transformers BLIP-2 checkpoint directory (vision tower, Q-Former, query tokens)",
    "proj_path": "MiniGPT-4 .pth holding llama_proj",
    "llm_path": "transformers Vicuna / Llama-2-chat directory",
}


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(
            name="minigpt4",
            description="MiniGPT-4: EVA-ViT-g (+ BLIP-2 Q-Former for v1) + llama_proj + Vicuna / Llama-2",
            load=load,
            options=OPTIONS,
            write_tiny=write_tiny,
            model_types=("minigpt4",),  # the directory save_pretrained writes; the pieces have no config.json of their own
        )
    ]
