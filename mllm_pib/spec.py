"""What a plugin registers for a backbone. Torch-free, so listing backbones stays instant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class BackboneSpec:
    """What a plugin registers: a backbone name and how to load it.

    Attributes:
        name: the registry name users type (``--backbone NAME``).
        description: one line shown by ``mllm-pib backbones``.
        load: ``load(model_path, **options) -> Backbone``; ``options`` are backbone-specific
            (for example ``feature="clip"``), listed in :attr:`options`; every ``load`` also
            accepts ``dtype`` and ``device``.
        options: option name -> one-line help, for ``mllm-pib backbones`` and config errors.
        write_tiny: optional ``write_tiny(out_dir, seed=0, **options)`` that writes a tiny random
            checkpoint in the backbone's published layout, with a locally trained tokenizer,
            loadable by ``load(out_dir)``; used by tests, tiny configs and benchmarks.
        model_types: the transformers ``model_type`` values (``config.json``) of the checkpoints
            this backbone loads.
    """

    name: str
    description: str
    load: Callable[..., Any]
    options: dict[str, str] = field(default_factory=dict)
    write_tiny: Callable[..., None] | None = None
    model_types: tuple[str, ...] = ()
