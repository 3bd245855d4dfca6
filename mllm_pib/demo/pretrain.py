"""Supervised fine-tuning of a whole backbone through the :class:`~mllm_pib.backbone.Backbone`
contract: how the demo teaches a randomly initialised model to see (and to be biased).

Only the contract is used — ``preprocess``, ``encode_vision``, ``prompt_ids``/``answer_ids``,
``embed``, ``lm_forward`` (with ``new_cache``) and ``lm_head`` — so the loop trains any backbone
plugin's model. The
loss is the mean next-token cross-entropy over the answer tokens (end token included), as in
LLaVA's instruction tuning; the prompt and the image are context only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mllm_pib.backbone import Backbone
from mllm_pib.data.dataset import pad
from mllm_pib.objectives import IGNORE_INDEX, shift_labels


class FinetuneSettings(BaseModel):
    """The optimisation of :func:`supervised_finetune`: AdamW, linear warm-up then cosine decay
    to ``final_lr_ratio`` of the peak, gradient clipping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    final_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class SupervisedExample:
    """An image (PIL), the user's prompt and the answer the model must give."""

    image: object
    prompt: str
    target: str


def collate(backbone: Backbone, examples: list[SupervisedExample]) -> dict:
    """Vision inputs plus right-padded ``prompt + answer`` rows, labelled on the answers."""
    vision_inputs = backbone.preprocess([e.image for e in examples], [e.prompt for e in examples])
    prompts = [backbone.prompt_ids(e.prompt, e.image) for e in examples]
    answers = [backbone.answer_ids(e.target) for e in examples]
    input_ids, attention_mask = pad([p + a for p, a in zip(prompts, answers)], backbone.pad_token_id, "right")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    device = next(backbone.parameters()).device
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {"vision_inputs": vision_inputs, **{k: v.to(device) for k, v in batch.items()}}


def shared_prefix_length(input_ids: torch.Tensor, image_token_id: int) -> int:
    """How many leading tokens every row shares, up to the first image placeholder (images
    differ between rows) and leaving at least one token per row."""
    same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != image_token_id)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def answer_loss(backbone: Backbone, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens.

    The template's opening (system prompt), shared by every row, runs once and reaches the rows
    through the decoder's KV cache, fanned out to the batch; gradients flow back through it.
    The head runs on the scored positions only.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = backbone.encode_vision(**batch["vision_inputs"])
    shared = shared_prefix_length(ids, backbone.image_token_id)
    cache = None
    if shared:
        cache = backbone.new_cache()
        backbone.lm_forward(backbone.embed(ids[:1, :shared]), None, mask[:1, :shared], cache)
        cache.batch_repeat_interleave(len(ids))
    rest = ids[:, shared:]
    hidden = backbone.lm_forward(
        backbone.embed(rest), vision, mask, cache, image_mask=rest == backbone.image_token_id
    ).hidden
    targets = shift_labels(batch["labels"])[:, shared:]
    scored = targets != IGNORE_INDEX
    return F.cross_entropy(backbone.lm_head(hidden[scored]).float(), targets[scored])


def lr_factor(step: int, settings: FinetuneSettings) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine down to the floor."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_steps = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / decay_steps, 1.0)
    floor = settings.final_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def supervised_finetune(
    backbone: Backbone,
    examples: Iterable[SupervisedExample],
    settings: FinetuneSettings,
    progress: bool = True,
) -> list[float]:
    """Train every parameter of ``backbone`` on ``examples`` (at least ``steps * batch_size``
    of them) and return the loss of each step. The backbone is left frozen and in eval mode.
    """
    torch.manual_seed(settings.seed)
    backbone.requires_grad_(True)
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    stream: Iterator[SupervisedExample] = iter(examples)
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="pretraining", unit="step", disable=not progress)
    try:
        for _ in bar:
            batch_examples = list(islice(stream, settings.batch_size))
            if len(batch_examples) < settings.batch_size:
                raise ValueError(f"the examples ran out after {len(losses)} of {settings.steps} steps")
            loss = answer_loss(backbone, collate(backbone, batch_examples))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if len(losses) % 25 == 0:
                bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}")
    finally:
        bar.close()
        backbone.requires_grad_(False)
        backbone.eval()
    return losses
