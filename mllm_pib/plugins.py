"""The backbone registry, filled by the plugins of the entry-point group ``mllm_pib``.

Every installed distribution that declares an entry point in the group ``mllm_pib`` is loaded
and registered with a :class:`pluggy.PluginManager`; its ``mllm_pib_register_backbones`` hook
(see :mod:`mllm_pib.hookspecs`) names the backbones it provides. Built-in backbones are
plugins too, so a third-party backbone is exactly as capable as a built-in one.

Plugins are isolated from each other: a plugin whose import or hook raises, or whose hook
returns something other than a list of :class:`~mllm_pib.backbone.BackboneSpec`, is recorded
in :attr:`Registry.errors` with its distribution and skipped; the others still load. A backbone
name claimed by two plugins is unusable (asking for it raises a :class:`UserError` naming both
distributions) while every other backbone keeps working. The environment variable
``MLLM_PIB_DISABLE_PLUGINS`` (comma-separated entry-point names) blocks plugins before they are
imported.

Example::

    from mllm_pib import get_backbone

    backbone = get_backbone("llava").load("path/to/llava-1.5-7b-hf", feature="clip")
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pluggy

from mllm_pib import hookspecs
from mllm_pib.spec import BackboneSpec

if TYPE_CHECKING:
    from mllm_pib.backbone import Backbone
from mllm_pib.errors import UserError
from mllm_pib.outputs import OutputKind, claim

ENTRY_POINT_GROUP = "mllm_pib"
DISABLE_ENV = "MLLM_PIB_DISABLE_PLUGINS"
HOOK_NAME = "mllm_pib_register_backbones"


@dataclass(frozen=True)
class PluginRef:
    """Where a plugin comes from.

    Attributes:
        distribution: name of the installed distribution that declares the entry point.
        version: that distribution's version.
        entry_point: the entry point's name (the name ``MLLM_PIB_DISABLE_PLUGINS`` takes).
    """

    distribution: str
    version: str
    entry_point: str

    @classmethod
    def of(cls, entry_point: EntryPoint) -> "PluginRef":
        dist = entry_point.dist
        if dist is None:
            return cls(distribution="<unknown>", version="<unknown>", entry_point=entry_point.name)
        return cls(distribution=dist.name, version=dist.version, entry_point=entry_point.name)

    def __str__(self) -> str:
        return f"distribution {self.distribution!r} {self.version} (entry point {self.entry_point!r})"


@dataclass(frozen=True)
class RegisteredBackbone:
    """A backbone spec together with the plugin that registered it.

    Attributes:
        spec: the :class:`~mllm_pib.backbone.BackboneSpec` the plugin returned.
        plugin: the distribution and entry point it came from.
    """

    spec: BackboneSpec
    plugin: PluginRef

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def distribution(self) -> str:
        return self.plugin.distribution

    @property
    def version(self) -> str:
        return self.plugin.version

    @property
    def entry_point(self) -> str:
        return self.plugin.entry_point

    def check_options(self, options: dict[str, Any], *, tiny: bool = False) -> None:
        """Raise a :class:`UserError` for option names the backbone does not declare (``dtype``
        and ``device`` are understood by every backbone's ``load``); ``tiny``: the options of
        ``write_tiny``, which also takes the spec's ``tiny_options``."""
        tiny_only = sorted(set(options) & set(self.spec.tiny_options) - set(self.spec.options))
        if tiny_only and not tiny:
            raise UserError(
                f"backbone {self.name!r}: {', '.join(map(repr, tiny_only))} only shape{'s' if len(tiny_only) == 1 else ''} "
                "a tiny model when it is written (`mllm-pib tiny-model --option`, or bootstrap.tiny_options in a "
                "training config), not a model being loaded"
            )
        unknown = sorted(set(options) - set(self.spec.options) - set(self.spec.tiny_options) - set(COMMON_LOAD_OPTIONS))
        if unknown:
            known = ", ".join(sorted(self.spec.options)) or "none"
            tiny_known = ""
            if tiny and self.spec.tiny_options:
                tiny_known = f"; its tiny-model options: {', '.join(sorted(self.spec.tiny_options))}"
            raise UserError(
                f"backbone {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {known}{tiny_known} (see `mllm-pib backbones`)"
            )

    def load(self, model_path: str, **options: Any) -> "Backbone":
        """Check ``options`` against the spec, then call the plugin's ``load``."""
        from safetensors import SafetensorError

        from mllm_pib.torch_files import refused_pickles

        self.check_options(options)
        try:
            with refused_pickles(*pickle_files(model_path), what="model weights file"):
                return self.spec.load(model_path, **options)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            # a truncated download or another model's directory fails deep in the loader
            detail = (str(err).strip().splitlines() or [""])[0][:300]
            raise UserError(
                f"{model_path}: cannot be loaded as a {self.name!r} model ({type(err).__name__}: {detail}); "
                f"check that it is a complete {self.name} model directory and re-download or rewrite it"
            ) from None

    def write_tiny(self, out_dir: str, seed: int = 0, *, overwrite: bool = False, **options: Any) -> None:
        """Check ``options``, then write the plugin's tiny random checkpoint to ``out_dir``.

        The model is written to a staging folder and moved in whole; a folder that is not empty
        is refused unless it holds an earlier tiny model and ``overwrite`` is set (see
        :mod:`mllm_pib.outputs`)."""
        if self.spec.write_tiny is None:
            raise UserError(
                f"backbone {self.name!r} ({self.plugin}) cannot write a tiny checkpoint: "
                "its spec has no write_tiny"
            )
        self.check_options(options, tiny=True)
        with claim(out_dir, TINY_MODEL_OUTPUT, overwrite=overwrite).staged() as staging:
            self.spec.write_tiny(str(staging), seed=seed, **options)


def pickle_files(model_path: str) -> list[Path]:
    """The PyTorch pickles of a model directory (or the file itself), to name a refused one."""
    path = Path(model_path or ".")
    return sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix in PICKLE_SUFFIXES)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMMON_LOAD_OPTIONS = ("dtype", "device")
NAME_IT = "--backbone NAME (in a config: backbone: NAME)"
TINY_MODEL_OUTPUT = OutputKind(command="tiny-model", what="tiny model", writes=(), done="config.json")


@dataclass(frozen=True)
class PluginError:
    """A plugin that was skipped, and why."""

    plugin: PluginRef
    error: str


@dataclass
class Registry:
    """Everything the installed plugins provide.

    Attributes:
        backbones: usable backbones by name.
        conflicts: names claimed by more than one plugin, with every claimant; unusable.
        errors: plugins that failed to load and were skipped.
        blocked: plugins not loaded because ``MLLM_PIB_DISABLE_PLUGINS`` names them.
        plugin_manager: the manager holding every plugin that loaded cleanly.
    """

    backbones: dict[str, RegisteredBackbone]
    conflicts: dict[str, list[RegisteredBackbone]]
    errors: list[PluginError]
    blocked: list[PluginRef]
    plugin_manager: pluggy.PluginManager

    @property
    def problems(self) -> list[PluginError]:
        """What to report to the user: the failed plugins, then every claimant of a conflict."""
        problems = list(self.errors)
        for name, claims in sorted(self.conflicts.items()):
            problems.extend(_conflict_errors(name, claims))
        return problems

    def get(self, name: str) -> RegisteredBackbone:
        """The backbone called ``name``; a :class:`UserError` says why when there is none."""
        if name in self.backbones:
            return self.backbones[name]
        if name in self.conflicts:
            claimants = " and ".join(str(entry.plugin) for entry in self.conflicts[name])
            raise UserError(
                f"backbone {name!r} is registered by more than one plugin: {claimants}. "
                f"Uninstall one of them, or block one with {DISABLE_ENV}=<entry point>."
            )
        raise UserError(self._unknown_message(name))

    def for_model_type(self, model_type: str, where: str = "", how: str = "") -> RegisteredBackbone:
        """The backbone whose spec claims ``model_type`` (transformers' ``config.json`` field).

        ``where`` (a file) starts the messages and ``how`` says how the user names a backbone
        instead. Raises a :class:`UserError` when no backbone or more than one claims it."""
        claims = [entry for entry in self.backbones.values() if model_type in entry.spec.model_types]
        prefix, how = (f"{where}: " if where else ""), how or NAME_IT
        if not claims:
            known = ", ".join(
                f"{kind} ({entry.name})" for entry in self.backbones.values() for kind in entry.spec.model_types
            )
            raise UserError(
                f"{prefix}model_type {model_type!r} is registered by no backbone (registered model types: "
                f"{known or 'none'}); name the backbone with {how} (see `mllm-pib backbones`)"
            )
        if len(claims) > 1:
            names = " and ".join(f"{entry.name!r} ({entry.plugin})" for entry in claims)
            raise UserError(f"{prefix}model_type {model_type!r} is claimed by backbones {names}; choose one with {how}")
        return claims[0]

    def _unknown_message(self, name: str) -> str:
        known = sorted(self.backbones)
        message = f"unknown backbone {name!r}."
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            message += f" Did you mean {' or '.join(map(repr, close))}?"
        message += f" Available backbones: {', '.join(known) if known else 'none installed'}."
        if self.errors:
            broken = ", ".join(err.plugin.distribution for err in self.errors)
            message += (
                f" Plugins that failed to load, one of which may provide it: {broken} "
                "(see `mllm-pib backbones`)."
            )
        if self.blocked:
            message += f" Blocked by {DISABLE_ENV}: {', '.join(ref.entry_point for ref in self.blocked)}."
        return message


class _PluginFailure(Exception):
    """One plugin is broken; the message says at which step and why."""


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn any exception raised by plugin code into a :class:`_PluginFailure` naming the step."""
    try:
        yield
    except _PluginFailure:
        raise
    except Exception as err:  # plugin code may raise anything; the plugin is skipped, not the CLI
        raise _PluginFailure(f"{what} failed: {type(err).__name__}: {err}") from err


def blocked_entry_points() -> set[str]:
    """Entry-point names listed in ``MLLM_PIB_DISABLE_PLUGINS``."""
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def _check_specs(result: Any) -> list[BackboneSpec]:
    """Validate what one hook call returned."""
    if not isinstance(result, (list, tuple)):
        raise _PluginFailure(
            f"{HOOK_NAME} returned {type(result).__name__}, expected a list of mllm_pib.BackboneSpec"
        )
    seen: set[str] = set()
    for index, spec in enumerate(result):
        where = f"{HOOK_NAME} item {index}"
        if not isinstance(spec, BackboneSpec):
            raise _PluginFailure(f"{where} is a {type(spec).__name__}, expected mllm_pib.BackboneSpec")
        if not isinstance(spec.name, str) or not spec.name or spec.name != spec.name.strip():
            raise _PluginFailure(f"{where} has an invalid name {spec.name!r}")
        if not callable(spec.load):
            raise _PluginFailure(f"{where} ({spec.name!r}) has a load that is not callable")
        if not isinstance(spec.model_types, (tuple, list)) or not all(
            isinstance(kind, str) and kind for kind in spec.model_types
        ):
            raise _PluginFailure(f"{where} ({spec.name!r}) has model_types {spec.model_types!r}, expected a tuple of names")
        if spec.name in seen:
            raise _PluginFailure(f"{where} repeats the backbone name {spec.name!r}")
        seen.add(spec.name)
    return list(result)


def _load_plugin(manager: pluggy.PluginManager, entry_point: EntryPoint) -> list[BackboneSpec]:
    """Import one plugin, register it and call its hook alone; unregister it on failure."""
    with _step(f"importing {entry_point.value!r}"):
        plugin = entry_point.load()
    with _step("registering its hooks"):
        manager.register(plugin, name=entry_point.name)
    try:
        with _step("checking its hooks"):
            manager.check_pending()  # a misspelt hook name would otherwise be ignored silently
        others = [other for other in manager.get_plugins() if other is not plugin]
        with _step(f"calling {HOOK_NAME}"):
            results = manager.subset_hook_caller(HOOK_NAME, remove_plugins=others)()
        return [spec for result in results for spec in _check_specs(result)]
    except _PluginFailure:
        manager.unregister(plugin)
        raise


def _conflict_errors(name: str, claims: list[RegisteredBackbone]) -> list[PluginError]:
    """One error per claimant of ``name``, each naming the other claimants."""
    errors = []
    for claim in claims:
        others = " and ".join(str(other.plugin) for other in claims if other is not claim)
        errors.append(
            PluginError(
                claim.plugin,
                f"backbone name {name!r} is also registered by {others}; the name is unusable "
                f"until one of them is uninstalled or blocked with {DISABLE_ENV}",
            )
        )
    return errors


def _build_registry() -> Registry:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name in blocked_entry_points():
        manager.set_blocked(name)
    claims: dict[str, list[RegisteredBackbone]] = {}
    errors: list[PluginError] = []
    blocked: list[PluginRef] = []
    found = [(PluginRef.of(ep), ep) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for ref, entry_point in sorted(found, key=lambda pair: (pair[0].entry_point, pair[0].distribution)):
        if manager.is_blocked(entry_point.name):
            blocked.append(ref)
            continue
        try:
            specs = _load_plugin(manager, entry_point)
        except _PluginFailure as failure:
            errors.append(PluginError(ref, str(failure)))
            continue
        for spec in specs:
            claims.setdefault(spec.name, []).append(RegisteredBackbone(spec, ref))
    conflicts = {name: claimed for name, claimed in claims.items() if len(claimed) > 1}
    backbones = {name: claimed[0] for name, claimed in sorted(claims.items()) if len(claimed) == 1}
    return Registry(backbones, conflicts, errors, blocked, manager)


@functools.cache
def load_registry() -> Registry:
    """The registry of this process, built on first use from the installed plugins."""
    return _build_registry()


def reset_registry() -> None:
    """Forget the cached registry so the next use rescans the installed plugins."""
    load_registry.cache_clear()


def get_backbone(name: str) -> RegisteredBackbone:
    """The backbone registered as ``name``.

    Raises:
        UserError: no plugin provides ``name`` (the message suggests close names and lists the
            available ones), or two plugins claim it (the message names both distributions).
    """
    return load_registry().get(name)


def resolve_backbone(model_path: str | os.PathLike | None, backbone: str | None = None,
                     how: str = NAME_IT) -> str:
    """The backbone name to load ``model_path`` with: ``backbone`` when given (the user's word
    wins), else the backbone that registers the ``model_type`` of ``model_path/config.json``.

    Raises:
        UserError: no ``backbone`` and no readable ``config.json`` with a ``model_type``, or a
            ``model_type`` that no backbone or several backbones register (see
            :meth:`Registry.for_model_type`); ``how`` says how to name the backbone instead.
    """
    if backbone:
        return backbone
    if not model_path:
        raise UserError(f"no model path to detect the backbone from; name the backbone with {how}")
    config = Path(model_path) / "config.json"
    if not config.is_file():
        raise UserError(f"{model_path}: no config.json to detect the backbone from; "
                        f"name the backbone with {how} (see `mllm-pib backbones`)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{config}: not a JSON object ({err}); name the backbone with {how}") from None
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{config}: no model_type to detect the backbone from; name the backbone with {how}")
    return load_registry().for_model_type(model_type, where=str(config), how=how).name


def list_backbones() -> list[RegisteredBackbone]:
    """Every usable backbone, sorted by name."""
    return list(load_registry().backbones.values())
