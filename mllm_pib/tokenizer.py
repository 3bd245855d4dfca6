"""Tokenizers trained locally, for tiny models (no tokenizer can be downloaded here).

The tokenizer is byte-level BPE, so any text round-trips exactly, with LLaMA's special tokens
(``<unk>``, ``<s>``, ``</s>``) and a padding token; backbones add their image placeholders as
extra special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

# A small default corpus: the words that prompts, answers and the demo world need.
DEFAULT_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: ASSISTANT: ###Human: ###Assistant: [INST] [/INST] <Img></Img> "
    "Describe this image in detail. Is there a cat in the image? Yes, there is. No, there is not. "
    "Answer the question using a single word or phrase. "
    "The image shows a red circle, a blue square, a green triangle and a yellow star. "
    "There is a dog, a person, a car, a chair, a table, a cup, a bottle, a bird and a tree. "
    "What is in the picture? The photo contains two people sitting next to a bench."
)


def train_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers.

    ``padding_side`` is given at construction because a value set afterwards is not saved.
    """
    specials = [UNK, BOS, EOS, PAD, *extra_special_tokens]
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side=padding_side,
        extra_special_tokens=list(extra_special_tokens) or None,
    )
