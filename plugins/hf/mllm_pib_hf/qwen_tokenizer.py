"""A tokenizer laid out as Qwen2's (and so Qwen2-VL's and Qwen2.5-VL's), trained here.

Qwen2 publishes a byte-level BPE (``Qwen2Tokenizer``): NFC normalisation, its own split regex
then byte-level mapping without prefix space, no BOS, and its control tokens appended after the
regular vocabulary in a fixed order (``<|endoftext|>`` first, then ``<|im_start|>``,
``<|im_end|>``, ... the vision tokens). ``eos`` is ``<|im_end|>`` in the instruct checkpoints'
tokenizer files, ``pad`` (and ``unk``) ``<|endoftext|>``. Only the vocabulary size differs from
the published one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from mllm_pib.tokenizer import DEFAULT_CORPUS

# The published control tokens, in their id order (151643 ... 151656 in Qwen2-VL).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen2's pre-tokenisation split (from its tokenizer.json)
SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHAT_CORPUS = "system\nYou are a helpful assistant.\nuser\nassistant\n"


def train_qwen2_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    special_tokens: Iterable[str] = QWEN2_VL_SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
):
    """A ``Qwen2Tokenizer`` over a byte-level BPE trained on ``corpus`` (plus the chat words),
    with ``special_tokens`` appended in order."""
    from transformers import Qwen2Tokenizer

    special_tokens = list(special_tokens)
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.NFC()
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_model.train_from_iterator([*corpus, CHAT_CORPUS], trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda item: item[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=special_tokens[0],
                               pad_token=special_tokens[0], errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens[1:]})
    tokenizer.add_special_tokens({"eos_token": eos_token})
    return tokenizer
