"""Tiny random MiniGPT-4 models for tests, tiny configs and benchmarks.

Same classes and layout as the real model, a few thousand times smaller: EVA-ViT-like tower of
width 32 (2 layers, patch 8; 32 px -> 16 patches for ``v1``, 48 px -> 36 patches -> 9 merged
tokens for ``llama2``), Q-Former of width 32 with 8 queries, LLaMA of width 64 (2 layers), and a
LLaMA-style (SentencePiece, byte fallback) tokenizer trained locally with ``<ImageHere>`` added
as a special token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mllm_pib.tokenizer import train_llama_tokenizer
from torch import nn

from .configuration import VARIANTS, MiniGPT4Config
from .modeling import MiniGPT4ForConditionalGeneration
from .persistence import save_model_dir
from .processing import minigpt4_image_processor
from .template import IMAGE_PLACEHOLDER

IMAGE_SIZES = {"v1": 32, "llama2": 48}


def tiny_vision_config(variant: str) -> dict:
    # Blip2VisionConfig's default initializer_range (1e-10) would make a random tower image-blind.
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZES[variant], patch_size=8, initializer_range=0.02)


def tiny_qformer_config() -> dict:
    # MiniGPT-4 never runs its frozen Q-Former in train mode: no dropout (BLIP-2's default is 0.1).
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_text_config(tokenizer) -> dict:
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_tokenizer():
    """A LLaMA-style tokenizer with ``<ImageHere>`` as an added special token, shaped like the
    published ones: Vicuna v0 and Llama-2-chat have no pad token, and transformers reads their
    ``legacy`` (absent for Vicuna v0, ``false`` for Llama-2-chat) as ``False``."""
    return train_llama_tokenizer(legacy=False, pad_token=None, extra_special_tokens=[IMAGE_PLACEHOLDER])


def jitter_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Add Gaussian noise to every parameter, so that no norm is the identity, no bias and no
    query token is zero, and every piece of the model visibly changes its output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(std * noise.to(parameter.dtype))
    return module


def tiny_model(variant: str = "v1", seed: int = 0, tokenizer=None) -> MiniGPT4ForConditionalGeneration:
    """A tiny random MiniGPT-4 (eval mode) for ``tokenizer`` (a new :func:`tiny_tokenizer` if None)."""
    if variant not in VARIANTS:
        raise ValueError(f"MiniGPT-4 variant must be one of {VARIANTS}, got {variant!r}")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = MiniGPT4Config(
        variant=variant,
        vision_config=tiny_vision_config(variant),
        qformer_config=tiny_qformer_config() if variant == "v1" else None,
        text_config=tiny_text_config(tokenizer),
        num_query_tokens=8,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniGPT4ForConditionalGeneration(config)
    return jitter_(model, seed).eval()


def write_tiny(out_dir: str | Path, seed: int = 0, variant: str = "v1") -> None:
    """Write a tiny random MiniGPT-4 that ``load(out_dir)`` reads.

    Args:
        out_dir: directory to write (replaced if it exists).
        seed: seed of the random weights.
        variant: ``"v1"`` (with Q-Former) or ``"llama2"`` (merged ViT patches).
    """
    tokenizer = tiny_tokenizer()
    model = tiny_model(variant, seed, tokenizer)
    image_processor = minigpt4_image_processor(model.config.vision_config.image_size)
    save_model_dir(out_dir, model, tokenizer, image_processor)
