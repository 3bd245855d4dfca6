"""SmolVLM: the SmolVLM2 checkpoints (``HuggingFaceTB/SmolVLM2-2.2B-Instruct``, ``model_type:
smolvlm``) on ``transformers.SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor``, and
SmolVLM-Instruct (``HuggingFaceTB/SmolVLM-Instruct``, published as ``model_type: idefics3``) on the
Idefics3 classes; the class follows the checkpoint's ``config.json``.

Both are the Idefics3 architecture (:mod:`mllm_pib_hf.idefics3`): transformers' SmolVLM classes
subclass Idefics3's with the same tower, connector, image splitting and ``<image>`` expansion
(SmolVLM's processor reads its image tokens from the tokenizer's named tokens and also handles
video, which is not used here). A SmolLM2 decoder, a GPT-2-style tokenizer, and at 2.2B: 384 px
tiles of 14 px patches and a pixel shuffle by 3 (81 tokens a tile).
"""

from __future__ import annotations

from collections.abc import Iterable

from mllm_pib.errors import UserError
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_gpt2_tokenizer
from mllm_pib_hf.idefics3 import (END_OF_UTTERANCE, IDEFICS3, IMAGE_TOKENS, SMOLVLM, Idefics3Backbone, chat_template,
                                  load_family, write_family_tiny)
from mllm_pib_hf.tiny import TEMPLATE_WORDS

# SmolVLM2 first (its own model type), then SmolVLM-Instruct's
LAYOUTS = {layout.model_type: layout for layout in (SMOLVLM, IDEFICS3)}
# the tokens SmolVLMProcessor reads by name from the tokenizer, as SmolVLM2's tokenizer names them
NAMED_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                "end_of_utterance_token": END_OF_UTTERANCE, "global_image_token": "<global-img>"}


class SmolVLMBackbone(Idefics3Backbone):
    """SmolVLM2 / SmolVLM-Instruct: SigLIP (384 px tiles) -> pixel shuffle by 3 + linear connector
    -> SmolLM2-1.7B. Feature options as :class:`Idefics3Backbone`."""

    name = "smolvlm"


def load(model_path, *, feature=None, dtype=None, device=None) -> SmolVLMBackbone:
    return load_family(SmolVLMBackbone, tuple(LAYOUTS.values()), model_path, feature=feature, dtype=dtype,
                       device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, vocab_size: int = 512,
               layout: str = "smolvlm") -> None:
    """A tiny random SmolVLM in the published ``layout``: ``smolvlm`` (SmolVLM2:
    ``SmolVLMForConditionalGeneration``, ``SmolVLMProcessor``, the image tokens named in the
    tokenizer) or ``idefics3`` (SmolVLM-Instruct: the Idefics3 classes). Both: 36 px tiles (4 px
    patches, 9 x 9 per tile), pixel shuffle by 3 (9 tokens a tile), a Llama decoder and a
    SmolLM2-style GPT-2 tokenizer (``train_gpt2_tokenizer``: BOS ``<|im_start|>``, EOS
    ``<end_of_utterance>``, padding ``<|im_end|>``) with the published chat template."""
    if layout not in LAYOUTS:
        raise UserError(f"smolvlm tiny layout {layout!r} is unknown; choose smolvlm (SmolVLM2) or idefics3 "
                        "(SmolVLM-Instruct)")
    tokenizer = train_gpt2_tokenizer([*corpus, TEMPLATE_WORDS, "User: Assistant:"], vocab_size=vocab_size,
                                     extra_special_tokens=IMAGE_TOKENS, eos_token=END_OF_UTTERANCE,
                                     **(NAMED_TOKENS if layout == SMOLVLM.model_type else {}))
    write_family_tiny(out_dir, seed, tokenizer, chat_template("<|im_start|>"), LAYOUTS[layout], tile=36,
                      scale_factor=3)
