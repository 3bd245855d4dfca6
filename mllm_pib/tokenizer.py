"""Tokenizers trained locally, for tiny models (no tokenizer can be downloaded here).

:func:`train_llama_tokenizer` gives a tokenizer shaped like the published LLaMA / Vicuna one, so
that prefix-space behaviour is the real one: a ``transformers.LlamaTokenizer`` (SentencePiece-style
BPE, ``▁`` metaspace, byte fallback ``<0x00>``..``<0xFF>``, ``<unk>``=0 ``<s>``=1 ``</s>``=2) over a
vocabulary trained here. :func:`train_byte_level_tokenizer` is a byte-level BPE, for the demo's
synthetic world. Backbones add their image placeholders as extra special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

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


def train_byte_level_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (``<unk>`` ``<s>`` ``</s>`` ``<pad>``, then
    ``extra_special_tokens``) and wrap it for transformers.

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


BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def train_llama_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    legacy: bool = False,
    extra_special_tokens: Iterable[str] = (),
    pad_token: str | None = PAD,
    padding_side: str = "left",
) -> LlamaTokenizer:
    """A ``LlamaTokenizer`` over a BPE vocabulary trained on ``corpus``, laid out as LLaMA's.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte tokens from 3 (``\\n`` is
    ``<0x0A>``, as in LLaMA, whose vocabulary has no newline piece), then the trained pieces
    (``▁`` marks a word start), then ``extra_special_tokens`` and ``pad_token`` (llava-hf adds
    ``<image>`` then ``<pad>``; original LLaVA and Vicuna have no pad token: ``pad_token=None``).

    ``legacy`` is written to ``tokenizer_config.json`` as the published files carry it, and
    transformers applies it on every load: ``True`` prepends ``▁`` to every text section
    (also after a special token), ``False`` only to the start of the text (``prepend_scheme
    "first"``). LLaVA-1.5 / Vicuna-7B v1.5 publish ``"legacy": false`` (liuhaotian llava-v1.5
    checkpoints and their fine-tunes); older Vicuna configs carry no ``legacy`` key, which
    transformers 5 reads as ``False`` too.
    """
    # Lines are trained apart, so that newline stays a byte token (LLaMA has no newline piece)
    # and a word after it is learned without "▁"; the first line gets the dummy prefix "▁".
    texts = [piece for text in corpus for piece in _lines(text)]
    reserved = 3 + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed the {reserved} special and byte tokens, got {vocab_size}")
    trainer_model = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    # LLaMA's SentencePiece training splits on whitespace (a piece may start with "▁"), at
    # script changes (letters | symbols such as "###") and between digits: no learned piece
    # crosses those, so none does at run time either
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Split(Regex(r"▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁]+|▁"), behavior="isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - reserved, show_progress=False)
    trainer_model.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = {token: index for index, token in enumerate([UNK, BOS, EOS, *BYTE_TOKENS])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True, padding_side=padding_side,
        extra_special_tokens=list(extra_special_tokens) or None,
    )
    tokenizer.init_kwargs["legacy"] = legacy  # saved, so that loading applies the same rule
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    return tokenizer


def _lines(text: str) -> list[str]:
    first, *rest = text.split("\n")
    return [" " + first, *rest]


QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_qwen2_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    padding_side: str = "left",
):
    """A ``Qwen2Tokenizer`` over a byte-level BPE vocabulary trained on ``corpus``, laid out as
    Qwen2-Instruct's: the trained pieces (Qwen2's pre-tokenizer regex, then byte-level), then
    ``<|endoftext|>`` ``<|im_start|>`` ``<|im_end|>``, then ``extra_special_tokens`` (the
    vision tokens a VLM adds); no BOS, no unknown token, EOS ``<|im_end|>``, padding
    ``<|endoftext|>``. ``vocab_size`` counts the trained pieces only."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _train_byte_level_bpe(corpus, vocab_size, _split_then_bytes(PRETOKENIZE_REGEX))
    for token in QWEN2_SPECIALS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side=padding_side,
        extra_special_tokens=[QWEN2_SPECIALS[1], *extra_special_tokens],
    )


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")


def train_gemma_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    named_special_tokens: dict[str, str] | None = None,
    padding_side: str = "left",
):
    """A ``GemmaTokenizer`` over a BPE vocabulary trained on ``corpus``, laid out as Gemma 3's:
    ``<pad>`` ``<eos>`` ``<bos>`` ``<unk>`` ``<mask>`` 0-4, the turn markers, the 256 byte tokens
    (byte fallback), the trained pieces (spaces are ``▁`` and belong to the word they precede,
    no dummy prefix; newlines are pieces of their own), then ``named_special_tokens``
    (attribute name -> token, e.g. ``{"image_token": "<image_soft_token>"}``), which become the
    tokenizer's attributes as Gemma 3's processor reads them. BOS is added to every text, as
    published. ``vocab_size`` counts every token but the named ones."""
    from transformers import GemmaTokenizer

    reserved = len(GEMMA_SPECIALS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed the {reserved} special and byte tokens, got {vocab_size}")
    model = Tokenizer(models.BPE(byte_fallback=True))
    model.normalizer = normalizers.Replace(" ", "▁")
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁\n]+|\n+|▁+"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - reserved, show_progress=False)
    model.train_from_iterator(list(corpus), trainer=trainer)
    pieces, merges = _trained_bpe(model)
    vocab = {token: index for index, token in enumerate([*GEMMA_SPECIALS, *BYTE_TOKENS])}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    named = dict(named_special_tokens or {})
    for token in named.values():
        vocab[token] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, padding_side=padding_side, add_bos_token=True,
                               extra_special_tokens=named or None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA_SPECIALS[5:])})
    return tokenizer


def _split_then_bytes(regex: str):
    """A pre-tokenizer that splits on ``regex``, then maps each piece to byte-level characters."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _train_byte_level_bpe(corpus: Iterable[str], vocab_size: int, pre_tokenizer) -> tuple[dict[str, int], list]:
    """A byte-level BPE vocabulary (ids from 0, in training order) and its merges, trained on
    ``corpus`` with ``pre_tokenizer``; every byte is in the vocabulary."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    model.train_from_iterator(list(corpus), trainer=trainer)
    pieces, merges = _trained_bpe(model)
    return {piece: index for index, piece in enumerate(pieces)}, merges


def _trained_bpe(model: Tokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    """A trained BPE model's pieces in id order and its merges as pairs."""
    trained = json.loads(model.to_str())["model"]
    pieces = [piece for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return pieces, merges


# Llama 3's pre-tokenizer: Qwen2's, but numbers split into runs of up to three digits
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>")


def train_llama3_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A fast tokenizer laid out as Llama 3's: a byte-level BPE vocabulary trained on ``corpus``
    (Llama 3's pre-tokenizer regex), then ``<|begin_of_text|>`` (BOS, added to every text)
    ``<|end_of_text|>`` (EOS) ``<|reserved_special_token_0|>`` (padding, as Idefics3 pads), then
    ``extra_special_tokens``. ``vocab_size`` counts the trained pieces only."""
    vocab, merges = _train_byte_level_bpe(corpus, vocab_size, _split_then_bytes(LLAMA3_REGEX))
    for token in LLAMA3_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _split_then_bytes(LLAMA3_REGEX)
    tokenizer.decoder = decoders.ByteLevel()
    bos = LLAMA3_SPECIALS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=LLAMA3_SPECIALS[1], pad_token=LLAMA3_SPECIALS[2],
        padding_side=padding_side, extra_special_tokens=list(extra_special_tokens) or None,
    )


SMOLLM2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_gpt2_tokenizer(
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    *,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    bos_token: str = SMOLLM2_SPECIALS[1],
    eos_token: str = SMOLLM2_SPECIALS[2],
    pad_token: str = SMOLLM2_SPECIALS[2],
    padding_side: str = "left",
    **named_tokens: str,
):
    """A ``GPT2Tokenizer`` laid out as SmolLM2's: ``<|endoftext|>`` ``<|im_start|>``
    ``<|im_end|>`` 0-2, then a byte-level BPE vocabulary trained on ``corpus`` (GPT-2's
    pre-tokenizer, no prefix space), then ``extra_special_tokens``; no BOS added to texts.
    ``vocab_size`` counts the trained pieces only. ``named_tokens`` (``image_token="<image>"``)
    become tokenizer attributes saved in its config, as multimodal tokenizers name the tokens
    their processor reads."""
    from transformers import GPT2Tokenizer

    trained, merges = _train_byte_level_bpe(corpus, vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False))
    vocab = {token: index for index, token in enumerate(SMOLLM2_SPECIALS)}
    for piece in trained:
        vocab.setdefault(piece, len(vocab))
    return GPT2Tokenizer(
        vocab=vocab, merges=merges, unk_token=SMOLLM2_SPECIALS[0], bos_token=bos_token, eos_token=eos_token,
        pad_token=pad_token, padding_side=padding_side, extra_special_tokens=list(extra_special_tokens) or None,
        **named_tokens,
    )
