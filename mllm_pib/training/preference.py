"""One preference-optimisation step: policy and reference answer log-probs, then the loss.

No second model: :meth:`PIBModel.answer_logps <mllm_pib.model.PIBModel.answer_logps>` gives the
reference too (the model as it was before training, block bypassed). When nothing upstream of
the block trains, the backbone's hidden states are computed once and shared by both.
"""

from __future__ import annotations

import torch

from mllm_pib.config import LossConfig
from mllm_pib.model import AnswerScores
from mllm_pib.objectives import preference_loss


class PreferenceStep:
    def __init__(self, model, loss: LossConfig, shared_prefix: bool = True):
        self.model = model
        self.loss = loss
        self.shared_prefix = shared_prefix

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_pairs = len(batch["pair_ids"])
        if batch.get("cached"):
            return self._cached(batch, n_pairs)
        policy_scores, ref_scores = self.model.answer_logps(batch, self.shared_prefix)
        return self._loss(policy_scores, ref_scores, n_pairs)

    def _cached(self, batch: dict, n_pairs: int):
        """The same step on a feature-cache batch: the backbone's outputs and the reference's
        log-probs are read, not computed."""
        from mllm_pib.training.feature_cache import cached_vision

        hidden = batch["hidden"].to(self.model.backbone.lm_head.weight.dtype)
        policy_scores = self.model.score_answers(hidden, cached_vision(batch), batch["labels"], batch["text_mask"])
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
