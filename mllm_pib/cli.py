"""The ``mllm-pib`` command line.

Each command lives next to the code it drives and contributes its sub-parser through a
``add_parser(subparsers)`` function; heavy imports happen inside the command handlers so that
``mllm-pib --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mllm_pib import __version__
from mllm_pib.errors import UserError
from mllm_pib.log import configure as configure_logging

# module path of each command group, in the order ``--help`` lists them
COMMAND_MODULES = (
    "mllm_pib.commands.backbones",
    "mllm_pib.commands.train",
    "mllm_pib.commands.cache",
    "mllm_pib.commands.sweep",
    "mllm_pib.commands.export",
    "mllm_pib.commands.tiny_model",
    "mllm_pib.commands.eval",
    "mllm_pib.commands.generate",
    "mllm_pib.commands.ui",
    "mllm_pib.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-pib",
        description="Train and evaluate post-interaction blocks (PIB) against object hallucination.",
    )
    parser.add_argument("--version", action="version", version=f"mllm-pib {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def quiet_library_chatter() -> None:
    """DeepSpeed announces its accelerator on stdout at import; stdout is ours (tables, JSON)."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "accelerator" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    quiet_library_chatter()
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
