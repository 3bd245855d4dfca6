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
            Declare ``feature``: a PIB checkpoint records the backbone's ``feature`` and is
            reloaded (``generate``, ``eval``, ``export``) with ``load(..., feature=...)``.
        write_tiny: optional ``write_tiny(out_dir, seed=0, **options)`` that writes a tiny random
            checkpoint in the backbone's published layout, with a locally trained tokenizer,
            loadable by ``load(out_dir)``; used by tests, tiny configs and benchmarks. It takes
            the :attr:`options` and the :attr:`tiny_options`.
        tiny_options: option name -> one-line help, for options only ``write_tiny`` takes (the
            tiny tokenizer's corpus, a layout); ``load`` is never given them.
        model_types: the transformers ``model_type`` values (the ``config.json`` field) of the
            checkpoints ``load`` reads; a command given ``--model DIR`` without ``--backbone``
            picks the backbone that claims the ``model_type`` of ``DIR/config.json``.
    """

    name: str
    description: str
    load: Callable[..., Any]
    options: dict[str, str] = field(default_factory=dict)
    write_tiny: Callable[..., None] | None = None
    model_types: tuple[str, ...] = ()
    tiny_options: dict[str, str] = field(default_factory=dict)
