"""mllm-pib: post-interaction blocks trained with DPO against object hallucination."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module defining it; imported on first access so that `import mllm_pib` (and
# `mllm-pib --help`) never pays for torch
_LAZY_EXPORTS = {
    "BackboneSpec": "mllm_pib.spec",
    "hookimpl": "mllm_pib.hookspecs",
    "get_backbone": "mllm_pib.plugins",
    "list_backbones": "mllm_pib.plugins",
}

__all__ = ["__version__", *_LAZY_EXPORTS]

if TYPE_CHECKING:
    from mllm_pib.spec import BackboneSpec
    from mllm_pib.hookspecs import hookimpl
    from mllm_pib.plugins import get_backbone, list_backbones


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})
