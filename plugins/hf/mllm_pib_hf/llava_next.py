"""LLaVA-NeXT (LLaVA-1.6, ``llava-hf/llava-v1.6-mistral-7b-hf``) on
``transformers.LlavaNextForConditionalGeneration`` and its processor."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mllm_pib.tokenizer import DEFAULT_CORPUS, train_llama_tokenizer
from mllm_pib_hf.anyres import AnyresBackbone
from mllm_pib_hf.tiny import TEMPLATE_WORDS, tiny_text_sizes, tiny_vision_sizes

# The chat template llava-hf publishes with llava-v1.6-mistral-7b-hf (Mistral's [INST] format;
# the images of a user turn first, each followed by a newline; an assistant turn ends "</s> ").
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
IMAGE_TOKEN = "<image>"
# llava-v1.6-mistral's tile grids, in units of the tower's input size (336 px published)
GRID = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]


class LlavaNextBackbone(AnyresBackbone):
    """LLaVA-NeXT: CLIP ViT-L/14-336 on a base view + anyres tiles -> MLP projector -> unpadded
    grid with ``image_newline`` -> Mistral-7B-Instruct."""

    name = "llava_next"
    feature_choices = ("clip", "projector")
    num_views = staticmethod(image_size_to_num_patches)


def load(model_path, *, feature=None, dtype=None, device=None) -> LlavaNextBackbone:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from mllm_pib_hf.loading import load_published

    return load_published(LlavaNextBackbone, LlavaNextForConditionalGeneration, LlavaNextProcessor, model_path,
                          feature=feature, dtype=dtype, device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, legacy: bool = True,
               vocab_size: int = 512) -> None:
    """A tiny random LLaVA-NeXT with the published layout: CLIP tower (16 px tiles, 4 px patches,
    CLS dropped), Mistral decoder, the published tile grids scaled to 16 px, and a
    SentencePiece-style Llama tokenizer (``<image>`` then ``<pad>`` appended, as llava-hf did)
    with the published chat template."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, MistralConfig)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = train_llama_tokenizer([*corpus, TEMPLATE_WORDS], vocab_size=vocab_size, legacy=legacy,
                                      extra_special_tokens=[IMAGE_TOKEN])
    vision = tiny_vision_sizes()
    side = vision["image_size"]
    pinpoints = [[side * h, side * w] for h, w in GRID]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"]),
        text_config=MistralConfig(vocab_size=len(tokenizer), sliding_window=None, **tiny_text_sizes()),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
