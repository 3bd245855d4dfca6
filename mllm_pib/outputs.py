"""Output folders that commands own: never delete or overwrite what a command did not write.

Every command that writes a folder (``train``, ``cache``, ``sweep``, ``export``, ``tiny-model``,
``demo``) leaves a marker file, :data:`MARKER`, naming the command and the entries it writes.
Before writing, the command looks at its folder:

- absent, empty, or holding only its own marker: it is used;
- written by the same command: refused unless ``--resume`` (continue; commands that can) or
  ``--overwrite`` (delete the entries the marker lists, then start afresh; anything else in the
  folder, such as a notes file, is kept);
- anything else (no marker, or another command's): refused, whatever the flags.

The look (:func:`claim`) only reads, so every process of a distributed run can make it before
one of them writes (:meth:`Claim.prepare`). Commands that produce their output all at once build
it in a staging folder and move it in (:meth:`Claim.staged`), so a crash never leaves a half
output behind.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mllm_pib import __version__
from mllm_pib.errors import UserError
from mllm_pib.io import apply_umask, atomic_write_json, make_temp_dir, read_json

MARKER = ".mllm-pib-output.json"

Mode = Literal["new", "resume", "overwrite"]


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output folder.

    Attributes:
        command: the command, as users type it after ``mllm-pib`` (``"train"``).
        what: what the folder holds, for messages (``"a training run"``).
        writes: top-level names or glob patterns of the entries the command writes; a staged
            output records the exact names it wrote instead.
        done: the entry whose presence marks a complete output (moved in last when staged).
        resumable: whether ``--resume`` can continue an earlier output.
    """

    command: str
    what: str
    writes: tuple[str, ...]
    done: str
    resumable: bool = False

    @property
    def flags(self) -> str:
        return "--resume to continue it or --overwrite to replace it" if self.resumable else "--overwrite to replace it"


@dataclass(frozen=True)
class Claim:
    """A command's right to write ``path``, decided by :func:`claim`."""

    path: Path
    kind: OutputKind
    mode: Mode
    previous: tuple[str, ...] = ()  # what the earlier output's marker says it wrote
    extra: dict = field(default_factory=dict)  # more for the marker to record (an evaluation's identity)

    def prepare(self) -> Path:
        """Create the folder and mark it as this command's. ``--overwrite`` first deletes what
        the earlier output wrote; ``--resume`` keeps it, and the marker then lists what both wrote."""
        if self.mode == "overwrite":
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        kept = self.previous if self.mode == "resume" else ()
        self._mark(dict.fromkeys([*kept, *self.kind.writes]))
        return self.path

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield an empty staging folder next to ``path``; when the block succeeds its entries
        replace the earlier output (``done`` last), else the staging folder is removed and
        ``path`` is untouched."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(self.path)
        try:
            yield staging
            apply_umask(staging)
            written = sorted(entry.name for entry in staging.iterdir())
            patterns = [glob.escape(name) for name in written]
            if self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            if not self.path.exists():
                atomic_write_json(staging / MARKER, self._marker(patterns))
                os.replace(staging, self.path)  # one rename: all of it or nothing
                return
            self._clear()
            self._mark(patterns)  # before the entries it names, so they are never unclaimed
            for name in sorted(written, key=lambda name: name == self.kind.done):
                os.replace(staging / name, self.path / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def owned(self) -> list[Path]:
        """The entries of ``path`` that the earlier output wrote (``done`` first)."""
        if not self.path.is_dir():
            return []
        entries = [e for e in self.path.iterdir() if any(fnmatch.fnmatchcase(e.name, p) for p in self.previous)]
        return sorted(entries, key=lambda e: e.name != self.kind.done)

    def _clear(self) -> None:
        for entry in self.owned():  # the done entry first: a crash midway leaves an incomplete output
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _marker(self, writes) -> dict:
        return {"written_by": f"mllm-pib {self.kind.command}", "writes": list(writes), "mllm_pib_version": __version__,
                **self.extra}

    def _mark(self, writes) -> None:
        atomic_write_json(self.path / MARKER, self._marker(writes))


def claim(path: str | os.PathLike, kind: OutputKind, resume: bool = False, overwrite: bool = False) -> Claim:
    """Decide, without writing anything, whether ``kind``'s command may write ``path``.

    Raises:
        UserError: naming the folder, what holds it and the flag to give, when it is refused.
    """
    path = Path(path)
    if resume and overwrite:
        raise UserError("give either --resume or --overwrite, not both")
    if resume and not kind.resumable:
        raise UserError(f"mllm-pib {kind.command} cannot resume; give --overwrite to replace {path}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: is a file, not a folder; choose another output folder")
    entries = {e.name for e in path.iterdir()} if path.is_dir() else set()
    marker = _read_marker(path) if MARKER in entries else None
    if marker is not None and marker.get("written_by") != f"mllm-pib {kind.command}":
        raise UserError(
            f"{path}: holds the output of `{marker.get('written_by')}`, not of `mllm-pib {kind.command}`; "
            "choose another output folder"
        )
    if not entries - {MARKER}:
        if resume:
            raise UserError(f"{path}: there is no earlier `mllm-pib {kind.command}` output to resume; start without --resume")
        return Claim(path, kind, "new", tuple(marker["writes"]) if marker else ())
    if marker is None:
        raise UserError(
            f"{path}: the folder is not empty and was not written by `mllm-pib {kind.command}` "
            f"(no {MARKER}); nothing in it is deleted or overwritten: choose a new or empty folder"
        )
    if resume or overwrite:
        return Claim(path, kind, "resume" if resume else "overwrite", tuple(marker["writes"]))
    state = "a finished" if (path / kind.done).exists() else "an unfinished"
    raise UserError(
        f"{path}: holds {state} {kind.what} of an earlier `mllm-pib {kind.command}`; give {kind.flags}, "
        "or choose another output folder"
    )


def _read_marker(path: Path) -> dict:
    marker = read_json(path / MARKER)
    if not isinstance(marker, dict) or not isinstance(marker.get("writes"), list):
        raise UserError(f"{path / MARKER}: not a valid output marker; choose another output folder")
    return marker
