"""Options shared by the commands: loading a model, and the output folder."""

from __future__ import annotations

import argparse
import os

from mllm_pib.errors import UserError

DTYPES = ("float32", "float16", "bfloat16")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--backbone/--model/--pib and loading options (dtype, device)."""
    parser.add_argument("--backbone", help="backbone name (see `mllm-pib backbones`; default: the PIB's, else the "
                                           "backbone registering the model_type of --model's config.json)")
    parser.add_argument("--model", required=required, metavar="PATH",
                        help="base model directory, or an exported model (base + PIB, see `mllm-pib export`)")
    parser.add_argument("--pib", metavar="CKPT", help="PIB checkpoint directory (default: none, the base model)")
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: float32)")
    parser.add_argument("--device", help="device, e.g. cuda:1 (default: cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="load the PIB even onto base weights other than those it was trained on")


def load_model_from_args(args: argparse.Namespace):
    """The :class:`~mllm_pib.model.PIBModel` that :func:`add_model_arguments` options name."""
    import torch

    from mllm_pib.checkpoint import load_model

    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    options = {"device": device, **({"dtype": args.dtype} if args.dtype else {})}
    return load_model(args.model, backbone=args.backbone, pib=args.pib,
                      allow_base_mismatch=args.allow_base_mismatch, **options)


def add_output_arguments(parser: argparse.ArgumentParser, what: str, resume: bool = False,
                         positional: bool = False) -> None:
    """``--out DIR`` (every command's spelling), ``--overwrite`` and, for commands that can
    continue an earlier output, ``--resume``. ``positional`` also takes the folder as a trailing
    argument, the older spelling of ``export`` and ``tiny-model``."""
    if positional:  # argparse cannot require "--out DIR or OUT": output_dir() checks
        parser.add_argument("--out", metavar="DIR", help=f"output folder for {what} (required)")
        parser.add_argument("out_positional", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    else:
        parser.add_argument("--out", metavar="DIR", required=True, help=f"output folder for {what}")
    add_overwrite_arguments(parser, resume)


def add_overwrite_arguments(parser: argparse.ArgumentParser, resume: bool = False) -> None:
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue the earlier output of this command in the output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier output of this command in the output folder (only the files "
                             "it wrote are deleted); without it, a folder that is not empty is refused")


def output_dir(args: argparse.Namespace) -> str:
    """The output folder given as ``--out DIR`` or as the older trailing argument."""
    given = {value for value in (args.out, getattr(args, "out_positional", None)) if value is not None}
    if not given:
        raise UserError("give the output folder: --out DIR")
    if len(given) > 1:
        raise UserError(f"the output folder is given twice, differently: --out {args.out} and {args.out_positional}")
    return given.pop()
