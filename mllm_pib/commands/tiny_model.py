"""``mllm-pib tiny-model``: a tiny random checkpoint of a backbone, for tests and trials."""

from __future__ import annotations

import argparse

from mllm_pib.commands.options import add_output_arguments, output_dir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny-model",
        help="write a tiny random model of a backbone",
        description="Write a tiny random checkpoint in the backbone's published layout, with a "
        "locally trained tokenizer (no download). The output folder is also accepted as a trailing "
        "argument (`mllm-pib tiny-model --backbone NAME OUT`).",
    )
    parser.add_argument("--backbone", required=True, help="backbone name (see `mllm-pib backbones`)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", type=option,
        help="a tiny-model option of the backbone, e.g. layout=idefics3 or vocab_size=1024 (values read as "
        "YAML scalars; repeatable; `mllm-pib backbones` lists each backbone's)",
    )
    add_output_arguments(parser, "the model", positional=True)
    parser.set_defaults(handler=run)


def option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``, the value read as a YAML scalar (``1024`` an int)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    parsed = yaml.safe_load(value) if value.strip() else value
    return name.strip(), parsed if isinstance(parsed, (str, int, float, bool)) else value


def run(args) -> int:
    from mllm_pib.plugins import get_backbone

    out = output_dir(args)
    get_backbone(args.backbone).write_tiny(out, seed=args.seed, overwrite=args.overwrite, **dict(args.option))
    print(f"wrote a tiny {args.backbone} model to {out}")
    return 0
