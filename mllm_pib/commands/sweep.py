"""``mllm-pib sweep``: a grid of trainings from one feature cache, with a results table."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train every combination of a grid of config values",
        description="Run one training per combination of --grid values. When the freeze policy leaves "
        "the backbone frozen up to the PIB, the backbone runs once: every run trains from one feature "
        "cache. Writes OUT/results.json and OUT/results.md.",
    )
    parser.add_argument("--config", required=True, help="training config")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="values of a config key, e.g. --grid learning_rate=2e-7,5e-7 --grid pib.align=mlp,linear")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run")
    parser.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    parser.add_argument("--json", action="store_true", help="print results.json")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import json

    from mllm_pib.training.sweep import results_table, run_sweep

    results = run_sweep(args.config, args.grid, args.out, args.overrides, args.parallel)
    print(json.dumps(results, indent=2) if args.json else results_table(results))
    return 0 if all(r["returncode"] == 0 for r in results) else 1
