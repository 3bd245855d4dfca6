"""``mllm-pib sweep``: a grid of trainings from one feature cache, with a results table."""

from __future__ import annotations

from mllm_pib.commands.options import add_output_arguments, output_dir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train every combination of a grid of config values",
        description="Run one training per combination of --grid values. When the freeze policy leaves "
        "the backbone frozen up to the PIB, the backbone runs once: every run trains from one feature "
        "cache. Writes OUT/results.json and OUT/results.md. --resume after an interruption keeps the "
        "finished runs and continues the others.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="training config")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="values of a config key, e.g. --grid learning_rate=2e-7,5e-7 --grid pib.align=mlp,linear")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run")
    add_output_arguments(parser, "the sweep (one sub-folder per run)", resume=True)
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time, each in its own process")
    parser.add_argument("--json", action="store_true", help="print results.json")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import json

    from mllm_pib.training.sweep import results_table, run_sweep

    results = run_sweep(args.config, args.grid, output_dir(args), args.overrides, args.parallel,
                        resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(results, indent=2) if args.json else results_table(results))
    return 0 if all(r["returncode"] == 0 for r in results) else 1
