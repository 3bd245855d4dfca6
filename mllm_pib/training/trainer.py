"""``PIBTrainer``: ``transformers.Trainer`` with the preference step as its loss.

Gradient accumulation, mixed precision, DDP (``torchrun``), DeepSpeed ZeRO, ``report_to``,
logging, save steps and resume all come from ``Trainer``; this class computes the loss, averages
the objective's metrics over each logging window and over processes (as TRL does), saves and
loads checkpoints in the PIB format (trained weights only), and makes runs crash-safe:

- resuming picks the newest *complete* ``checkpoint-N`` (a run killed while saving leaves an
  incomplete one, which is skipped and removed);
- a non-finite loss, or non-finite trained weights at a save, stop every process with an error
  naming the step and the pairs, before anything is written over the last good checkpoint;
- resuming runs no code from the checkpoint's pickles (:mod:`~mllm_pib.training.safe_resume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from mllm_pib.checkpoint import check_base, load_parts, read_checkpoint, save_checkpoint
from mllm_pib.errors import UserError
from mllm_pib.log import get_logger
from mllm_pib.torch_files import refused_pickles
from mllm_pib.training.preference import PreferenceStep
from mllm_pib.training.safe_resume import TAMPERED, load_deepspeed_checkpoint

logger = get_logger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class NonFiniteError(UserError):
    """The loss or the trained weights became NaN or infinite."""


class PreferenceModule(nn.Module):
    """The preference step as the forward of a module that owns the PIB model.

    DDP synchronises gradients only for a forward run through its wrapper, and DeepSpeed hooks
    its engine's forward, so the step must be a module call rather than a plain function call.
    """

    def __init__(self, step: PreferenceStep):
        from transformers import PreTrainedConfig

        super().__init__()
        self.model = step.model
        self.step = step
        # DeepSpeed's "auto" bucket sizes are derived from the model config's hidden size
        self.config = PreTrainedConfig(hidden_size=step.model.backbone.hidden_size)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.step(batch)


class PIBTrainer(Trainer):
    """Args: ``model`` (the :class:`~mllm_pib.model.PIBModel` that ``step`` trains), ``step``,
    ``policy`` (what trains, hence what checkpoints keep), ``allow_base_mismatch`` (resume from a
    checkpoint saved on other base weights), and ``Trainer``'s keyword arguments."""

    def __init__(self, model, *, step: PreferenceStep, policy, allow_base_mismatch: bool = False, **kwargs):
        if step.model is not model:
            raise ValueError("the preference step must train the model given to the trainer")
        args = kwargs.get("args")
        check_engine_supports(args, policy)
        if args is not None and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every trained parameter is used at every step
        super().__init__(model=PreferenceModule(step), **kwargs)
        self.pib_model = model
        self.policy = policy
        self.allow_base_mismatch = allow_base_mismatch
        self._metrics: dict[str, list[float]] = defaultdict(list)
        with _gathered(list(model.backbone.parameters())):  # its fingerprint samples the weights
            self._identity = model.backbone.identity(exclude=policy.trained_backbone_parts)

    # --- training ---------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``resume_from_checkpoint=True`` resumes from the newest complete checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._checkpoint_to_resume()
        if resume_from_checkpoint:  # under every engine: DeepSpeed resumes without _load_from_checkpoint
            meta = read_checkpoint(resume_from_checkpoint)[2]
            check_base(meta, self._identity, resume_from_checkpoint, self.allow_base_mismatch)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = model(inputs)
        self._stop_if_non_finite(loss, inputs["pair_ids"])
        for name, value in metrics.items():
            self._metrics[name].append(float(value))
        return (loss, metrics) if return_outputs else loss

    def _stop_if_non_finite(self, loss: torch.Tensor, pair_ids: list[str]) -> None:
        """Every process learns of a non-finite loss on any process and stops (a lone raise
        would leave the others waiting in the gradient all-reduce)."""
        from accelerate.utils import gather_object

        finite = bool(torch.isfinite(loss.detach()).all())
        failures = self.accelerator.reduce(torch.tensor(float(not finite), device=loss.device), reduction="sum")
        if failures.item() == 0:
            return
        bad_pairs = gather_object(list(pair_ids) if not finite else [])
        raise NonFiniteError(
            f"training stopped: non-finite loss at step {self.state.global_step + 1} on the pairs "
            f"{', '.join(bad_pairs)}. {self._kept_checkpoint()} Lower training.learning_rate, or fix "
            "or remove these pairs, then resume with --resume."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            names = sorted(self._metrics)
            local = torch.tensor([sum(self._metrics[n]) / len(self._metrics[n]) for n in names], device=self.args.device)
            averaged = self.accelerator.reduce(local, reduction="mean")  # a collective: every process logs
            logs.update({name: value.item() for name, value in zip(names, averaged)})
            self._metrics.clear()
        super().log(logs, start_time)

    # --- checkpoints ------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 only the trained parameters are gathered (every process takes part): the
        frozen backbone stays partitioned, where ``Trainer`` would gather the whole model."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        with _gathered([p for p in self.pib_model.parameters() if p.requires_grad]):
            self._save(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Writes the PIB checkpoint from the live parameters (whole here under every engine)."""
        if self.args.should_save:
            save_checkpoint(output_dir or self.args.output_dir, self.pib_model, self.policy,
                            extra={"base_model": self._identity})

    def _save_checkpoint(self, model, trial) -> None:
        bad = self._non_finite_parameters()
        if bad:
            raise NonFiniteError(
                f"training stopped: the trained weights became non-finite at step {self.state.global_step} "
                f"(e.g. {', '.join(bad[:3])}); checkpoint-{self.state.global_step} was not written. "
                f"{self._kept_checkpoint()} Lower training.learning_rate, then resume with --resume."
            )
        super()._save_checkpoint(model, trial)

    def _non_finite_parameters(self) -> list[str]:
        """Names of trained parameters holding NaN/inf on any process (ZeRO-3: each checks its shard)."""
        bad = [
            name for name, param in self.pib_model.named_parameters()
            if param.requires_grad and not torch.isfinite(getattr(param, "ds_tensor", param).detach()).all()
        ]
        count = self.accelerator.reduce(torch.tensor(float(len(bad)), device=self.args.device), reduction="sum")
        return bad or (["(on another process)"] if count.item() else [])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        _, state, _ = read_checkpoint(resume_from_checkpoint)
        load_parts(self.pib_model, state, resume_from_checkpoint)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Under DeepSpeed the engine's states are loaded here, weights-only, where ``Trainer``
        would have DeepSpeed unpickle them without restriction."""
        if not (self.is_deepspeed_enabled and resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        prepared = super()._prepare_for_training(max_steps, train_dataloader, None)
        load_deepspeed_checkpoint(self.model_wrapped, resume_from_checkpoint)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return prepared

    # ``Trainer`` reads these files weights-only; a refusal names the file in one line
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        names = ("scheduler.pt",) if self.is_deepspeed_enabled else ("optimizer.pt", "scheduler.pt")
        with refused_pickles(*_existing(checkpoint, names), what="training state file", hint=TAMPERED):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        with refused_pickles(*_existing(checkpoint, ("scaler.pt",)), what="training state file", hint=TAMPERED):
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        with refused_pickles(*_existing(checkpoint, (name,)), what="training state file", hint=TAMPERED):
            super()._load_rng_state(checkpoint)

    def _checkpoint_to_resume(self) -> str:
        out = Path(self.args.output_dir)
        checkpoints = sorted_checkpoints(out)
        complete = next((c for c in reversed(checkpoints) if checkpoint_problem(c) is None), None)
        if complete is None:
            found = "; ".join(f"{c.name}: {checkpoint_problem(c)}" for c in checkpoints) or "none"
            raise UserError(
                f"{out}: no complete checkpoint to resume from (checkpoints found: {found}); "
                "start afresh with --overwrite instead of --resume, or point --out at the run to continue"
            )
        newer = [c for c in checkpoints if step_of(c) > step_of(complete)]
        self.accelerator.wait_for_everyone()  # every process has chosen before anything is removed
        for broken in newer:
            logger.info(f"resume: {broken} is incomplete ({checkpoint_problem(broken)}); removing it")
            if self.args.should_save:
                shutil.rmtree(broken, ignore_errors=True)
        logger.info(f"resume: continuing from {complete}")
        return str(complete)

    def _kept_checkpoint(self) -> str:
        checkpoints = [c for c in sorted_checkpoints(Path(self.args.output_dir)) if checkpoint_problem(c) is None]
        if not checkpoints:
            return "No checkpoint had been saved yet."
        return f"The last good checkpoint, {checkpoints[-1]}, is intact."


def _existing(checkpoint: str | None, names: tuple[str, ...]) -> list[Path]:
    return [Path(checkpoint) / name for name in names if checkpoint and (Path(checkpoint) / name).is_file()]


def check_engine_supports(args, policy) -> None:
    """ZeRO-3 trains the PIB alone: the reference policy of the other freeze policies needs
    whole upstream weights (a copy of the original ``lm_head``, the initial projector, the
    untied embeddings), which ZeRO-3 keeps partitioned across processes."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None or not ds_config.is_zero3():
        return
    others = sorted(part for part, mode in policy.parts.items() if part != "pib" and mode != "freeze")
    if others:
        raise UserError(
            f"training.deepspeed: {args.deepspeed} is ZeRO-3, which supports training the PIB alone "
            f"(freeze: stage1), but this freeze policy also trains {', '.join(others)}; use "
            "configs/deepspeed/zero2.json, which keeps the (frozen) weights whole on every process"
        )


def start_distributed(args) -> None:
    """Join the launcher's process group before the backbone loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them (``zero.Init``) and
    must see every process. ``TrainingArguments`` starts DeepSpeed's communication itself on
    accelerators; with ``use_cpu`` it starts only ``torch.distributed``, so it is done here.
    """
    if not args.deepspeed:
        return
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # not started by a launcher: a group of one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _ = args.device  # starts torch.distributed from the launcher's environment
    deepspeed.init_distributed()  # reuses that group; a no-op when already started


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_of(checkpoint: Path) -> int:
    return int(CHECKPOINT_DIR.match(checkpoint.name).group(1))


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories of a run, oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if CHECKPOINT_DIR.match(p.name) and p.is_dir()), key=step_of)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or ``None`` when it is complete.

    ``Trainer`` writes the model, the optimizer, the RNG states and, last, ``trainer_state.json``;
    the PIB files are each replaced atomically with their metadata last. A parseable trainer
    state for this step plus a readable PIB checkpoint therefore means a finished save.
    """
    state_file = checkpoint / TRAINER_STATE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({err})"
    if state.get("global_step") != step_of(checkpoint):
        return f"{TRAINER_STATE} is for step {state.get('global_step')}"
    try:
        read_checkpoint(checkpoint)
    except UserError as err:
        return str(err)
    return None


def _gathered(params: list[nn.Parameter]):
    """A context where ``params`` are whole, also when ZeRO-3 partitioned them (a collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


__all__ = [
    "PIBTrainer", "PreferenceModule", "NonFiniteError", "start_distributed", "check_engine_supports",
    "checkpoint_problem", "sorted_checkpoints",
]
