"""``mllm-pib demo``: the whole method end to end on a synthetic world, on CPU."""

from __future__ import annotations

import contextlib
import json
import sys

from mllm_pib.commands.options import add_overwrite_arguments
from mllm_pib.errors import UserError

DESCRIPTION = """\
Run the method end to end on a synthetic world of coloured shapes whose object pairs co-occur
(a house usually comes with a tree), with supervision that names an absent partner 60% of the
time — the bias that makes real captioners hallucinate:

  1. pretrain a tiny LLaVA-1.5 (real transformers classes, locally trained tokenizer) on biased
     captions and yes/no answers, or reuse it from the cache (CACHE_DIR/demo/<key>);
  2. export HA-DPO-format preference pairs and build POPE random/popular/adversarial splits on
     held-out scenes;
  3. train a PIB with DPO over the frozen model (`mllm-pib train`, stage 1);
  4. evaluate the base model and base + PIB: POPE on the three splits, CHAIR of descriptions.

Prints a before/after table and writes OUT/report.json (the results; the same bytes on every
run with the same code, settings and --threads), run.json (paths, timings), report.md and PNG
plots. Each seed trains its own PIB on its own preference and evaluation scenes; the base model
is shared. A folder holding an earlier demo is replaced only with --overwrite."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on a synthetic world: pretrain, DPO, POPE/CHAIR before and after",
        description=DESCRIPTION,
    )
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="run seeds 0..N-1 and report their mean")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder")
    add_overwrite_arguments(parser)
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the pretrained base model is cached (default: $XDG_CACHE_HOME/mllm-pib, "
                             "else ~/.cache/mllm-pib)")
    parser.add_argument("--quick", action="store_true",
                        help="a few-second run of every step with tiny sizes (checks the pipeline; numbers mean nothing)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1). The numbers depend on it (sums of floats are "
                             "split differently): the README's figures are measured with 1. Models this small "
                             "gain little from more, and extra threads slow down badly on shared cores")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the table")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from mllm_pib.demo.config import DemoConfig
    from mllm_pib.demo.pipeline import run_demo
    from mllm_pib.demo.report import format_table

    for flag in ("seeds", "threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    # with --json, stdout carries the report alone; the steps' messages go to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        report, run_facts = run_demo(config, seeds=args.seeds, out_dir=args.out, cache_dir=args.cache_dir,
                                     overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        print(f"report: {args.out}/report.md (report.json, run.json, plots); took {run_facts['seconds']:.0f} s")
    return 0
