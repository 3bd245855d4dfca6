"""Progress and status messages go to stderr through the ``mllm_pib`` logger, so that stdout
carries only a command's result (tables, JSON) for scripts to read."""

from __future__ import annotations

import logging
import sys

ROOT = "mllm_pib"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def configure(level: int = logging.INFO) -> None:
    """Plain messages on stderr (called once by the CLI)."""
    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
