"""Typed training configuration, read from YAML with ``--set key=value`` overrides.

Unknown or ill-typed keys are refused with the valid choices listed; ``training`` takes the
fields of ``transformers.TrainingArguments`` (checked against them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from mllm_pib.block import PIBConfig
from mllm_pib.errors import UserError
from mllm_pib.evaluation.report import PopeSection
from mllm_pib.freezing import PRESETS, FreezePolicy
from mllm_pib.io import read_text

# The block's options without its widths, which come from the backbone.
PIBOptions = create_model(
    "PIBOptions",
    __config__=ConfigDict(extra="forbid"),
    **{name: (field.annotation, field) for name, field in PIBConfig.model_fields.items()
       if name not in ("hidden_size", "vision_size")},
)


# checkpoint-N folders a run keeps (the newest ones; the final PIB in the output folder is
# always kept); ``training.save_total_limit: null`` keeps them all
SAVE_TOTAL_LIMIT = 3


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(Strict):
    """One preference file. ``images``: a Visual Genome folder (with ``image_data.json``) or
    any folder of ``{image_id}.jpg|png``; default: the data file's folder."""

    format: Literal["desc", "pope", "generic"]
    path: str
    images: str | None = None


class LossConfig(Strict):
    type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    sft_weight: float = Field(default=0.0, ge=0)
    average_logps: bool | None = Field(default=None, description="length-normalise (default: only for ipo)")

    @property
    def averaged(self) -> bool:
        return self.type == "ipo" if self.average_logps is None else self.average_logps


class Bootstrap(Strict):
    """Self-contained runs: build a tiny model and synthetic data when the paths are absent."""

    tiny_model: bool = False
    tiny_options: dict[str, Any] = Field(default_factory=dict,
                                         description="options given to the backbone's write_tiny (e.g. a layout)")
    synthetic_scenes: int = Field(default=0, ge=0, description="scenes of the synthetic world to export")
    data_dir: str | None = Field(default=None, description="where the synthetic data is exported")
    seed: int = 0


class TrainConfig(Strict):
    backbone: str | None = Field(default=None, description="default: the backbone registering the model_type "
                                 "of model/config.json")
    model: str | None = Field(default=None, description="base model path (None: backbone options assemble it)")
    backbone_options: dict[str, Any] = Field(default_factory=dict)
    data: list[DataSource] = Field(min_length=1)
    pib: PIBOptions = Field(default_factory=PIBOptions)
    freeze: Literal["stage1", "stage2", "projector"] | FreezePolicy = "stage1"
    loss: LossConfig = Field(default_factory=LossConfig)
    max_length: int = Field(default=2048, gt=0)
    max_bad_records: int = Field(default=100, ge=0)
    allow_outside_images: bool = Field(
        default=False, description="use image paths that lead outside their image root (.., absolute, symlinks)")
    feature_cache: str | None = None
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    pope: PopeSection | None = Field(default=None, description="POPE evaluation of the trained PIB")
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("feature_cache")
    @classmethod
    def _cache_needs_frozen_inputs(cls, value, info):
        freeze = info.data.get("freeze", "stage1")
        policy = FreezePolicy.preset(freeze) if isinstance(freeze, str) else freeze
        if value and policy.trains_before_pib:
            raise ValueError(
                "the cache holds frozen backbone outputs, but the freeze policy trains parts before the "
                "PIB (LoRA or the projector); drop feature_cache or freeze those parts"
            )
        return value

    @model_validator(mode="after")
    def _detect_backbone(self):
        """A config may leave out ``backbone`` when ``model`` has a ``config.json`` whose
        ``model_type`` one backbone registers (a :class:`UserError` says why not otherwise)."""
        if self.backbone is None:
            from mllm_pib.plugins import resolve_backbone

            self.backbone = resolve_backbone(self.model)
        return self

    def freeze_policy(self) -> FreezePolicy:
        return FreezePolicy.preset(self.freeze) if isinstance(self.freeze, str) else self.freeze

    def training_arguments(self):
        """``TrainingArguments`` from the ``training`` section; unknown keys list close matches."""
        import dataclasses

        from transformers import TrainingArguments

        fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
        for key in self.training:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"training.{key}: not a TrainingArguments field{hint}")
        training = {key: _typed(key, value, fields[key].default) for key, value in self.training.items()}
        args = {"output_dir": "outputs/pib", "remove_unused_columns": False, "report_to": "none",
                "save_total_limit": SAVE_TOTAL_LIMIT, **training}
        try:
            return TrainingArguments(**args)
        except (TypeError, ValueError) as err:
            raise UserError(f"training: invalid TrainingArguments: {err}") from None


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of a TrainingArguments field's default (the dataclass
    does not check); numeric strings are converted, as YAML reads ``1e-5`` (no dot) as text."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"training.{key}: expected true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"training.{key}: expected a number, got {value!r}") from None
            value = int(value) if isinstance(default, int) and value.is_integer() else value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"training.{key}: expected a number, got {value!r}")
    return value


def load_config(path: str | Path, overrides: list[str] = (), model=TrainConfig):
    """Read a YAML config, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values")
    for override in overrides:
        apply_override(raw, override)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: invalid config:\n{describe_errors(err, model)}") from None
    except UserError as err:  # a check that needs more than the config, e.g. the model's backbone
        raise UserError(f"{path}: {err}") from None


def apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected key=value (e.g. --set loss.beta=0.2)")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {override!r}: {part} is not a section")
    node[leaf] = parse_value(value)


def parse_value(text: str):
    """A command-line value: numbers as numbers (YAML reads ``1e-3`` as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise UserError(f"value {text!r}: not valid YAML ({problem}); quote it to pass it as text") from None


def describe_errors(err: ValidationError, model) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = f"unknown key; valid keys here: {', '.join(_valid_keys(model, problem['loc'][:-1]))}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _valid_keys(model, loc) -> list[str]:
    node = model
    for part in loc:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            continue
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        node = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), node)
    return sorted(getattr(node, "model_fields", {}))


__all__ = ["TrainConfig", "DataSource", "LossConfig", "PIBOptions", "Bootstrap", "load_config", "PRESETS"]
