"""Evaluation output folders: what produced them, and when a rerun may continue one.

Every evaluation folder carries the output marker of :mod:`mllm_pib.outputs`, extended with the
evaluation's *identity*: everything its answers and scores depend on —

- the model: backbone, its feature option and weight dtype, the base weights' fingerprint and the
  PIB's (``"identity"`` for a block whose gates are all closed, which changes nothing);
- the inputs: the sha256 of every question, annotation or description file read;
- the generation settings (``batch_size`` excepted: batching does not change the answers);
- the package version.

A rerun with the same identity continues where the earlier one stopped. Any difference is
refused with one line naming each differing field (``field: old → new``); ``--overwrite``
deletes the files the earlier evaluation wrote and starts afresh; a non-empty folder without the
marker, or another command's, is refused whatever the flags. Score files carry the identity too.

Under ``torchrun`` every process decides from the folder as it finds it, then one prepares it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from mllm_pib import __version__
from mllm_pib.errors import UserError
from mllm_pib.evaluation.runner import GenerationSettings, barrier, distributed
from mllm_pib.io import read_json
from mllm_pib.outputs import MARKER, OutputKind, claim

POPE = OutputKind("eval pope", "POPE evaluation", ("answers_*.jsonl", "pope.json"), "pope.json", resumable=True)
CHAIR = OutputKind("eval chair", "CHAIR evaluation", ("descriptions*.jsonl", "chair.json"), "chair.json", resumable=True)
SHR = OutputKind(
    "eval shr", "SHR evaluation", ("descriptions*.jsonl", "judge_cache.jsonl", "judgements.jsonl", "metrics.json"),
    "metrics.json", resumable=True,
)
POPE_SPLITS = OutputKind("eval pope build", "set of POPE splits", ("coco_pope_*.json",), "coco_pope_adversarial.json",
                         resumable=True)
REPORT = OutputKind("eval run", "evaluation report", ("report.json", "report.md", "*.png"), "report.json",
                    resumable=True)


def open_folder(path: str | os.PathLike, kind: OutputKind, identity: dict, overwrite: bool = False) -> Path:
    """Make ``path`` ready for an evaluation of ``identity``: new, continued, or (``overwrite``)
    emptied of what the earlier evaluation wrote. Every process calls it.

    Raises:
        UserError: the folder holds another evaluation (naming the differing fields), another
            command's output, or files no evaluation wrote.
    """
    path = Path(path)
    decision = _decide(path, kind, identity, overwrite)  # only reads, on every process
    barrier()
    if distributed()[0] == 0:
        dataclasses.replace(decision, extra={"identity": identity}).prepare()
    barrier()
    return path


def _decide(path: Path, kind: OutputKind, identity: dict, overwrite: bool):
    marker = _own_marker(path, kind)
    if overwrite or marker is None or not any(e.name != MARKER for e in path.iterdir()):
        return claim(path, kind, overwrite=overwrite)  # new or replaced; refuses what is not ours
    changes = differences(marker.get("identity") or {}, identity)
    if changes:
        raise UserError(
            f"{path}: holds a {kind.what} of something else ({'; '.join(changes)}); give --overwrite to "
            "replace it, or choose another output folder"
        )
    return claim(path, kind, resume=True)


def _own_marker(path: Path, kind: OutputKind) -> dict | None:
    if not (path / MARKER).is_file():
        return None
    marker = read_json(path / MARKER)
    return marker if isinstance(marker, dict) and marker.get("written_by") == f"mllm-pib {kind.command}" else None


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"field: old → new"`` for every leaf that differs between two nested dicts."""
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {_show(a)} → {_show(b)}")
    return changes


def _show(value) -> str:
    return "(none)" if value is None else str(value)


# ---------------------------------------------------------------------------- identity


def identity(model, inputs: dict[str, list[str | os.PathLike]], generation: dict | None, **more) -> dict:
    """The identity of evaluating ``model`` (``None``: given answers) on ``inputs`` (role ->
    files) with ``generation`` settings; ``more`` adds fields (the judge of SHR)."""
    return {
        "mllm_pib_version": __version__,
        "model": model_identity(model) if model is not None else None,
        "inputs": {role: file_digests(files) for role, files in inputs.items()},
        "generation": generation,
        **more,
    }


def generation_settings(settings: GenerationSettings, **prompting) -> dict:
    """The settings that decide the answers: all but ``batch_size``, plus how prompts are made."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"} | prompting


def model_identity(model) -> dict:
    """Backbone, feature, dtype, and the fingerprints of the base weights and of what was
    trained: the PIB, with the LoRA adapters and the head when those trained."""
    trained_head = model.ref_lm_head is not None  # kept as the reference when the head trains
    base = model.backbone.identity(exclude=["lm_head"] if trained_head else [])
    return {
        "backbone": base["backbone"],
        "feature": base["feature"],
        "dtype": base["dtype"],
        "base_fingerprint": base["fingerprint"],
        "pib_fingerprint": pib_fingerprint(model, trained_head),
    }


def pib_fingerprint(model, trained_head: bool = False) -> str:
    """sha256 (16 hex digits) of the trained weights, or ``"identity"`` when the block's gates
    are all closed and nothing else trained (the model is then its base)."""
    trained = {f"pib.{k}": v for k, v in model.pib.state_dict().items()}
    trained |= {f"backbone.{k}": v for k, v in model.backbone.state_dict().items() if "lora_" in k}
    if trained_head:
        trained |= {f"lm_head.{k}": v for k, v in model.backbone.lm_head.state_dict().items()}
    gates_closed = all(not v.any() for k, v in trained.items() if k.startswith("pib.") and k.endswith("_gate"))
    if gates_closed and not any(not k.startswith("pib.") for k in trained):
        return "identity"
    digest = hashlib.sha256()
    for name, tensor in sorted(trained.items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def digest(obj) -> str:
    """sha256 of a JSON-serialisable value (e.g. the list of images described)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_digests(files: list[str | os.PathLike]) -> dict[str, str]:
    """``{file name: sha256}``; files are named without their folder, so that a moved copy of
    the same inputs is recognised."""
    digests: dict[str, str] = {}
    for path in map(Path, files):
        if path.name in digests:  # same name in two folders: keep both apart
            digests[str(path)] = sha256(path)
        else:
            digests[path.name] = sha256(path)
    return digests


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    return digest.hexdigest()
