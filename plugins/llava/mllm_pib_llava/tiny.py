"""A tiny random LLaVA-1.5 in the llava-hf layout, with a locally trained tokenizer shaped like
Vicuna's (SentencePiece-style ``LlamaTokenizer``, ``legacy`` false as published by default), plus
``<image>`` and ``<pad>`` appended in that order, as llava-hf does. ``tokenizer="byte-level"``
gives the demo world's byte-level BPE instead."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mllm_pib.errors import UserError
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_byte_level_tokenizer, train_llama_tokenizer

IMAGE_TOKEN = "<image>"
TOKENIZERS = ("llama", "byte-level")


def tiny_config(vocab_size: int, image_token_id: int, *, image_size: int = 48, patch_size: int = 8,
                vision_hidden: int = 32, hidden: int = 64, layers: int = 2, heads: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def tiny_tokenizer(corpus: Iterable[str], vocab_size: int, legacy: bool, kind: str):
    if kind == "byte-level":
        return train_byte_level_tokenizer(corpus, vocab_size=vocab_size, extra_special_tokens=[IMAGE_TOKEN])
    if kind != "llama":
        raise UserError(f"unknown tiny llava tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")
    return train_llama_tokenizer(corpus, vocab_size=vocab_size, legacy=legacy, extra_special_tokens=[IMAGE_TOKEN])


def tiny_processor(corpus: Iterable[str], image_size: int, patch_size: int, vocab_size: int = 512,
                   legacy: bool = False, tokenizer: str = "llama"):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_tokenizer(corpus, vocab_size, legacy, tokenizer)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *,
               image_size: int = 48, patch_size: int = 8, vocab_size: int = 512, legacy: bool = False,
               tokenizer: str = "llama", **sizes) -> None:
    """Write a tiny random ``LlavaForConditionalGeneration`` + processor to ``out_dir``
    (``legacy``: the LLaMA tokenizer's ``legacy`` setting; ``tokenizer``: ``llama`` or
    ``byte-level``)."""
    from transformers import LlavaForConditionalGeneration

    processor = tiny_processor(corpus, image_size, patch_size, vocab_size, legacy, tokenizer)
    tokenizer = processor.tokenizer
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_size=image_size, patch_size=patch_size, **sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
