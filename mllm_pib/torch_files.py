"""Reading PyTorch pickle files (``torch.save`` output) without running code from them.

A pickle can name any importable callable and have the unpickler call it, so a file from
anywhere is read only with ``torch.load(weights_only=True)``: torch's restricted unpickler
rebuilds tensors, numbers, strings and plain containers, plus the classes a caller lists in
``allowed``, which it may construct from stored arguments and give stored attributes; callers
list only plain data classes whose construction does nothing else. Any other callable or class
is refused before it is called or built. A refusal, like a damaged file, is a one-line
:class:`UnsafePickleError` naming the file and the first thing refused, instead of torch's
multi-paragraph message.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mllm_pib.errors import UserError

CONVERT_HINT = "convert it to safetensors with the tool that made it"


class UnsafePickleError(UserError):
    """A PyTorch pickle that holds more than data, or that cannot be read at all."""


def load_torch_file(path: str | os.PathLike, *, allowed: Iterable[type] = (), map_location: Any = "cpu",
                    what: str = "file", hint: str = CONVERT_HINT) -> Any:
    """``torch.load(path, weights_only=True)`` with the classes ``allowed`` besides torch's own.

    Raises:
        UnsafePickleError: naming ``path``: it is missing, damaged, or refers to a callable or
            class outside the allowed ones (which is then never called or built).
    """
    with refused_pickles(path, what=what, hint=hint):
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def refused_pickles(*files: str | os.PathLike, what: str = "file", hint: str = CONVERT_HINT) -> Iterator[None]:
    """Turn the errors of the weights-only loads of ``files`` in the block into one-line errors
    naming the file (of several, the first whose pickle refers to something not allowed)."""
    try:
        yield
    except FileNotFoundError as err:
        raise UnsafePickleError(f"{err.filename}: {what} not found") from None
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(
            f"{_culprit(files)}: refused to unpickle this {what}: {refusal(err)}; only tensors and plain "
            f"containers are read from PyTorch pickles (torch.load with weights_only=True) and nothing in it "
            f"was run; {hint}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, RuntimeError) and not _is_file_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        names = " or ".join(map(str, files))
        raise UnsafePickleError(f"{names}: cannot read this {what} as a PyTorch file ({first})") from None


def _culprit(files: tuple) -> str:
    """The file of ``files`` with a refused reference, found by listing (not running) each pickle's
    references; all of them when none can be singled out."""
    for path in files:
        try:
            if torch.serialization.get_unsafe_globals_in_checkpoint(path):
                return str(path)
        except (OSError, ValueError, RuntimeError, EOFError):
            return str(path)  # not even a zip-format torch file
    return " or ".join(map(str, files))


def refusal(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    text = str(err)
    named = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if named:
        return f"it refers to {named.group(1)}, which is not allowed"
    detail = re.search(r"WeightsUnpickler error: *([^\n]+)", text)
    if detail:
        return detail.group(1).strip().rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _is_file_error(err: RuntimeError) -> bool:
    """A torch error about the file's format (a zip reader or stream failure), not about its use."""
    text = str(err)
    return any(marker in text for marker in ("PytorchStreamReader", "zip archive", "Invalid magic number",
                                             "failed finding central directory", "storage has wrong byte size"))


__all__ = ["UnsafePickleError", "load_torch_file", "refused_pickles", "refusal"]
