"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-7b-ov-hf``) on
``transformers.LlavaOnevisionForConditionalGeneration`` and its processor."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from mllm_pib.processor_backbone import image_only_processor
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_qwen2_tokenizer
from mllm_pib_hf.anyres import AnyresBackbone
from mllm_pib_hf.tiny import TEMPLATE_WORDS, tiny_text_sizes, tiny_vision_sizes

# The chat template llava-hf publishes with llava-onevision-qwen2-7b-ov-hf (ChatML; the images
# of a turn first, each followed by a newline; every turn ends "<|im_end|>\n").
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VISION_TOKENS = ("<image>", "<video>")
MAX_GRID = 6  # the published pinpoints: every grid of 1..6 x 1..6 tiles (384 px each)


class LlavaOnevisionBackbone(AnyresBackbone):
    """LLaVA-OneVision: SigLIP-so400m on a base view + anyres tiles -> MLP projector -> unpadded
    grid, bilinearly pooled past 9 tiles' worth (``anyres_max_9``), with ``image_newline`` ->
    Qwen2-7B-Instruct."""

    name = "llava_onevision"
    feature_choices = ("siglip", "projector")
    end_of_turn = ("<|im_end|>",)
    num_views = staticmethod(image_size_to_num_patches)


def load(model_path, *, feature=None, dtype=None, device=None) -> LlavaOnevisionBackbone:
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    from mllm_pib_hf.loading import load_published

    return load_published(LlavaOnevisionBackbone, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, model_path,
                          feature=feature, dtype=dtype, device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, vocab_size: int = 512) -> None:
    """A tiny random LLaVA-OneVision with the published layout: SigLIP tower (16 px tiles, 4 px
    patches, all patches kept), Qwen2 decoder, the published 6 x 6 tile grids scaled to 16 px,
    ``anyres_max_9``, and a Qwen2-style byte-level BPE tokenizer (``<image>`` ``<video>`` after
    the ChatML tokens) with the published chat template."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tokenizer = train_qwen2_tokenizer([*corpus, TEMPLATE_WORDS], vocab_size=vocab_size,
                                      extra_special_tokens=list(VISION_TOKENS))
    vision = tiny_vision_sizes()
    side, patch = vision["image_size"], vision["patch_size"]
    pinpoints = [[side * h, side * w] for h in range(1, MAX_GRID + 1) for w in range(1, MAX_GRID + 1)]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=CHATML_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        text_config=Qwen2Config(vocab_size=len(tokenizer), **tiny_text_sizes()),
        image_token_index=tokenizer.convert_tokens_to_ids(VISION_TOKENS[0]),
        video_token_index=tokenizer.convert_tokens_to_ids(VISION_TOKENS[1]),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
