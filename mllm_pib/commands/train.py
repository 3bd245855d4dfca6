"""``mllm-pib train``: train a post-interaction block with a preference objective."""

from __future__ import annotations

import argparse
import shlex

from mllm_pib.commands.options import add_overwrite_arguments
from mllm_pib.errors import Interrupted


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a PIB with DPO on preference data",
        description="Train a post-interaction block on a frozen backbone with a preference objective. "
        "An output folder holding an earlier run is refused unless --resume or --overwrite is given; "
        "Ctrl-C stops the run and prints the command that resumes it.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML training config (see configs/)")
    parser.add_argument("--backbone", help="backbone name (default: the config's `backbone`, else the backbone "
                        "registering the model_type of the config's model/config.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set loss.beta=0.2 --set training.max_steps=10")
    parser.add_argument("--out", "--output-dir", dest="output_dir", metavar="DIR",
                        help="where the run goes (default: the config's training.output_dir)")
    add_overwrite_arguments(parser, resume=True)
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="use data images that lead outside their image root (.., absolute paths, symlinks); "
                        "sets allow_outside_images")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="resume even when the checkpoint was saved on other base weights than the model loaded")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mllm_pib.config import load_config
    from mllm_pib.training.run import TrainingInterrupted, train

    overrides = list(args.overrides) + ([f"backbone={args.backbone}"] if args.backbone else [])
    overrides += ["allow_outside_images=true"] if args.allow_outside_images else []
    config = load_config(args.config, overrides)
    try:
        train(config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite,
              allow_base_mismatch=args.allow_base_mismatch)
    except TrainingInterrupted as err:
        how = f"resume with: {again(args.argv, '--resume')}" if err.checkpoint else f"start again with: {again(args.argv, '--overwrite')}"
        raise Interrupted(f"{err}; {how}") from None
    return 0


def again(argv: list[str], flag: str) -> str:
    """This command line with ``flag`` in place of any --resume/--overwrite."""
    kept = [arg for arg in argv if arg not in ("--overwrite", "--resume")]
    return shlex.join(["mllm-pib", *kept, flag])
