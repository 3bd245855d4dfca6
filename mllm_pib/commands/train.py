"""``mllm-pib train``: train a post-interaction block with a preference objective."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a PIB with DPO on preference data",
        description="Train a post-interaction block on a frozen backbone with a preference objective.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument("--backbone", help="backbone name; overrides the config's `backbone`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set loss.beta=0.2 --set training.max_steps=10")
    parser.add_argument("--output-dir", help="where checkpoints go (training.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.config import load_config
    from mllm_pib.training.run import train

    overrides = list(args.overrides) + ([f"backbone={args.backbone}"] if args.backbone else [])
    config = load_config(args.config, overrides)
    train(config, output_dir=args.output_dir, resume=args.resume)
    return 0
