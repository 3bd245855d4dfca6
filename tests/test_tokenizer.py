"""The SentencePiece-style LLaMA tokenizer for tiny models: LLaMA's id layout, byte fallback,
and transformers' own ``legacy`` rule, kept through save and load."""

import pytest
from transformers import AutoTokenizer

from mllm_pib.backbone import text_stop_sequences
from mllm_pib.tokenizer import train_llama_tokenizer

PROMPT = "USER: <image>\nIs there a cat? ASSISTANT:"


@pytest.fixture(scope="module", params=[False, True], ids=["legacy-false", "legacy-true"])
def tokenizer(request):
    return train_llama_tokenizer(legacy=request.param, extra_special_tokens=["<image>"])


def test_llama_id_layout_and_byte_fallback(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"])
    assert ids == [0, 1, 2, 3, 13, 258]
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(tokenizer) - 2, len(tokenizer) - 1]
    encoded = tokenizer("Is there a cat?\né").input_ids
    pieces = tokenizer.convert_ids_to_tokens(encoded)
    assert encoded[0] == 1 and pieces[1] == "▁Is" and "▁there" in pieces
    # newline and a character outside the training corpus fall back to their UTF-8 bytes
    assert pieces[-3:] == ["<0x0A>", "<0xC3>", "<0xA9>"]
    text = "Two  spaces, a\nnewline and é."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_legacy_decides_the_space_after_a_special_token(tokenizer, tmp_path):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT).input_ids)
    after = pieces[pieces.index("<image>") + 1:][:2]
    # legacy: every section gets the "▁" prefix, also after <image>; otherwise only the first
    assert after == (["▁", "<0x0A>"] if tokenizer.legacy else ["<0x0A>", "Is"])
    # a text tokenised on its own always starts with "▁" (LLaVA's chunks rely on it)
    assert tokenizer.convert_ids_to_tokens(tokenizer("\nIs").input_ids) == ["<s>", "▁", "<0x0A>", "Is"]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaTokenizer" and loaded.legacy == tokenizer.legacy
    assert loaded(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert loaded.padding_side == "left"


def test_text_stop_sequences_list_every_form_of_a_marker(tokenizer):
    forms = text_stop_sequences(tokenizer, "###")
    assert len(forms) == len({tuple(f) for f in forms}) >= 2
    assert any(len(form) > 1 for form in forms)  # "###" glued to a word splits into "##" "#"
    for form in forms:
        assert tokenizer.decode(form).strip() == "###"
    glued = tokenizer("a dog.###", add_special_tokens=False).input_ids
    assert any(glued[-len(form):] == form for form in forms)


def test_qwen2_tokenizer_is_laid_out_as_qwen2_instruct(tmp_path):
    import regex

    from mllm_pib.tokenizer import train_qwen2_tokenizer

    tokenizer = train_qwen2_tokenizer(extra_special_tokens=["<image>", "<video>"])
    trained = len(tokenizer) - 5
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]) == list(
        range(trained, trained + 5))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    text = "<|im_start|>user\n<image>\nIs there a cat, a   dog's toy or 42 cups?<|im_end|>\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == trained + 1 and tokenizer.decode(ids) == text  # no BOS added; byte-level round trip
    # Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits,
    # punctuation runs, newlines apart; no trained piece crosses those boundaries
    plain = "Is there a cat, a   dog's toy or 42 cups?\n\nYes."
    chunks = regex.findall(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+", plain)
    pieces = [tokenizer.decode([i]) for i in tokenizer(plain).input_ids]
    expected = [piece for chunk in chunks for piece in [tokenizer.decode(tokenizer(chunk).input_ids)]]
    assert "".join(pieces) == plain and len(pieces) >= len(chunks) and expected == chunks
    boundaries = {sum(len(c) for c in chunks[:k]) for k in range(len(chunks) + 1)}
    ends = {sum(len(p) for p in pieces[:k]) for k in range(len(pieces) + 1)}
    assert boundaries <= ends
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer" and loaded(text).input_ids == ids and loaded.padding_side == "left"


def test_gemma_tokenizer_is_laid_out_as_gemma3(tmp_path):
    from mllm_pib.tokenizer import BYTE_TOKENS, train_gemma_tokenizer

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = train_gemma_tokenizer(named_special_tokens=named)
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert tokenizer.convert_tokens_to_ids(BYTE_TOKENS[:1] + ["<end_of_turn>"]) == [7, 6]
    assert (tokenizer.boi_token, tokenizer.image_token_id) == ("<start_of_image>", len(tokenizer) - 1)
    text = "Is there a cat,  a dog?\n\nYes é"
    ids = tokenizer(text).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert ids[0] == 2 and tokenizer.decode(ids, skip_special_tokens=True) == text  # BOS, then a lossless round trip
    # no dummy prefix; a space belongs to the word it precedes; unseen characters fall back to bytes
    assert pieces[1] == "Is" and "▁there" in pieces and pieces[-2:] == ["<0xC3>", "<0xA9>"]
    assert all("▁" not in piece[1:] for piece in pieces)  # no piece spans two words
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GemmaTokenizer" and loaded(text).input_ids == ids
    assert loaded.image_token == "<image_soft_token>" and loaded.padding_side == "left"
