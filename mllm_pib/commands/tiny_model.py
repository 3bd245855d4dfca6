"""``mllm-pib tiny-model``: a tiny random checkpoint of a backbone, for tests and trials."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny-model",
        help="write a tiny random model of a backbone",
        description="Write a tiny random checkpoint in the backbone's published layout, with a "
        "locally trained tokenizer (no download).",
    )
    parser.add_argument("--backbone", required=True, help="backbone name (see `mllm-pib backbones`)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("out", help="output directory")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.plugins import get_backbone

    get_backbone(args.backbone).write_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny {args.backbone} model to {args.out}")
    return 0
