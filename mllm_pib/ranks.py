"""This process's rank among those a launcher started (``torchrun``, ``deepspeed``), read from the
environment the launcher sets, so that it is known before the processes are connected.

Work done once for all processes (messages, files, the bootstrap of a self-contained run) is
done by rank 0; the others skip it or wait for its result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from mllm_pib.errors import UserError


def rank() -> int:
    """The global rank (0 when not started by a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_first() -> bool:
    return rank() == 0


def wait_for_first(done: Callable[[], bool], what: str, timeout: float = 600.0, poll: float = 0.2) -> None:
    """On ranks other than 0: wait until ``done()`` (rank 0 has finished ``what``); a no-op on
    rank 0. The result must appear atomically (a file renamed into place, written last)."""
    if is_first():
        return
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise UserError(
                f"rank {rank()}: rank 0 did not finish {what} within {timeout:.0f} s (see its error); the "
                "processes must share the file system it writes to"
            )
        time.sleep(poll)


__all__ = ["rank", "is_first", "wait_for_first"]
