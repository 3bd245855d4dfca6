"""Small file helpers shared by the project: atomic writes and JSON-lines reading/appending.

Writes that replace a file go through a temporary file in the same directory and
``os.replace``, so a crash never leaves a half-written result. Temporary files and folders are
created with the ordinary modes (0666/0777 less the umask), so what lands in place is as
readable as any file the user creates. Append-only logs (answers, judgment caches) are JSON
lines where only newline-terminated lines count: a line cut short by a crash is dropped by
:func:`repair_jsonl_tail` and written again on resume.

Output folders of commands are guarded by :mod:`mllm_pib.outputs`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mllm_pib.errors import UserError


def sibling_temp_name(path: Path) -> Path:
    """A fresh hidden name next to ``path`` for a temporary file or folder."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def umask() -> int:
    """The process's umask (read without changing it where the system allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a new file or folder gets
    under the umask: writers such as safetensors create their files 0600, which would keep
    colleagues on a shared machine from reading them."""
    mask = umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for the block to write; it replaces ``path`` when the
    block succeeds (with the umask's mode, see :func:`apply_umask`) and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_name(path)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``), creating parents."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: the name is ours alone
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``), creating parents."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file of objects; blank lines are skipped.

    Raises:
        UserError: naming the file and line of a missing file, invalid JSON or a non-object line.
    """
    path = Path(path)
    records = []
    # split on "\n" only: str.splitlines would also cut at U+2028 inside unescaped JSON strings
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            records.append(_parse_object(line, path, lineno))
    return records


def read_json(path: str | os.PathLike, errors: str = "strict") -> Any:
    """Parse a whole JSON document, naming the file and line of a syntax error (``errors``: as
    for :func:`read_text`)."""
    try:
        return json.loads(read_text(path, errors))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def read_json_records(path: str | os.PathLike) -> list[dict]:
    """Read a list of JSON objects stored either as one JSON array or as JSON lines.

    Some published files are named ``.json`` but hold JSON lines, others are pretty-printed
    arrays; the first non-blank character decides.
    """
    if not read_text(path).lstrip().startswith("["):
        return read_jsonl(path)
    records = read_json(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: element {index} is {type(record).__name__}, expected an object")
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append ``records`` as JSON lines and flush, creating the file and its parents if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut an unterminated last line (a write interrupted by a crash) from a JSON-lines log.

    Only newline-terminated lines are complete records, whether or not the cut text happens to
    parse. Returns the number of bytes removed (0 when the file is absent or intact).
    """
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as handle:
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        handle.truncate(keep)
    return len(data) - keep


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-text file is a :class:`UserError`.
    ``errors="surrogateescape"`` keeps bytes that are not UTF-8 as lone surrogates (U+DC80-DCFF)
    for the caller to find, where one bad record must not reject a whole file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _parse_object(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


@contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory whose contents reach ``path`` only if the block succeeds.

    An absent or empty ``path`` becomes the temporary directory in one ``os.replace``. An existing
    one is swapped out whole with ``replace=True`` (a cache, a model directory); otherwise each
    written file is moved in with ``os.replace`` and files the block did not write are kept. On
    error the temporary directory is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        apply_umask(tmp)
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        elif replace:
            old = sibling_temp_name(target)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = target / src.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_temp_dir(target: Path) -> Path:
    """A new empty hidden folder next to ``target``, with the umask's mode (``mkdtemp`` would
    make it 0700, and a folder renamed into place keeps its mode)."""
    while True:
        tmp = sibling_temp_name(target)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue
