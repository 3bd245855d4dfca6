"""Small file helpers shared by the project: atomic writes and JSON-lines reading/appending.

Writes that replace a file go through a temporary file in the same directory and
``os.replace``, so a crash never leaves a half-written result. Append-only logs (answers,
judgment caches) are JSON lines where only newline-terminated lines count: a line cut short by
a crash is dropped by :func:`repair_jsonl_tail` and written again on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mllm_pib.errors import UserError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``), creating parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_json(path: str | os.PathLike) -> Any:
    """Parse a whole JSON document, naming the file and line of a syntax error."""
    try:
        return json.loads(read_text(path))
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


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-text file is a :class:`UserError`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = target / src.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
