"""Progress and status messages go to stderr through the ``mllm_pib`` logger, so that stdout
carries only a command's result (tables, JSON) for scripts to read."""

from __future__ import annotations

import logging
import sys

ROOT = "mllm_pib"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


class _Stderr(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, which redirections (and test captures) replace."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: int = logging.INFO) -> None:
    """Plain messages on stderr (called once by the CLI). Under a launcher, status messages come
    from rank 0 alone (the others would repeat them); warnings and errors from every rank."""
    from mllm_pib.ranks import is_first

    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level if is_first() else max(level, logging.WARNING))
