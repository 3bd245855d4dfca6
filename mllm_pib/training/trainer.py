"""``PIBTrainer``: ``transformers.Trainer`` with the preference step as its loss.

Gradient accumulation, mixed precision, DeepSpeed, ``report_to``, logging, save steps and
resume all come from ``Trainer``; this class only computes the loss, averages the objective's
metrics over each logging window (as TRL does) and saves/loads checkpoints in the PIB format
(trained weights only).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from mllm_pib.checkpoint import load_parts, read_checkpoint, save_checkpoint
from mllm_pib.training.preference import PreferenceStep


class PIBTrainer(Trainer):
    def __init__(self, *args, step: PreferenceStep, policy, **kwargs):
        super().__init__(*args, **kwargs)
        self.step = step
        self.policy = policy
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.step(inputs)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.state.global_step} on pairs {inputs['pair_ids']}; "
                "the last saved checkpoint is intact — lower the learning rate or check these examples"
            )
        for name, value in metrics.items():
            self._metrics[name].append(float(value))
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            logs.update({name: sum(v) / len(v) for name, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_checkpoint(output_dir or self.args.output_dir, self.model, self.policy)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        _, state, _ = read_checkpoint(resume_from_checkpoint)
        load_parts(model or self.model, state, resume_from_checkpoint)
