"""Sizes and texts shared by the tiny random models of this distribution."""

from __future__ import annotations

# the words of the chat templates, so that the tiny tokenizers learn them as pieces
TEMPLATE_WORDS = "system user assistant [INST] [/INST] <<SYS>> <</SYS>> You are a helpful assistant."


def tiny_vision_sizes() -> dict:
    """A ViT with 16 px tiles of 4 px patches (16 patches a tile)."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=16, patch_size=4)


def tiny_text_sizes() -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048)
