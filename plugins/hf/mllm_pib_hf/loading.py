"""Loading a published (hub layout) checkpoint with its processor."""

from __future__ import annotations

from pathlib import Path

from mllm_pib.backbone import resolve_dtype
from mllm_pib.errors import UserError
from mllm_pib.io import read_json
from mllm_pib.processor_backbone import image_only_processor


def published_model_type(cls, model_path: str | None, accepted: tuple[str, ...]) -> str:
    """The ``config.json`` ``model_type`` of ``model_path``, checked to be one of ``accepted``
    (the model types the ``cls.name`` backbone loads)."""
    if model_path is None:
        raise UserError(f"the {cls.name} backbone needs a model path (a directory in the published hub layout)")
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; expected a {cls.name} model directory in the published hub layout")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type not in accepted:
        raise UserError(f"{path / 'config.json'}: model_type {model_type!r} is not {' or '.join(map(repr, accepted))}; "
                        f"the {cls.name} backbone loads {' and '.join(accepted)} checkpoints only")
    return model_type


def load_published(cls, model_class, processor_class, model_path: str | None, *, feature: str | None, dtype, device):
    """``cls(model, processor)`` from a directory in the published hub layout, checked to hold a
    ``cls.name`` model."""
    published_model_type(cls, model_path, (cls.name,))
    return load_classes(cls, model_class, image_only_processor(processor_class), model_path,
                        feature=feature, dtype=dtype, device=device)


def load_classes(cls, model_class, processor_class, model_path: str, *, feature: str | None, dtype, device):
    """``cls(model, processor)`` read with ``model_class`` and ``processor_class`` (one that loads
    without a video processor), frozen."""
    model = model_class.from_pretrained(Path(model_path), dtype=resolve_dtype(dtype))
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    processor = processor_class.from_pretrained(Path(model_path))
    return cls(model, processor, feature=feature, model_id=str(model_path))
