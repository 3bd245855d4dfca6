"""``mllm-pib generate``: answer a prompt about an image, with the PIB model and/or its base.

With ``--chat`` the image stays loaded and user turns are read from standard input until end
of input or ``exit``; earlier turns are carried as a transcript inside the single-turn template
(see :mod:`mllm_pib.chat` for what that means for the answers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mllm_pib.commands.options import add_model_arguments, load_model_from_args
from mllm_pib.errors import UserError

if TYPE_CHECKING:
    from mllm_pib.chat import Chat, DecodingOptions, Reply

TITLES = {"base": "base", "pib": "PIB"}
EXIT_WORD = "exit"
COLUMN_GAP = " | "


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt about an image (PIB model, base model, or both side by side)",
        description="Answer a prompt about an image with a PIB model; --compare also shows the base "
        "model's answer (the same model with the block bypassed). --chat keeps the image and the "
        "conversation across turns read from standard input, until end of input or 'exit'.",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, metavar="FILE", help="the image file")
    parser.add_argument("--prompt", metavar="TEXT", help="the question or instruction (with --chat: the first turn)")
    parser.add_argument("--compare", action="store_true", help="show the base model's answer next to the PIB model's")
    parser.add_argument("--chat", action="store_true", help="interactive conversation about the image")
    add_decoding_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object (with --chat: one JSON line per turn)")
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------- shared options


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="longest answer in tokens (default: 512)")
    parser.add_argument("--num-beams", type=int, default=1, metavar="K",
                        help="beam search width; 1 decodes greedily (default: 1)")


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    from pydantic import ValidationError

    from mllm_pib.chat import DecodingOptions

    try:
        return DecodingOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise UserError(f"bad decoding options: {problems}") from None


def pib_path(args: argparse.Namespace) -> Path | None:
    """The trained PIB the model gets: ``--pib``, or the checkpoint of an exported model directory."""
    from mllm_pib.checkpoint import EXPORT_SUBDIR, META_FILE

    if args.pib is not None:
        return Path(args.pib)
    exported = Path(args.model) / EXPORT_SUBDIR
    return exported if (exported / META_FILE).is_file() else None


def has_pib(args: argparse.Namespace) -> bool:
    return pib_path(args) is not None


def require_pib(args: argparse.Namespace, why: str) -> None:
    if not has_pib(args):
        raise UserError(
            f"{why} needs a PIB: give --pib CKPT, or an exported model directory as --model "
            f"({args.model} holds no pib/ checkpoint)"
        )


def run(args: argparse.Namespace) -> int:
    from mllm_pib.chat import BASE, PIB, Chat, check_question, read_image

    options = decoding_options(args)
    if args.compare:
        require_pib(args, "--compare")
    if not args.chat and args.prompt is None:
        raise UserError("give --prompt TEXT, or --chat to read the conversation from standard input")
    # Cheap checks first: a bad image or an empty prompt should not wait for the model to load.
    image = read_image(args.image)
    if not args.chat:
        check_question(args.prompt)
    variants = (BASE, PIB) if args.compare else ((PIB,) if has_pib(args) else (BASE,))
    chat = Chat(load_model_from_args(args), image, options, variants)
    if not args.chat:
        print_reply(chat.ask(args.prompt), args.json, indent=2)
        return 0
    first = [args.prompt] if args.prompt is not None else []
    run_chat(chat, itertools.chain(first, read_turns(sys.stdin)), args.json)
    return 0


def read_turns(stream: TextIO):
    """User turns from ``stream`` until end of input or a line that says ``exit``."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("User: ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line or line.strip().lower() == EXIT_WORD:
            return
        yield line


def run_chat(chat: Chat, turns, as_json: bool) -> None:
    """Answer each turn; a bad turn (empty, too long) is reported and the conversation goes on."""
    for question in turns:
        try:
            reply = chat.ask(question)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        dropped = max(reply.dropped.values())
        if dropped and not as_json:
            print(f"(the {dropped} earliest turn(s) no longer fit the context and were left out)", file=sys.stderr)
        print_reply(reply, as_json)


# ---------------------------------------------------------------------------- output


def reply_record(reply: Reply) -> dict:
    return {"prompt": reply.question, "answers": reply.answers, "dropped_turns": reply.dropped}


def print_reply(reply: Reply, as_json: bool, indent: int | None = None) -> None:
    if as_json:
        print(json.dumps(reply_record(reply), indent=indent, ensure_ascii=False), flush=True)
    elif len(reply.answers) == 1:
        print(next(iter(reply.answers.values())), flush=True)
    else:
        width = shutil.get_terminal_size((100, 24)).columns
        columns = [(TITLES[v], text) for v, text in reply.answers.items()]
        print(side_by_side(columns, width), flush=True)


def side_by_side(columns: list[tuple[str, str]], width: int) -> str:
    """Titled texts in columns of equal width, wrapped at word boundaries."""
    col = max(10, (width - len(COLUMN_GAP) * (len(columns) - 1)) // len(columns))
    wrapped = [[title, "-" * col, *wrap(text, col)] for title, text in columns]
    rows = itertools.zip_longest(*wrapped, fillvalue="")
    return "\n".join(COLUMN_GAP.join(cell.ljust(col) for cell in row).rstrip() for row in rows)


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters; the text's own line breaks are kept."""
    lines = [textwrap.wrap(line, width, break_on_hyphens=False) or [""] for line in text.splitlines() or [""]]
    return [piece for line in lines for piece in line]
