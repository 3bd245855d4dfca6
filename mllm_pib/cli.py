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
import textwrap

from mllm_pib import __version__
from mllm_pib.errors import Interrupted, UserError
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


class HelpFormatter(argparse.HelpFormatter):
    """Help in the style of the Hugging Face command lines: each option's default is shown as
    ``(default: X)`` when it has a meaningful one (not for flags or options without a value),
    and descriptions keep their paragraphs and indented lists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == [] or default is argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # paragraphs are separated by blank lines; a paragraph of indented lines is kept as written
        paragraphs = text.strip("\n").split("\n\n")
        return "\n\n".join(
            "\n".join(indent + line for line in paragraph.splitlines()) if paragraph.startswith(" ")
            else textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent,
                               break_on_hyphens=False)  # never cut `mllm-pib` or `--max-new-tokens`
            for paragraph in paragraphs
        )

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; sub-commands inherit both."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to tell the user how to go on
    try:
        return args.handler(args) or 0
    except UserError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
