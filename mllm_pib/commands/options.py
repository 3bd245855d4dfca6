"""Options shared by every command that loads a model."""

from __future__ import annotations

import argparse
import os

DTYPES = ("float32", "float16", "bfloat16")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--backbone/--model/--pib and loading options (dtype, device)."""
    parser.add_argument("--backbone", required=required, help="backbone name (see `mllm-pib backbones`)")
    parser.add_argument("--model", required=required, metavar="PATH",
                        help="base model directory, or an exported model (base + PIB, see `mllm-pib export`)")
    parser.add_argument("--pib", metavar="CKPT", help="PIB checkpoint directory (default: none, the base model)")
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: float32)")
    parser.add_argument("--device", help="device, e.g. cuda:1 (default: cuda:LOCAL_RANK when available, else cpu)")


def load_model_from_args(args: argparse.Namespace):
    """The :class:`~mllm_pib.model.PIBModel` that :func:`add_model_arguments` options name."""
    import torch

    from mllm_pib.checkpoint import load_model

    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    options = {"device": device, **({"dtype": args.dtype} if args.dtype else {})}
    return load_model(args.model, backbone=args.backbone, pib=args.pib, **options)
