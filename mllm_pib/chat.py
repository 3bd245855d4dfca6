"""Conversations about one image with a :class:`~mllm_pib.model.PIBModel` and with its base.

The base model is the same ``PIBModel`` with its block bypassed (``generate(bypass_pib=True)``):
comparing the two needs no second copy of the backbone, and each answer costs one backbone
pass per decoding step.

A backbone whose chat template has a multi-turn format (the processor-driven ones:
:meth:`~mllm_pib.backbone.Backbone.conversation_ids`) gets the conversation in that format, the
image in the first user turn. The 2023 backbones' templates are single-turn: one image, one
question, one answer. Their conversation is carried inside that single turn: the earlier questions
and answers are written into the question as a plain transcript, and the new question comes last::

    User: What is on the table?
    Assistant: A cup and a laptop.
    User: What colour is the cup?

The first turn is the bare question, so a one-turn chat gives exactly the answer of a single
question. Later turns are an approximation: the model sees its earlier answers as text inside
one user turn, not in its own multi-turn format (LLaVA, for instance, repeats its
``USER:``/``ASSISTANT:`` roles and ends each answer with ``</s>``). Each variant keeps its own
history, so the base model continues from its own answers. When a transcript no longer fits the
decoder's context, its oldest turns are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mllm_pib.data.images import ImageError, open_image
from mllm_pib.errors import UserError

BASE = "base"  # the backbone alone: block bypassed, original head
PIB = "pib"
USER_ROLE = "User"
ASSISTANT_ROLE = "Assistant"


class DecodingOptions(BaseModel):
    """How answers are decoded (greedy when ``num_beams`` is 1)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=512, gt=0)
    num_beams: int = Field(default=1, gt=0)


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass
class Conversation:
    """The turns one variant has answered so far."""

    turns: list[Turn] = field(default_factory=list)

    def question_text(self, question: str, keep: int | None = None) -> str:
        """The text passed to the template as its question: the last ``keep`` turns (all by
        default) as a transcript followed by ``question``; the bare question without history."""
        turns = self.turns[len(self.turns) - keep :] if keep is not None else self.turns
        if not turns:
            return question
        lines = [f"{USER_ROLE}: {t.question}\n{ASSISTANT_ROLE}: {t.answer}" for t in turns]
        return "\n".join([*lines, f"{USER_ROLE}: {question}"])


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt that fits the context, and how many old turns were dropped for it.

    ``text`` is the question as the vision side reads it (InstructBLIP's Q-Former): the
    transcript for a single-turn template, the new question for a multi-turn one."""

    ids: list[int]
    text: str
    dropped: int


@dataclass(frozen=True)
class Reply:
    """One turn's answers by variant (``"base"``, ``"pib"``)."""

    question: str
    answers: dict[str, str]
    dropped: dict[str, int]


def read_image(path: str | Path) -> Image.Image:
    """Decode a user's image as RGB; a missing, unreadable or non-image file is a :class:`UserError`."""
    try:
        return open_image(path)
    except ImageError as err:
        raise UserError(f"{err}; give an image file such as a JPEG or PNG") from None


def check_question(question: str | None) -> str:
    """The question without surrounding blanks; an empty one is a :class:`UserError`."""
    question = (question or "").strip()
    if not question:
        raise UserError("the prompt is empty; ask a question about the image or give an instruction")
    return question


def context_length(backbone) -> int | None:
    """How many positions the backbone's decoder can attend to, or ``None`` when it does not say.

    Decoder backbones hold a transformers decoder whose config names ``max_position_embeddings``.
    """
    config = getattr(getattr(backbone, "decoder", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


class Chat:
    """A conversation about one image, answered by each of ``variants``.

    Args:
        model: the :class:`~mllm_pib.model.PIBModel`.
        image: the RGB image every turn is about.
        options: decoding options.
        variants: ``"pib"`` (the model as loaded) and/or ``"base"`` (its block bypassed).
    """

    def __init__(self, model, image: Image.Image, options: DecodingOptions, variants: tuple[str, ...] = (PIB,)):
        unknown = set(variants) - {BASE, PIB}
        if unknown or not variants:
            raise ValueError(f"variants must be a non-empty subset of {(BASE, PIB)}, got {variants}")
        self.model = model
        self.image = image
        self.options = options
        self.conversations = {variant: Conversation() for variant in variants}

    def ask(self, question: str) -> Reply:
        """Answer ``question`` with every variant and add the turn to their histories.

        Raises:
            UserError: for an empty question or one too long for the context; the
                conversation is then unchanged.
        """
        question = check_question(question)
        prompts = {v: self.fit(conv, question) for v, conv in self.conversations.items()}
        answers = {v: self.answer(prompt, bypass_pib=v == BASE) for v, prompt in prompts.items()}
        for variant, conversation in self.conversations.items():
            conversation.turns.append(Turn(question, answers[variant]))
        return Reply(question, answers, {v: p.dropped for v, p in prompts.items()})

    def fit(self, conversation: Conversation, question: str) -> FittedPrompt:
        """The prompt with the most recent turns before ``question`` that leaves room for
        ``max_new_tokens`` in the context."""
        limit = context_length(self.model.backbone)
        room = self.options.max_new_tokens
        for keep in range(len(conversation.turns), -1, -1):
            prompt = self.prompt(conversation, question, keep)
            length = len(prompt.ids)
            if limit is None or length + room <= limit:
                return prompt
        raise UserError(
            f"the prompt is too long: with the image it takes {length} tokens, and with up to {room} new "
            f"tokens that exceeds the model's context of {limit} tokens; shorten the prompt or allow "
            "fewer new tokens (--max-new-tokens)"
        )

    def prompt(self, conversation: Conversation, question: str, keep: int) -> FittedPrompt:
        """``question`` after the last ``keep`` turns: in the model's multi-turn format when it
        has one, else as a transcript inside one question."""
        backbone = self.model.backbone
        turns = conversation.turns[len(conversation.turns) - keep :]
        try:
            ids = backbone.conversation_ids([(t.question, t.answer) for t in turns], question, self.image) if turns else None
            text = question if ids is not None else conversation.question_text(question, keep)
            if ids is None:
                ids = backbone.prompt_ids(text, self.image)
        except ValueError as err:  # e.g. the text holds the template's image placeholder
            raise UserError(f"the prompt cannot be used: {err}") from None
        return FittedPrompt(ids, text, dropped=len(conversation.turns) - keep)

    def answer(self, prompt: FittedPrompt, bypass_pib: bool) -> str:
        """One answer to ``prompt`` about the image."""
        model = self.model
        ids = torch.tensor([prompt.ids], device=model.device)
        tokens = model.generate(
            ids, torch.ones_like(ids), model.backbone.preprocess([self.image], [prompt.text]),
            max_new_tokens=self.options.max_new_tokens, num_beams=self.options.num_beams, bypass_pib=bypass_pib,
        )
        return model.decode(tokens[0].tolist())
