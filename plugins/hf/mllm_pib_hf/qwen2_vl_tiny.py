"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints in the published layout: the real config and
model classes at toy sizes, the published chat template, a Qwen2-layout tokenizer trained here
and an image processor whose pixel bounds keep images at a few visual tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mllm_pib.processor_backbone import image_only_processor
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_qwen2_tokenizer
from mllm_pib_hf.tiny import TEMPLATE_WORDS, tiny_text_sizes

# The chat template both instruct checkpoints publish (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL's control tokens after <|endoftext|> <|im_start|> <|im_end|>, in their published id order
SPECIAL_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>")
PATCH, MERGE = 14, 2  # as published: a visual token is 2 x 2 patches of 14 px
MIN_PIXELS, MAX_PIXELS = (2 * PATCH * MERGE) ** 2, (4 * PATCH * MERGE) ** 2  # 4 .. 16 visual tokens
VISION_WIDTH = 32


def tiny_processor(backbone, corpus: Iterable[str], vocab_size: int = 512):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = train_qwen2_tokenizer([*corpus, TEMPLATE_WORDS], vocab_size=vocab_size,
                                      extra_special_tokens=SPECIAL_TOKENS)
    images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE)
    processor_class = image_only_processor(getattr(transformers, backbone.processor_class))
    return processor_class(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_config(name: str, tokenizer):
    """The variant's config at toy sizes: the distribution's tiny decoder with M-RoPE, a 2-block
    ViT 32 wide over the published 14 px patches and 2 x 2 merge."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = tiny_text_sizes()
    hidden, heads, layers = text["hidden_size"], text["num_attention_heads"], text["num_hidden_layers"]
    half = hidden // heads // 2  # rotary frequencies per head, split over (t, h, w) as the 7B's 16/24/24 of 64
    text.update(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]},
    )
    vision = dict(depth=layers, num_heads=heads, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if name == "qwen2_5_vl":
        # windows of 2 x 2 visual tokens, full attention in the last block, as the 7B's every 8th
        vision.update(hidden_size=VISION_WIDTH, out_hidden_size=hidden, intermediate_size=2 * VISION_WIDTH,
                      window_size=2 * PATCH * MERGE, fullatt_block_indexes=[layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision.update(embed_dim=VISION_WIDTH, hidden_size=hidden, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def write_tiny(backbone, out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *,
               vocab_size: int = 512) -> None:
    """Write a tiny random model of ``backbone``'s class (a :class:`~mllm_pib_hf.qwen2_vl.QwenVLBackbone`)
    and its processor to ``out_dir``."""
    import transformers
    from transformers import GenerationConfig

    processor = tiny_processor(backbone, corpus, vocab_size)
    tokenizer = processor.tokenizer
    config = tiny_config(backbone.name, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, backbone.model_class)(config).eval()
    # the instruct checkpoints end a turn at <|im_end|> or <|endoftext|>
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
