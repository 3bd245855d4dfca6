"""A tiny random InstructBLIP in the transformers layout, with locally trained tokenizers.

The LLM tokenizer is LLaMA-style (:func:`mllm_pib.tokenizer.train_llama_tokenizer`: SentencePiece
pieces, byte fallback) with InstructBLIP's special tokens: ``</s>`` as BOS, EOS and UNK (LAVIS sets
them so), ``[PAD]`` and the ``<image>`` placeholder. The Q-Former tokenizer is BERT-like, as InstructBLIP's
(``bert-base-uncased`` plus LAVIS's ``[DEC]`` BOS): lower-cased WordPiece with ``[CLS] text [SEP]``
and right padding, whose vocabulary is the corpus words plus every single character (so any text
over those characters tokenises), built deterministically rather than trained.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mllm_pib.tokenizer import DEFAULT_CORPUS, train_llama_tokenizer
from mllm_pib.io import atomic_directory

IMAGE_TOKEN = "<image>"
QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
# Spread of the random weights: the classes' own init leaves biases and query tokens at zero and
# the ViT at ~1e-10, which would hide a wrongly mapped or misplaced tensor in the tests.
WEIGHT_STD = 0.1


def qformer_tokenizer(corpus: Iterable[str]):
    """A lower-cased WordPiece tokenizer in BERT's format (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = sorted({
        word for text in corpus for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    })
    chars = sorted({char for word in words for char in word})
    tokens = [*QFORMER_SPECIALS, *chars, *(f"##{char}" for char in chars), *(w for w in words if len(w) > 1)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", padding_side="right",
        truncation_side="left",
    )


def llm_tokenizer(corpus: Iterable[str], vocab_size: int = 512, legacy: bool = False):
    """The Vicuna tokenizer as LAVIS and ``Salesforce/instructblip-vicuna-*`` set it up: ``[PAD]``
    added after the vocabulary, then ``<image>`` (32000 and 32001 in the published one)."""
    tokenizer = train_llama_tokenizer(corpus, vocab_size=vocab_size, legacy=legacy, pad_token=None)
    tokenizer.add_special_tokens({"pad_token": "[PAD]", "bos_token": "</s>", "unk_token": "</s>"})
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.update_post_processor()  # BOS is prepended through the post-processor
    return tokenizer


def tiny_processor(corpus: Iterable[str], image_size: int, num_query_tokens: int, vocab_size: int = 512,
                   legacy: bool = False):
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    corpus = list(corpus)
    return InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=llm_tokenizer(corpus, vocab_size, legacy),
        qformer_tokenizer=qformer_tokenizer(corpus),
        num_query_tokens=num_query_tokens,
    )


def tiny_config(processor, *, image_size: int = 32, patch_size: int = 8, num_query_tokens: int = 6,
                vision_hidden: int = 32, qformer_hidden: int = 32, hidden: int = 64, layers: int = 2, heads: int = 4):
    """InstructBLIP's structure at toy size: a Q-Former with cross-attention every 2nd layer, as the real one."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    tokenizer = processor.tokenizer
    vision = InstructBlipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(processor.qformer_tokenizer), hidden_size=qformer_hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * qformer_hidden, cross_attention_frequency=2,
        max_position_embeddings=128, pad_token_id=processor.qformer_tokenizer.pad_token_id,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )


def randomize(model, seed: int) -> None:
    """Draw every weight at :data:`WEIGHT_STD` (norm scales around 1); EVA-ViT has no key bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            centre = 1.0 if param.dim() == 1 and "norm" in name.lower() and name.endswith("weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD + centre)
        for layer in model.vision_model.encoder.layers:
            bias = layer.self_attn.qkv.bias
            width = bias.shape[0] // 3
            bias[width : 2 * width] = 0


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *,
               image_size: int = 32, num_query_tokens: int = 6, vocab_size: int = 512, **sizes) -> None:
    """Write a tiny random ``InstructBlipForConditionalGeneration`` + processor to ``out_dir``.

    ``sizes`` go to :func:`tiny_config` (``patch_size``, ``vision_hidden``, ``qformer_hidden``,
    ``hidden``, ``layers``, ``heads``). The result loads with
    :func:`mllm_pib_instructblip.backbone.load`.
    """
    from transformers import InstructBlipForConditionalGeneration

    processor = tiny_processor(corpus, image_size, num_query_tokens, vocab_size)
    config = tiny_config(processor, image_size=image_size, num_query_tokens=num_query_tokens, **sizes)
    model = InstructBlipForConditionalGeneration(config).eval()
    randomize(model, seed)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
