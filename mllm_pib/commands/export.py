"""``mllm-pib export``: base model + PIB in one standalone directory."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a standalone model directory (base + PIB)",
        description="Combine a base model and a PIB checkpoint into one directory that every "
        "mllm-pib command loads from a single path.",
    )
    parser.add_argument("--pib", required=True, help="PIB checkpoint directory")
    parser.add_argument("--base", required=True, help="base model directory the PIB was trained on")
    parser.add_argument("out", help="new output directory")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mllm_pib.checkpoint import export_model

    out = export_model(args.pib, args.base, args.out)
    print(f"exported to {out}")
    return 0
