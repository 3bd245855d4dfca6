"""Sequence log-probabilities and preference losses.

Labels follow the transformers convention: ``labels[:, t]`` is the token at position ``t`` and
``ignore_index`` marks positions that are not scored. The logits at position ``t`` predict the
token at ``t + 1``; :func:`shift_labels` performs that one-position shift, and it is the only
place in the project where it happens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the logits: ``targets[:, t] = labels[:, t + 1]``; the last position
    predicts nothing and gets ``ignore_index``."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target under ``logits`` (same leading shape); ignored targets
    must have been replaced by a valid id by the caller."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean) of the label tokens' log-probabilities, per sequence.

    Args:
        logits: ``[B, T, V]`` model outputs for the whole sequence.
        labels: ``[B, T]`` token ids, ``ignore_index`` where not scored (prompt, padding).
        average: divide by the number of scored tokens (length-normalised, as IPO uses).

    Returns ``[B]`` float32.
    """
    targets = shift_labels(labels, ignore_index)
    scored = targets != ignore_index
    logps = token_logps(logits, targets.masked_fill(~scored, 0)) * scored
    total = logps.sum(-1)
    return total / scored.sum(-1).clamp(min=1) if average else total


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    policy_chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss over a batch of pairs; returns the mean loss and detached metrics.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (log-ratio margin):

    * ``sigmoid`` — DPO (Rafailov et al., 2023): ``-log sigma(beta h)``; with
      ``label_smoothing = e`` it becomes conservative DPO, ``-(1-e) log sigma(beta h) - e log
      sigma(-beta h)``.
    * ``robust`` — robust DPO (Chowdhury et al., 2024), unbiased under a label-flip rate
      ``e``: ``(-(1-e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e)``.
    * ``ipo`` — IPO (Azar et al., 2023): ``(h - 1 / (2 beta))^2``; pass length-averaged
      log-probs, as the paper does.
    * ``hinge`` — SLiC-style: ``max(0, 1 - beta h)``.

    ``sft_weight > 0`` adds ``sft_weight * policy_chosen_nll`` (per-pair NLL of the chosen
    answer), which keeps the chosen likelihood from drifting down.

    Metrics use the names of the ecosystem (TRL): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose sigmoid, ipo, hinge or robust")

    if sft_weight:
        if policy_chosen_nll is None:
            raise ValueError("sft_weight > 0 needs policy_chosen_nll")
        losses = losses + sft_weight * policy_chosen_nll

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics
