"""``mllm-pib tiny-model``: a tiny random checkpoint of a backbone, for tests and trials."""

from __future__ import annotations

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
    add_output_arguments(parser, "the model", positional=True)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.plugins import get_backbone

    out = output_dir(args)
    get_backbone(args.backbone).write_tiny(out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny {args.backbone} model to {out}")
    return 0
