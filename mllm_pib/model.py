"""``PIBModel``: a backbone with a post-interaction block before its ``lm_head``.

``logits = lm_head(pib(lm_forward(embed(input_ids), encode_vision(images))))``

The same object serves training (answer log-probabilities of the policy and of the reference)
and generation (greedy, sampling and beam search, with or without KV cache).

The reference policy is this model as it was when :meth:`PIBModel.keep_reference` ran (which
:meth:`FreezePolicy.apply <mllm_pib.freezing.FreezePolicy.apply>` does), block bypassed: every
backbone weight trained since (LoRA adapters, projector, ..., head) is read from the copy taken
then. :meth:`PIBModel.answer_logps` and :meth:`PIBModel.reference_logps` compute it; no caller
chooses how.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from mllm_pib.backbone import Backbone, VisionFeatures
from mllm_pib.block import PIBConfig, PostInteractionBlock
from mllm_pib.objectives import IGNORE_INDEX, shift_labels, token_logps
from mllm_pib.packing import pack_pairs


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
        """The pairs' images, each once, and the pair of each row: the block projects an
        image once for both of its answers."""
        return replace(vision, rows=self.rows)


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
        backbone.requires_grad_(False)  # frozen until a FreezePolicy trains part of it
        self.pib = pib.to(device=self.device)
        # Set by `keep_reference`: the reference's head (when the head trains) and its other
        # backbone weights that train (LoRA adapters, upstream parts), by parameter name.
        self.ref_lm_head: nn.Module | None = None
        self._reference_weights: dict[str, torch.Tensor] = {}

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

    # --- reference --------------------------------------------------------------------------
    def keep_reference(self) -> None:
        """Make the current backbone the reference: copy every backbone weight that trains
        (``requires_grad``), the head as a frozen module. Call it once the trainable weights are
        chosen and before they change."""
        head = self.backbone.lm_head
        self.ref_lm_head = None
        if any(p.requires_grad for p in head.parameters()):
            self.ref_lm_head = copy.deepcopy(head).requires_grad_(False)
        head_only = self._head_only()
        self._reference_weights = {
            name: param.detach().clone()
            for name, param in self.backbone.named_parameters()
            if param.requires_grad and id(param) not in head_only
        }

    def reference_head(self) -> nn.Module:
        return self.ref_lm_head if self.ref_lm_head is not None else self.backbone.lm_head

    @contextlib.contextmanager
    def reference_backbone(self) -> Iterator[None]:
        """Within this block the backbone runs with the reference's weights."""
        self._check_reference()
        params = dict(self.backbone.named_parameters())
        saved = {name: params[name].data for name in self._reference_weights}
        for name, initial in self._reference_weights.items():
            params[name].data = initial
        try:
            yield
        finally:
            for name, current in saved.items():
                params[name].data = current

    def _check_reference(self) -> None:
        """Refuse to compute a reference that has lost the initial values of trained weights."""
        head_only = self._head_only()
        untracked = [
            name for name, param in self.backbone.named_parameters()
            if param.requires_grad and name not in self._reference_weights
            and not (id(param) in head_only and self.ref_lm_head is not None)
        ]
        if untracked:
            raise RuntimeError(
                f"backbone weights train ({', '.join(untracked[:3])}{', ...' if len(untracked) > 3 else ''}) "
                "but the reference holds no copy of them; call keep_reference() (FreezePolicy.apply does) "
                "before training"
            )

    def _head_only(self) -> set[int]:
        """Ids of the head's own weights (a head tied to the input embeddings owns none)."""
        llm = self.backbone.parts().get("llm")
        upstream = {id(p) for p in llm.parameters()} if llm is not None else set()
        return {id(p) for p in self.backbone.lm_head.parameters()} - upstream

    def _vision_trains(self) -> bool:
        """Whether a weight that the image features depend on trains (anything but the LLM and head)."""
        llm = self.backbone.parts().get("llm")
        text_side = self._head_only() | ({id(p) for p in llm.parameters()} if llm is not None else set())
        return any(p.requires_grad for p in self.backbone.parameters() if id(p) not in text_side)

    def _upstream_trains(self) -> bool:
        head_only = self._head_only()
        return any(p.requires_grad for p in self.backbone.parameters() if id(p) not in head_only)

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
        """Full logits ``[B, T, V]`` (for inspection and tests; training scores answers only);
        ``bypass_pib``: the reference's."""
        if bypass_pib:
            with self.reference_backbone():
                vision = self.backbone.encode_vision(**vision_inputs)
                return self.reference_head()(self.backbone_hidden(input_ids, attention_mask, vision))
        vision = self.backbone.encode_vision(**vision_inputs)
        hidden = self.backbone_hidden(input_ids, attention_mask, vision)
        hidden = self.pib(hidden, vision.pib, vision.pib_mask, text_mask=attention_mask)
        return self.backbone.lm_head(hidden)

    def pair_hidden(self, batch: dict, vision: VisionFeatures, shared_prefix: bool = True) -> "PairHidden":
        """Backbone hidden states of every answer row of a pair batch (see
        :class:`~mllm_pib.data.dataset.PreferenceCollator`), with labels aligned to them.

        With ``shared_prefix`` (backbones whose decoder takes a block mask), each pair runs as
        one decoder row — image + prompt once, then both answers (:mod:`mllm_pib.packing`); the
        rows then hold only what scoring needs: the last prompt position (it predicts the first
        answer token) and the answer positions — or the whole sequence for a block that attends
        over the text. Otherwise each row runs whole. Both give the same hidden states and log-probs.
        """
        bb = self.backbone
        n_pairs = batch["prompt_ids"].shape[0]
        rows = torch.arange(n_pairs, device=batch["prompt_ids"].device).repeat(2)  # chosen rows, rejected rows
        prompt_ids, prompt_mask = batch["prompt_ids"][rows], batch["prompt_mask"][rows]
        answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
        answer_labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
        mask = torch.cat([prompt_mask, answer_mask], 1)
        if not (shared_prefix and bb.packs_pairs):
            ids = torch.cat([prompt_ids, answer_ids], 1)
            hidden = self.backbone_hidden(ids, mask, vision.map(lambda t: t[rows]))
            labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_labels], 1)
            return PairHidden(hidden, labels, mask, rows)
        packed = pack_pairs(batch)
        embeds = bb.embed(packed.ids)
        out = bb.lm_forward(embeds, vision, packed.mask(embeds.dtype), image_mask=packed.ids == bb.image_token_id,
                            position_ids=packed.positions)
        keep = 1 if self.pib.config.position_wise else prompt_ids.shape[1]
        hidden = packed.answer_rows(out.hidden, keep)
        labels = torch.cat([torch.full_like(prompt_ids[:, -keep:], IGNORE_INDEX), answer_labels], 1)
        return PairHidden(hidden, labels, mask[:, -labels.shape[1]:], rows)

    def answer_logps(self, batch: dict, shared_prefix: bool = True) -> tuple[AnswerScores, AnswerScores]:
        """Policy and reference answer log-probs of a pair batch (see
        :class:`~mllm_pib.data.dataset.PreferenceCollator`): chosen rows, then rejected rows.

        The backbone runs once for both while it still equals the reference (nothing upstream
        of the block has changed), and again with the reference's weights otherwise; gradients
        flow into the backbone only when some part of it trains.
        """
        with torch.set_grad_enabled(self._upstream_trains() and torch.is_grad_enabled()):
            vision = self.backbone.encode_vision(**batch["vision_inputs"])
            rows = self.pair_hidden(batch, vision, shared_prefix)
        policy = self.score_answers(rows.hidden, rows.vision(vision), rows.labels, rows.text_mask)
        return policy, self.reference_logps(batch, shared_prefix, computed=(vision, rows))

    @torch.no_grad()
    def reference_logps(
        self, batch: dict, shared_prefix: bool = True, computed: tuple[VisionFeatures, PairHidden] | None = None
    ) -> AnswerScores:
        """Reference answer log-probs of a pair batch: block bypassed, backbone and head as
        they were at :meth:`keep_reference`.

        ``computed``: ``(vision, rows)`` of this batch from the current backbone; reused when
        the backbone still equals the reference, recomputed otherwise.
        """
        self._check_reference()
        if computed is None or self._reference_weights:
            with self.reference_backbone():
                if computed is not None and not self._vision_trains():
                    vision = computed[0]  # only the LLM trains (LoRA): the images encode the same
                else:
                    vision = self.backbone.encode_vision(**batch["vision_inputs"])
                rows = self.pair_hidden(batch, vision, shared_prefix)
        else:
            vision, rows = computed
        return self._score(rows.hidden, rows.vision(vision), rows.labels, rows.text_mask, policy=False)

    def score_answers(
        self, hidden: torch.Tensor, vision: VisionFeatures, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> AnswerScores:
        """The policy's log-probabilities of the labelled tokens given the backbone's hidden
        states (the reference: :meth:`reference_logps`)."""
        return self._score(hidden, vision, labels, attention_mask, policy=True)

    def _score(self, hidden, vision, labels, attention_mask, policy: bool) -> AnswerScores:
        # The block and the head run only on the positions that predict a label when the block
        # is position-wise (the usual case): answers are short next to image + prompt.
        targets = shift_labels(labels)
        index, valid = _scored_positions(targets)
        if policy and not self.pib.config.position_wise:
            hidden = self.pib(hidden, vision.pib, vision.pib_mask, text_mask=attention_mask, vision_index=vision.rows)
        picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if policy and self.pib.config.position_wise:
            picked = self.pib(picked, vision.pib, vision.pib_mask, vision_index=vision.rows)
        head = self.backbone.lm_head if policy else self.reference_head()
        picked_targets = targets.gather(1, index).masked_fill(~valid, 0)
        logps = token_logps(head(picked), picked_targets) * valid
        return AnswerScores(logps=logps.sum(-1), counts=valid.sum(-1))

    # --- generation -------------------------------------------------------------------------
    def prompt_batch(self, images: list, questions: list[str]) -> dict:
        """Left-padded prompts and vision inputs for :meth:`generate`."""
        bb = self.backbone
        rows = [bb.prompt_ids(q, image) for q, image in zip(questions, images, strict=True)]
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
            bypass_pib: generate with the reference (block bypassed, the backbone's weights and
                head as at :meth:`keep_reference`): the base model.

        Returns ``[B, L]`` new token ids, rows padded with the pad id after their end.
        Greedy decoding equals the transformers ``generate`` of the base model when the block
        is the identity; beam search follows its default semantics (length penalty 1,
        ``early_stopping=False``).
        """
        from mllm_pib.generation import Decoder, beam_search, sample_or_greedy

        if num_beams > 1 and do_sample:
            raise ValueError("beam search with sampling is not supported; use num_beams=1")
        with self.reference_backbone() if bypass_pib else contextlib.nullcontext():
            decoder = Decoder(self, vision_inputs, use_cache=use_cache, bypass_pib=bypass_pib)
            if num_beams > 1:
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
