"""MiniGPT-4's prompt templates, answer ends and how they are tokenized.

MiniGPT-4 splits the prompt at ``<ImageHere>``, tokenizes the pieces separately (BOS only on the
first one) and puts the visual tokens between them. Here the placeholder is expanded to one
``<ImageHere>`` id per visual token instead, whose embeddings the visual tokens then replace:
the same decoder input.

Its training target is ``answer + end_sym`` tokenized on its own without special tokens, with
``end_sym`` from the stage-2 / eval configs: ``###`` (the conversation separator) for Vicuna,
``</s>`` for Llama-2.
"""

from __future__ import annotations

from typing import Any

from mllm_pib.backbone import text_stop_sequences

IMAGE_PLACEHOLDER = "<ImageHere>"

TEMPLATES = {
    "v1": "###Human: <Img><ImageHere></Img> {question} ###Assistant: ",
    "llama2": "[INST] <Img><ImageHere></Img> {question} [/INST] ",
}

# ``end_sym`` of the stage-2 and eval configs; ``None``: the tokenizer's end-of-sequence token.
END_SYMBOLS = {"v1": "###", "llama2": None}


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text: no BOS, and special-token strings typed by users stay text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def build_prompt_ids(
    tokenizer: Any, variant: str, question: str, image_token_id: int, num_image_tokens: int
) -> list[int]:
    """``[BOS] + before + <ImageHere> * num_image_tokens + after`` for ``variant``'s template."""
    before, after = TEMPLATES[variant].split(IMAGE_PLACEHOLDER)
    after = after.replace("{question}", question)
    return (
        [tokenizer.bos_token_id]
        + encode_text(tokenizer, before)
        + [image_token_id] * num_image_tokens
        + encode_text(tokenizer, after)
    )


def build_answer_ids(tokenizer: Any, variant: str, answer: str) -> list[int]:
    """The ids MiniGPT-4 trains on: ``answer + end_sym`` tokenized together (``###`` glued to the
    answer's last word is ``##`` ``#`` for LLaMA), or the answer and ``</s>`` (a special token,
    tokenized apart from the text)."""
    end = END_SYMBOLS[variant]
    if end is None:
        return encode_text(tokenizer, answer) + [tokenizer.eos_token_id]
    return encode_text(tokenizer, answer + end)


def stop_sequences(tokenizer: Any, variant: str) -> list[list[int]]:
    """``</s>`` (the LLM's own end) and, for ``v1``, every form ``###`` takes in generated text."""
    stops = [[tokenizer.eos_token_id]]
    end = END_SYMBOLS[variant]
    if end is not None:
        stops += [form for form in text_stop_sequences(tokenizer, end) if form not in stops]
    return stops
