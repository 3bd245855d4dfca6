"""``mllm-pib backbones``: list the backbones the installed plugins provide.

Broken plugins never make this command fail: they are listed in a warning section on stderr
(``errors`` with ``--json``) and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllm_pib.plugins import Registry

COLUMNS = ("NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backbones",
        help="list the installed backbones and their plugins",
        description=(
            "List the backbones provided by the installed plugins (entry-point group "
            "'mllm_pib'), with the transformers model types they load (commands given --model "
            "without --backbone pick the backbone by its config.json model_type) and their options. Plugins that fail to load are reported and "
            "skipped; MLLM_PIB_DISABLE_PLUGINS=a,b blocks plugins by entry-point name."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    parser.set_defaults(handler=run)


def report(registry: "Registry") -> dict[str, Any]:
    """The JSON document of ``--json``."""
    return {
        "backbones": [
            {
                "name": entry.name,
                "distribution": entry.distribution,
                "version": entry.version,
                "description": entry.spec.description,
                "options": dict(entry.spec.options),
                "tiny_options": dict(entry.spec.tiny_options),
                "model_types": list(entry.spec.model_types),
            }
            for entry in registry.backbones.values()
        ],
        "errors": [
            {
                "distribution": err.plugin.distribution,
                "entry_point": err.plugin.entry_point,
                "error": err.error,
            }
            for err in registry.problems
        ],
        "blocked": [
            {"distribution": ref.distribution, "entry_point": ref.entry_point} for ref in registry.blocked
        ],
    }


def format_table(registry: "Registry") -> str:
    """One row per backbone, its model types and options (``name: help``) indented below it."""
    entries = list(registry.backbones.values())
    if not entries:
        return "no backbones installed; install a backbone plugin, for example `pip install -e plugins/llava`"
    rows = [COLUMNS, *((e.name, e.distribution, e.version, e.spec.description) for e in entries)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(COLUMNS) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip()

    lines = [line(COLUMNS)]
    for entry, row in zip(entries, rows[1:]):
        lines.append(line(row))
        if entry.spec.model_types:
            lines.append(f"    model types: {', '.join(entry.spec.model_types)}")
        lines.extend(f"    {option}: {text}" for option, text in entry.spec.options.items())
        lines.extend(f"    {option} (tiny models): {text}" for option, text in entry.spec.tiny_options.items())
    return "\n".join(lines)


def format_warnings(registry: "Registry") -> str:
    """Broken and blocked plugins, for stderr; empty when there are none."""
    lines = []
    problems = registry.problems
    if problems:
        lines.append(f"warning: {len(problems)} plugin problem(s); the affected backbones are unavailable:")
        lines.extend(f"  {err.plugin}: {err.error}" for err in problems)
    if registry.blocked:
        blocked = ", ".join(map(str, registry.blocked))
        lines.append(f"note: blocked by MLLM_PIB_DISABLE_PLUGINS: {blocked}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mllm_pib.plugins import load_registry

    registry = load_registry()
    if args.json:
        print(json.dumps(report(registry), indent=2))
        return 0
    print(format_table(registry))
    warnings = format_warnings(registry)
    if warnings:
        print(warnings, file=sys.stderr)
    return 0
