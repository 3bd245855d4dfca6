"""``PIBModel``: a backbone with a post-interaction block before its ``lm_head``.

``logits = lm_head(pib(lm_forward(embed(input_ids), encode_vision(images))))``

The same object serves training (answer log-probabilities of the policy and of the reference,
which is this model with the block bypassed and the original head) and generation (greedy,
sampling and beam search, with or without KV cache).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mllm_pib.backbone import Backbone, VisionFeatures
from mllm_pib.block import PIBConfig, PostInteractionBlock
from mllm_pib.objectives import IGNORE_INDEX, shift_labels, token_logps


@dataclass
class AnswerScores:
    """Per-sequence answer log-probabilities and token counts."""

    logps: torch.Tensor  # [B] sum of answer-token log-probs
    counts: torch.Tensor  # [B] number of scored tokens

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.logps / self.counts.clamp(min=1)


@dataclass
class PairHidden:
    """Hidden states of the answer rows of a pair batch and what scoring them needs."""

    hidden: torch.Tensor  # [2B, L, H]
    labels: torch.Tensor  # [2B, L] answer tokens, IGNORE_INDEX elsewhere
    text_mask: torch.Tensor  # [2B, L]
    rows: torch.Tensor  # [2B] pair index of each row

    def vision(self, vision: VisionFeatures) -> VisionFeatures:
        return vision.map(lambda t: t[self.rows])


class PIBModel(nn.Module):
    """A backbone plus a post-interaction block.

    Args:
        backbone: any :class:`~mllm_pib.backbone.Backbone`.
        pib: the block; ``None`` builds a fresh (identity) one from ``pib_config``.
        pib_config: keyword overrides for :class:`PIBConfig`; the widths come from the backbone.
    """

    def __init__(
        self,
        backbone: Backbone,
        pib: PostInteractionBlock | None = None,
        pib_config: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        if pib is None:
            config = PIBConfig(
                hidden_size=backbone.hidden_size,
                vision_size=backbone.pib_vision_size,
                **(pib_config or {}),
            )
            pib = PostInteractionBlock(config)
        check_pib_fits(pib.config, backbone)
        self.pib = pib.to(device=self.device)
        # Set by `keep_reference_head` when lm_head trains: the reference keeps the original.
        self.ref_lm_head: nn.Module | None = None

    def train(self, mode: bool = True) -> "PIBModel":
        """Only the block follows ``mode``: the backbone stays in eval mode (no dropout in
        frozen parts, and policy and reference see the same backbone function)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def parts(self) -> dict[str, nn.Module]:
        """Named parts for the freezing policy: the backbone's parts plus ``pib``."""
        return {**self.backbone.parts(), "pib": self.pib}

    def keep_reference_head(self) -> None:
        """Freeze a copy of the current ``lm_head`` for the reference policy (stage 2)."""
        head = copy.deepcopy(self.backbone.lm_head)
        head.requires_grad_(False)
        self.ref_lm_head = head

    def reference_head(self) -> nn.Module:
        return self.ref_lm_head if self.ref_lm_head is not None else self.backbone.lm_head

    # --- forward ----------------------------------------------------------------------------
    def backbone_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision: VisionFeatures,
    ) -> torch.Tensor:
        """Final hidden states of the backbone for whole sequences ``[B, T, H]``."""
        bb = self.backbone
        out = bb.lm_forward(
            bb.embed(input_ids), vision, attention_mask, image_mask=input_ids == bb.image_token_id
        )
        return out.hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_inputs: dict[str, torch.Tensor],
        bypass_pib: bool = False,
    ) -> torch.Tensor:
        """Full logits ``[B, T, V]`` (for inspection and tests; training scores answers only)."""
        vision = self.backbone.encode_vision(**vision_inputs)
        hidden = self.backbone_hidden(input_ids, attention_mask, vision)
        if bypass_pib:
            return self.reference_head()(hidden)
        hidden = self.pib(hidden, vision.pib, vision.pib_mask, text_mask=attention_mask)
        return self.backbone.lm_head(hidden)

    def pair_hidden(self, batch: dict, vision: VisionFeatures, shared_prefix: bool = True) -> "PairHidden":
        """Backbone hidden states of every answer row of a pair batch (see
        :class:`~mllm_pib.data.dataset.PreferenceCollator`), with labels aligned to them.

        With ``shared_prefix`` (backbones with a KV cache), image + prompt run through the
        decoder once per pair and both answers continue from that cache; the rows then hold
        only what scoring needs: the last prompt position (it predicts the first answer token)
        and the answer positions — or the whole sequence for a block that attends over the
        text. Otherwise each row runs whole. Both give the same hidden states and log-probs.
        """
        bb = self.backbone
        n_pairs = batch["prompt_ids"].shape[0]
        rows = torch.arange(n_pairs, device=batch["prompt_ids"].device).repeat(2)  # chosen rows, rejected rows
        prompt_ids, prompt_mask = batch["prompt_ids"][rows], batch["prompt_mask"][rows]
        answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
        answer_labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
        mask = torch.cat([prompt_mask, answer_mask], 1)
        if not (shared_prefix and hasattr(bb, "new_cache")):
            ids = torch.cat([prompt_ids, answer_ids], 1)
            hidden = self.backbone_hidden(ids, mask, vision.map(lambda t: t[rows]))
            labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_labels], 1)
            return PairHidden(hidden, labels, mask, rows)
        cache = bb.new_cache()
        prompt = bb.lm_forward(bb.embed(batch["prompt_ids"]), vision, batch["prompt_mask"], cache,
                               image_mask=batch["prompt_ids"] == bb.image_token_id)
        cache.reorder_cache(rows)  # one copy of the prompt's cache per answer row
        answers = bb.lm_forward(bb.embed(answer_ids), None, mask, cache).hidden
        keep = 1 if self.pib.config.position_wise else prompt_ids.shape[1]
        hidden = torch.cat([prompt.hidden[rows, -keep:], answers], 1)
        labels = torch.cat([torch.full_like(prompt_ids[:, -keep:], IGNORE_INDEX), answer_labels], 1)
        return PairHidden(hidden, labels, mask[:, -labels.shape[1]:], rows)

    def score_answers(
        self,
        hidden: torch.Tensor,
        vision: VisionFeatures,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        policy: bool = True,
    ) -> AnswerScores:
        """Log-probabilities of the labelled tokens given the backbone's hidden states.

        ``policy=False`` scores the reference: block bypassed, original head. The block and
        the head run only on the positions that predict a label when the block is
        position-wise (the usual case): answers are short next to image + prompt.
        """
        targets = shift_labels(labels)
        index, valid = _scored_positions(targets)
        if policy and not self.pib.config.position_wise:
            hidden = self.pib(hidden, vision.pib, vision.pib_mask, text_mask=attention_mask)
        picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if policy and self.pib.config.position_wise:
            picked = self.pib(picked, vision.pib, vision.pib_mask)
        head = self.backbone.lm_head if policy else self.reference_head()
        picked_targets = targets.gather(1, index).masked_fill(~valid, 0)
        logps = token_logps(head(picked), picked_targets) * valid
        return AnswerScores(logps=logps.sum(-1), counts=valid.sum(-1))

    # --- generation -------------------------------------------------------------------------
    def prompt_batch(self, images: list, questions: list[str]) -> dict:
        """Left-padded prompts and vision inputs for :meth:`generate`."""
        bb = self.backbone
        rows = [bb.prompt_ids(q) for q in questions]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), bb.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "vision_inputs": bb.preprocess(images, questions),
        }

    def generate_text(self, images: list, questions: list[str], **generate_kwargs) -> list[str]:
        """Answer each (image, question) with :meth:`generate`; returns decoded answers."""
        batch = self.prompt_batch(images, questions)
        tokens = self.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"], **generate_kwargs)
        return [self.decode(row) for row in tokens.tolist()]

    def decode(self, tokens: list[int]) -> str:
        """Text of generated tokens, up to (not including) the first stop sequence."""
        from mllm_pib.generation import first_stop

        end = first_stop(tokens, self.backbone.stop_sequences)
        return self.backbone.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_inputs: dict[str, torch.Tensor],
        *,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        bypass_pib: bool = False,
        stop: Callable[[list[int]], bool] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate continuations of left-padded prompts.

        Args:
            stop: called with a row's new token ids after each step; ``True`` ends that row
                (e.g. at the first sentence end for POPE). The backbone's stop sequences
                always end a row (the returned tokens include the sequence).
            bypass_pib: generate with the base model (block bypassed, original head).

        Returns ``[B, L]`` new token ids, rows padded with the pad id after their end.
        Greedy decoding equals the transformers ``generate`` of the base model when the block
        is the identity; beam search follows its default semantics (length penalty 1,
        ``early_stopping=False``).
        """
        from mllm_pib.generation import Decoder, beam_search, sample_or_greedy

        decoder = Decoder(self, vision_inputs, use_cache=use_cache, bypass_pib=bypass_pib)
        if num_beams > 1:
            if do_sample:
                raise ValueError("beam search with sampling is not supported; use num_beams=1")
            return beam_search(decoder, input_ids, attention_mask, num_beams, max_new_tokens, stop)
        return sample_or_greedy(
            decoder, input_ids, attention_mask, max_new_tokens, stop,
            do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
        )


def check_pib_fits(config: PIBConfig, backbone: Backbone) -> None:
    """Refuse a block whose widths do not match the backbone."""
    if config.hidden_size != backbone.hidden_size:
        raise ValueError(
            f"the PIB expects hidden size {config.hidden_size} but backbone {backbone.name!r} "
            f"has {backbone.hidden_size}"
        )
    if config.uses_vision and config.vision_size != backbone.pib_vision_size:
        raise ValueError(
            f"the PIB expects vision features of width {config.vision_size} but backbone "
            f"{backbone.name!r} with feature {backbone.feature!r} gives {backbone.pib_vision_size}"
        )


def _scored_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, A]`` of the positions with a target, left-aligned, and their validity."""
    scored = targets != IGNORE_INDEX
    width = max(int(scored.sum(-1).max()), 1)
    # stable sort puts scored positions first, in order
    order = torch.sort((~scored).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = scored.gather(1, order)
    return order, valid
