"""MiniGPT-4's prompt templates and how they are tokenized.

MiniGPT-4 splits the prompt at ``<ImageHere>``, tokenizes the pieces separately (BOS only on the
first one) and puts the visual tokens between them. Here the placeholder is expanded to one
``<ImageHere>`` id per visual token instead, whose embeddings the visual tokens then replace:
the same decoder input.
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<ImageHere>"

TEMPLATES = {
    "v1": "###Human: <Img><ImageHere></Img> {question} ###Assistant: ",
    "llama2": "[INST] <Img><ImageHere></Img> {question} [/INST] ",
}

# MiniGPT-4 (Vicuna) ends its answers with "###", its conversation separator.
V1_STOP = "###"


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


def single_token_stops(tokenizer: Any, variant: str) -> list[int]:
    """Ids of the ``v1`` stop ``###`` in the forms (bare, after a space) that are one token.

    ``stop_token_ids`` holds single ids, so a form the tokenizer splits (the LLaMA tokenizer
    splits ``###`` glued to text into ``##`` + ``#``) cannot be listed; the scored end token
    ``</s>`` ends generation in every case.
    """
    if variant != "v1":
        return []
    stops = []
    for form in (V1_STOP, " " + V1_STOP):
        ids = encode_text(tokenizer, form)
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(ids[0])
    return stops
