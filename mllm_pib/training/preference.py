"""One preference-optimisation step: policy and reference answer log-probs, then the loss.

No second model: the reference is the same model with the block bypassed and the original
``lm_head``. When nothing upstream of the block trains, the backbone's hidden states are
computed once, without gradient, and shared by policy and reference; with LoRA on the LLM the
reference reruns the backbone with the adapters disabled; when other upstream parts train
(e.g. the projector) it reruns with their initial weights.
"""

from __future__ import annotations

import contextlib

import torch

from mllm_pib.config import LossConfig
from mllm_pib.freezing import FreezePolicy, adapters_disabled
from mllm_pib.model import AnswerScores
from mllm_pib.objectives import preference_loss


class PreferenceStep:
    def __init__(self, model, policy: FreezePolicy, loss: LossConfig, shared_prefix: bool = True):
        self.model = model
        self.policy = policy
        self.loss = loss
        self.shared_prefix = shared_prefix
        # initial weights of trained upstream parts (other than LoRA): the reference keeps them
        self.reference_weights = {
            name: param.detach().clone()
            for name, param in model.backbone.named_parameters()
            if param.requires_grad and "lora_" not in name and not _is_head(model, param)
        }

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self.model
        n_pairs = len(batch["pair_ids"])
        if batch.get("cached"):
            return self._cached(batch, n_pairs)
        upstream_trains = self.policy.trains_before_pib

        with torch.set_grad_enabled(upstream_trains and torch.is_grad_enabled()):
            vision = model.backbone.encode_vision(**batch["vision_inputs"])
            rows = model.pair_hidden(batch, vision, self.shared_prefix)
        policy_scores = model.score_answers(rows.hidden, rows.vision(vision), rows.labels, rows.text_mask, policy=True)

        with torch.no_grad():
            if upstream_trains:
                with self._reference_backbone():
                    if _trained(vision):  # else only the LLM trains (LoRA): the images are the same
                        vision = model.backbone.encode_vision(**batch["vision_inputs"])
                    rows = model.pair_hidden(batch, vision, self.shared_prefix)
            ref_scores = model.score_answers(rows.hidden, rows.vision(vision), rows.labels, rows.text_mask, policy=False)

        return self._loss(policy_scores, ref_scores, n_pairs)

    def _cached(self, batch: dict, n_pairs: int):
        """The same step on a feature-cache batch: the backbone's outputs are read, not computed."""
        from mllm_pib.training.feature_cache import cached_vision

        hidden = batch["hidden"].to(self.model.backbone.lm_head.weight.dtype)
        policy_scores = self.model.score_answers(hidden, cached_vision(batch), batch["labels"], batch["text_mask"], policy=True)
        return self._loss(policy_scores, AnswerScores(batch["ref_logps"], batch["ref_counts"]), n_pairs)

    def _loss(self, policy_scores: AnswerScores, ref_scores: AnswerScores, n_pairs: int):
        pick = (lambda s: s.mean_logps) if self.loss.averaged else (lambda s: s.logps)
        policy_logps, ref_logps = pick(policy_scores), pick(ref_scores)
        chosen_nll = -policy_scores.mean_logps[:n_pairs]
        loss, metrics = preference_loss(
            policy_logps[:n_pairs], policy_logps[n_pairs:], ref_logps[:n_pairs], ref_logps[n_pairs:],
            beta=self.loss.beta, loss_type=self.loss.type, label_smoothing=self.loss.label_smoothing,
            sft_weight=self.loss.sft_weight, policy_chosen_nll=chosen_nll,
        )
        metrics["nll/chosen"] = chosen_nll.detach().mean()
        return loss, metrics

    @contextlib.contextmanager
    def _reference_backbone(self):
        backbone = self.model.backbone
        stack = contextlib.ExitStack()
        if self.policy.uses_lora:
            stack.enter_context(adapters_disabled(backbone.parts()["llm"]))
        with stack:
            if not self.reference_weights:
                yield
                return
            weights = self.reference_weights
            # swap the trained tensors for their initial values for the duration of the call
            saved = {name: param.data for name, param in backbone.named_parameters() if name in weights}
            for name, param in backbone.named_parameters():
                if name in weights:
                    param.data = weights[name]
            try:
                yield
            finally:
                for name, param in backbone.named_parameters():
                    if name in saved:
                        param.data = saved[name]


def _trained(vision) -> bool:
    return any(t is not None and t.requires_grad for t in (vision.pib, vision.llm))


def _is_head(model, param) -> bool:
    return any(param is p for p in model.backbone.lm_head.parameters())

