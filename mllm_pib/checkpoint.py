"""PIB checkpoints: the trained weights only, in safetensors, with what they belong to.

A checkpoint directory holds::

    pib_config.json         the PIBConfig
    model.safetensors       trained tensors, named "<part>.<parameter>": always "pib.*";
                            "lm_head.*" when the head trained; "llm.*lora_*" for LoRA adapters
    pib_checkpoint.json     format version, package version, the base model's identity
                            (backbone, model id, feature, widths, fingerprint), freeze policy

Nothing is ever read with pickle. A checkpoint is refused when loaded into a backbone of another
name, hidden size, vision width or feature option, and — unless explicitly allowed — onto base
weights other than those it was trained on (the recorded fingerprint, see :func:`check_base`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mllm_pib import __version__
from mllm_pib.block import PIBConfig, PostInteractionBlock
from mllm_pib.errors import UserError
from mllm_pib.freezing import FreezePolicy
from mllm_pib.io import atomic_path, atomic_write_json
from mllm_pib.log import get_logger
from mllm_pib.outputs import OutputKind, claim

logger = get_logger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "pib_config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "pib_checkpoint.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def trained_state(model, policy: FreezePolicy) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: the PIB, plus every part the policy trained."""
    parts = model.parts()
    state = {f"pib.{k}": v for k, v in parts["pib"].state_dict().items()}
    for part, mode in policy.parts.items():
        if part == "pib" or mode == "freeze":
            continue
        for name, tensor in parts[part].state_dict().items():
            if mode == "train" or "lora_" in name:
                state[f"{part}.{name}"] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(path: str | os.PathLike, model, policy: FreezePolicy, extra: dict | None = None) -> None:
    """Write a checkpoint into ``path`` (other files there are kept, e.g. a run's checkpoints).

    Each file is replaced atomically and the metadata, which readers check first, goes last:
    a crash leaves either the previous checkpoint or the new one, never a truncated file.
    """
    path = Path(path)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(trained_state(model, policy), tmp)
    atomic_write_json(path / CONFIG_FILE, model.pib.config.model_dump())
    atomic_write_json(path / META_FILE, {
        "format_version": FORMAT_VERSION,
        "mllm_pib_version": __version__,
        "base_model": model.backbone.identity(exclude=policy.trained_backbone_parts),
        "freeze_policy": policy.model_dump(),
        **(extra or {}),
    })


def read_checkpoint(path: str | os.PathLike) -> tuple[PIBConfig, dict[str, torch.Tensor], dict]:
    """Read config, tensors and metadata; every problem is a :class:`UserError` naming the file."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise UserError(
            f"{path}: a pickle file; PIB checkpoints are directories with safetensors weights and "
            "are never unpickled (pickle can run arbitrary code)"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path}: not a PIB checkpoint ({name} is missing)")
    try:
        config = PIBConfig.model_validate_json((path / CONFIG_FILE).read_text())
    except ValueError as err:
        raise UserError(f"{path / CONFIG_FILE}: invalid PIB config: {err}") from None
    try:
        state = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path / WEIGHTS_FILE}: unreadable safetensors file ({err}); it may be truncated") from None
    meta = json.loads((path / META_FILE).read_text())
    return config, state, meta


STRUCTURE = ("backbone", "hidden_size", "pib_vision_size", "feature")


def check_base(meta: dict, current: dict, path, allow_base_mismatch: bool = False) -> None:
    """Refuse to put a PIB onto a base other than the one it was trained on.

    ``current`` is the loaded backbone's :meth:`~mllm_pib.backbone.Backbone.identity`. Another
    backbone, width or feature option is always refused (the weights cannot fit); other base
    weights (the fingerprint) are refused unless ``allow_base_mismatch``.
    """
    base = meta.get("base_model", {})
    for key in STRUCTURE:
        if base.get(key) != current[key]:
            raise UserError(
                f"{path}: this PIB was trained for {key} {base.get(key)!r} but the loaded backbone has "
                f"{current[key]!r}; load it into the backbone it was trained on "
                f"({base.get('backbone')!r}, model {base.get('model_id')!r})"
            )
    differences = base_differences(base, current)
    if differences is None:
        logger.warning(
            f"{path}: the PIB was trained on {base.get('dtype')} weights and the base is loaded in "
            f"{current['dtype']}: its fingerprint cannot be compared across these precisions (load it in "
            "float32 or in the training precision to have it checked)"
        )
    elif differences and not allow_base_mismatch:
        raise UserError(
            f"{path}: this PIB was trained on another base model ({'; '.join(differences)}); load it onto "
            "the base it was trained on, or pass --allow-base-mismatch (allow_base_mismatch=True) to use it anyway"
        )
    elif differences:
        logger.warning(f"{path}: loaded onto another base model than it was trained on ({'; '.join(differences)})")


def base_differences(recorded: dict, current: dict) -> list[str] | None:
    """``["field: recorded → current", ...]`` when the base weights differ, ``[]`` when they are
    the same, ``None`` when the two precisions cannot be compared.

    The fingerprints are compared at the narrower precision of the two: a base loaded in float32
    rounds its sample to the precision the PIB was trained in, and a PIB trained in float32
    recorded its sample rounded to each half precision. bfloat16 against float16 cannot be compared.
    """
    dtypes = {recorded.get("dtype", "float32"), current["dtype"]}
    narrower = dtypes - {"float32"} or {"float32"}
    if len(narrower) > 1:
        return None
    (dtype,) = narrower
    old, new = _fingerprint_at(recorded, dtype), _fingerprint_at(current, dtype)
    if old is None:
        return None
    if old == new:
        return []
    at = "" if dtype == "float32" else f" (compared in {dtype})"
    differences = [f"fingerprint: {old} → {new}{at}"]
    if recorded.get("model_id") != current["model_id"]:
        differences.append(f"model_id: {recorded.get('model_id')!r} → {current['model_id']!r}")
    return differences


def _fingerprint_at(identity: dict, dtype: str) -> str | None:
    if identity.get("dtype", "float32") == dtype:
        return identity.get("fingerprint")
    return identity.get("fingerprints", {}).get(dtype)


def load_checkpoint(path: str | os.PathLike, backbone, *, allow_base_mismatch: bool = False):
    """Build a :class:`~mllm_pib.model.PIBModel` from ``backbone`` and a checkpoint, after
    checking it was trained on this base (see :func:`check_base`)."""
    from mllm_pib.model import PIBModel

    config, state, meta = read_checkpoint(path)
    policy = FreezePolicy.model_validate(meta.get("freeze_policy", {}))
    check_base(meta, backbone.identity(exclude=policy.trained_backbone_parts), path, allow_base_mismatch)
    model = PIBModel(backbone, PostInteractionBlock(config))
    # the training's parts and adapters; the reference keeps the base weights they replace
    policy.apply(model)
    load_parts(model, state, path)
    model.requires_grad_(False)
    return model.eval()


def load_parts(model, state: dict[str, torch.Tensor], path) -> None:
    """Copy "<part>.<name>" tensors into the model's parts, refusing unknown or missing ones."""
    parts = model.parts()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        part, _, name = key.partition(".")
        if part not in parts:
            raise UserError(f"{path}: weights for part {part!r}, which this backbone lacks")
        grouped.setdefault(part, {})[name] = tensor
    for part, tensors in grouped.items():
        strict = part == "pib"
        missing, unexpected = parts[part].load_state_dict(tensors, strict=False)
        if unexpected or (strict and missing):
            raise UserError(
                f"{path}: {part} weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


EXPORT_SUBDIR = "pib"
EXPORT_OUTPUT = OutputKind(command="export", what="exported model", writes=(), done=EXPORT_SUBDIR)


def export_model(
    pib_path: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
    allow_base_mismatch: bool = False, overwrite: bool = False, **options,
) -> Path:
    """Write a standalone model directory: the base model in its own layout, plus the PIB
    checkpoint (with the trained head or adapters) under ``pib/``. Every command that takes a
    model path loads it whole with :func:`load_model`. A folder that is not empty is refused
    unless it holds an earlier export and ``overwrite`` is set (see :mod:`mllm_pib.outputs`)."""
    from mllm_pib.plugins import get_backbone

    _, _, meta = read_checkpoint(pib_path)
    output = claim(out, EXPORT_OUTPUT, overwrite=overwrite)
    base_meta = meta["base_model"]
    options = {"feature": base_meta["feature"], **options}
    backbone = get_backbone(base_meta["backbone"]).load(str(base), **options)
    with output.staged() as tmp:
        backbone.save_pretrained(str(tmp))  # the original weights: the reference stays intact
        model = load_checkpoint(pib_path, backbone, allow_base_mismatch=allow_base_mismatch)
        policy = FreezePolicy.model_validate(meta["freeze_policy"])
        # records the base saved here (its frozen parts are unchanged by the load)
        save_checkpoint(tmp / EXPORT_SUBDIR, model, policy, extra={"exported_from": str(pib_path)})
    return output.path


def pib_path(model_path: str, pib: str | None) -> str | None:
    """The PIB checkpoint to load: ``pib``, else the one an exported model directory holds."""
    exported = Path(model_path or "") / EXPORT_SUBDIR
    if pib is None and model_path and (exported / META_FILE).is_file():
        return str(exported)
    return pib


def backbone_name(model_path: str, backbone: str | None = None, pib: str | None = None) -> str:
    """The backbone :func:`load_model` uses: ``backbone`` when given, else the PIB checkpoint's
    (``pib`` or an exported model's), else the one registering the ``model_type`` of
    ``model_path/config.json`` (see :func:`mllm_pib.plugins.resolve_backbone`)."""
    from mllm_pib.plugins import resolve_backbone

    pib = pib_path(model_path, pib)
    recorded = read_checkpoint(pib)[2].get("base_model", {}).get("backbone") if pib else None
    return resolve_backbone(model_path, backbone or recorded)


def load_model(
    model_path: str, backbone: str | None = None, pib: str | None = None, *,
    allow_base_mismatch: bool = False, **options,
):
    """Load a :class:`~mllm_pib.model.PIBModel` from one path.

    ``model_path`` is a base model (then the PIB comes from ``pib``, or is the identity) or an
    exported directory (base + ``pib/``). The backbone name defaults to the PIB's, then to the one
    registering the model's ``config.json`` ``model_type`` (see :func:`backbone_name`). A PIB is
    refused on a base other than its own unless ``allow_base_mismatch`` (see :func:`check_base`).
    """
    from mllm_pib.model import PIBModel
    from mllm_pib.plugins import get_backbone, resolve_backbone

    pib = pib_path(model_path, pib)
    base_meta = read_checkpoint(pib)[2].get("base_model", {}) if pib else {}
    name = resolve_backbone(model_path, backbone or base_meta.get("backbone"))
    if base_meta and base_meta.get("backbone") != name:
        raise UserError(
            f"{pib}: this PIB was trained for backbone {base_meta.get('backbone')!r} "
            f"(model {base_meta.get('model_id')!r}), not {name!r}; load it with the backbone it was trained on"
        )
    if "feature" in base_meta:
        options.setdefault("feature", base_meta["feature"])
    loaded = get_backbone(name).load(model_path, **options)
    if pib:
        return load_checkpoint(pib, loaded, allow_base_mismatch=allow_base_mismatch)
    return PIBModel(loaded).eval()
