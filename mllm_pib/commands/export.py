"""``mllm-pib export``: base model + PIB in one standalone directory."""

from __future__ import annotations

from mllm_pib.commands.options import add_output_arguments, output_dir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a standalone model directory (base + PIB)",
        description="Combine a base model and a PIB checkpoint into one directory that every "
        "mllm-pib command loads from a single path. The output folder is also accepted as a "
        "trailing argument (`mllm-pib export --pib CKPT --base DIR OUT`).",
    )
    parser.add_argument("--pib", required=True, metavar="CKPT", help="PIB checkpoint directory")
    parser.add_argument("--base", required=True, metavar="DIR", help="base model directory the PIB was trained on")
    add_output_arguments(parser, "the exported model", positional=True)
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="export the PIB even with base weights other than those it was trained on")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.checkpoint import export_model

    out = export_model(args.pib, args.base, output_dir(args), overwrite=args.overwrite,
                       allow_base_mismatch=args.allow_base_mismatch)
    print(f"exported to {out}")
    return 0
