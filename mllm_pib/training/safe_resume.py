"""Resuming from a checkpoint's state files without running code from them.

A resumed run reads pickles: ``Trainer``'s ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and
``rng_state*.pth`` (it loads them with ``torch.load(weights_only=True)``), and under DeepSpeed
the engine's ``global_stepN/*_states.pt``, which DeepSpeed 0.19 loads with
``weights_only=False``: a pickle planted there would run code on every rank. Here DeepSpeed's
reads go through :func:`~mllm_pib.torch_files.load_torch_file` instead, allowing besides
torch's own types exactly the classes DeepSpeed stores in those files (see
:func:`deepspeed_state_types`), and every refusal becomes a one-line error naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from mllm_pib.errors import UserError
from mllm_pib.torch_files import load_torch_file

DEEPSPEED_TAG = re.compile(r"^global_step\d+$")
TAMPERED = "the checkpoint was changed after it was written: remove it to resume from an earlier one, or start afresh"


def deepspeed_state_types() -> tuple[type, ...]:
    """The classes DeepSpeed 0.19 pickles into its model and ZeRO optimizer states, besides
    tensors and plain containers: the ZeRO stage (an enum), the loss scaler (static, or dynamic
    under fp16) and ZeRO-1/2's parameter slice addresses (a dataclass of two ints). The model
    states hold only tensors, sizes, strings, numbers and dicts."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


class WeightsOnlyLoads:
    """Stands in for a DeepSpeed engine's checkpoint engine while it loads a checkpoint: the
    same object in every respect, except that files are read weights-only."""

    def __init__(self, inner):
        self._inner = inner
        self._allowed = deepspeed_state_types()

    def load(self, path: str, map_location=None):
        return load_torch_file(path, allowed=self._allowed, map_location=map_location,
                               what="DeepSpeed state file", hint=TAMPERED)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def load_deepspeed_checkpoint(engine, checkpoint: str | Path) -> None:
    """Restore ``engine``'s module, optimizer and ZeRO partitions from ``checkpoint``."""
    checkpoint = Path(checkpoint)
    if engine.load_universal_checkpoint():
        raise UserError(
            "training.deepspeed: the DeepSpeed config loads universal checkpoints "
            "(checkpoint.load_universal), which DeepSpeed reads with unrestricted unpickling; "
            "resume from the run's own checkpoints with load_universal off"
        )
    tag = deepspeed_tag(checkpoint)
    original = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoads(original)
    try:
        load_path, _ = engine.load_checkpoint(str(checkpoint), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise UserError(f"{checkpoint / tag}: DeepSpeed found no model state to resume from; {TAMPERED}")


def deepspeed_tag(checkpoint: Path) -> str:
    """The ``global_stepN`` folder the checkpoint's ``latest`` file names, which must be one of
    the checkpoint's own folders (a path there would make DeepSpeed read files elsewhere)."""
    latest = checkpoint / "latest"
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{latest}: unreadable ({err}); {TAMPERED}") from None
    if not DEEPSPEED_TAG.match(tag) or not (checkpoint / tag).is_dir():
        raise UserError(f"{latest}: names {tag[:80]!r}, not a global_stepN folder of {checkpoint}; {TAMPERED}")
    return tag


__all__ = ["deepspeed_state_types", "load_deepspeed_checkpoint", "deepspeed_tag", "WeightsOnlyLoads", "TAMPERED"]
