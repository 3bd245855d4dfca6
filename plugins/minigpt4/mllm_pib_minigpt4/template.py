"""MiniGPT-4's prompt templates and answer ends.

MiniGPT-4 splits the prompt at ``<ImageHere>``, tokenizes the pieces separately (BOS only on the
first one) and puts the visual tokens between them; the core's
:func:`~mllm_pib.backbone.tokenize_around_image` does the same, with the placeholder expanded to
one ``<ImageHere>`` id per visual token, whose embeddings the visual tokens then replace.

Its training target is ``answer + end_sym`` tokenized on its own without special tokens, with
``end_sym`` from the stage-2 / eval configs: ``###`` (the conversation separator) for Vicuna,
``</s>`` for Llama-2.
"""

from __future__ import annotations

from typing import Any

from mllm_pib.backbone import PromptTemplate, text_stop_sequences

IMAGE_PLACEHOLDER = "<ImageHere>"

# ``prompt_template`` of the configs, holding the instruction "<Img><ImageHere></Img> {question}".
PROMPTS = {
    "v1": "###Human: <Img>{image}</Img> {question} ###Assistant: ",
    "llama2": "[INST] <Img>{image}</Img> {question} [/INST] ",
}
# ``end_sym`` of the stage-2 and eval configs; ``None``: the tokenizer's end-of-sequence token.
END_SYMBOLS = {"v1": "###", "llama2": None}


def template(variant: str, tokenizer: Any) -> PromptTemplate:
    """``variant``'s prompt, and its answer ``answer + end_sym`` tokenized on its own."""
    end = END_SYMBOLS[variant] or tokenizer.eos_token
    return PromptTemplate(prompt=PROMPTS[variant], answer="{answer}" + end, answer_alone=True)


def stop_sequences(tokenizer: Any, variant: str) -> list[list[int]]:
    """``</s>`` (the LLM's own end) and, for ``v1``, every form ``###`` takes in generated text."""
    stops = [[tokenizer.eos_token_id]]
    end = END_SYMBOLS[variant]
    if end is not None:
        stops += [form for form in text_stop_sequences(tokenizer, end) if form not in stops]
    return stops
