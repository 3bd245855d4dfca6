"""SmolVLM (``HuggingFaceTB/SmolVLM-Instruct``): an Idefics3 model as published.

Its ``config.json`` has ``model_type: idefics3`` and ``architectures:
[Idefics3ForConditionalGeneration]`` (its processor is ``Idefics3Processor``): the same classes as
:mod:`mllm_pib_hf.idefics3`, with a SmolLM2 decoder, a GPT-2-style tokenizer, 384 px tiles of 14 px
patches and a pixel shuffle by 3 (81 tokens a tile). transformers' ``SmolVLMForConditionalGeneration``
(``model_type: smolvlm``) is the class of the later SmolVLM2 checkpoints, not of this one.
"""

from __future__ import annotations

from collections.abc import Iterable

from mllm_pib.tokenizer import DEFAULT_CORPUS, train_gpt2_tokenizer
from mllm_pib_hf.idefics3 import END_OF_UTTERANCE, IMAGE_TOKENS, Idefics3Backbone, chat_template, load_family, write_family_tiny
from mllm_pib_hf.tiny import TEMPLATE_WORDS


class SmolVLMBackbone(Idefics3Backbone):
    """SmolVLM-Instruct: SigLIP (384 px tiles) -> pixel shuffle by 3 + linear connector ->
    SmolLM2-1.7B. Feature options as :class:`Idefics3Backbone`."""

    name = "smolvlm"
    model_type = "idefics3"


def load(model_path, *, feature=None, dtype=None, device=None) -> SmolVLMBackbone:
    return load_family(SmolVLMBackbone, model_path, feature=feature, dtype=dtype, device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, vocab_size: int = 512) -> None:
    """A tiny random SmolVLM-Instruct: the Idefics3 layout with 36 px tiles (4 px patches, 9 x 9 per
    tile), pixel shuffle by 3 (9 tokens a tile), a Llama decoder and a SmolLM2-style GPT-2 tokenizer
    (``train_gpt2_tokenizer``: BOS ``<|im_start|>``, EOS ``<end_of_utterance>``, padding
    ``<|im_end|>``) with the published chat template."""
    tokenizer = train_gpt2_tokenizer([*corpus, TEMPLATE_WORDS, "User: Assistant:"], vocab_size=vocab_size,
                                     extra_special_tokens=IMAGE_TOKENS, eos_token=END_OF_UTTERANCE)
    write_family_tiny(out_dir, seed, tokenizer, chat_template("<|im_start|>"), tile=36, scale_factor=3)
