"""The demo's report: the before/after table, ``report.json``, ``report.md`` and the plots.

Metrics are fractions in ``report.json`` and percentages (2 decimals) in the table and the
Markdown, like the ``mllm-pib eval`` commands. With several seeds the top-level ``before`` and
``after`` hold the mean over seeds and ``per_seed`` every seed's own numbers.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from mllm_pib.evaluation.pope import SPLITS
from mllm_pib.io import atomic_write_json, atomic_write_text

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_METRICS = ("chair_s", "chair_i", "recall")
# rows of the table: (label, section, split or None, metric); higher is better unless noted
TABLE_ROWS = (
    *((f"POPE {split} F1", "pope", split, "f1") for split in SPLITS),
    *((f"POPE {split} yes-ratio", "pope", split, "yes_ratio") for split in SPLITS),
    ("CHAIR_s (lower is better)", "chair", None, "chair_s"),
    ("CHAIR_i (lower is better)", "chair", None, "chair_i"),
    ("CHAIR object recall", "chair", None, "recall"),
)
TRAINING_CURVES = ("loss", "rewards/margins", "rewards/accuracies")
FIGURES = ("pretraining.png", "dpo_training.png", "pope.png", "chair.png")
REPORT = "report.json"  # the results alone: identical for identical code, settings and threads
RUN = "run.json"  # what differs between runs: paths, the base model cache hit, timings


def _metrics(evaluation: dict) -> dict:
    """The numbers of one evaluation that the report keeps."""
    return {
        "pope": {split: {m: evaluation["pope"][split][m] for m in POPE_METRICS} for split in SPLITS},
        "chair": {m: evaluation["chair"][m] for m in CHAIR_METRICS},
    }


def mean_metrics(evaluations: list[dict]) -> dict:
    """Mean over seeds of every kept metric."""
    kept = [_metrics(e) for e in evaluations]
    return {
        "pope": {
            split: {m: statistics.fmean(k["pope"][split][m] for k in kept) for m in POPE_METRICS} for split in SPLITS
        },
        "chair": {m: statistics.fmean(k["chair"][m] for k in kept) for m in CHAIR_METRICS},
    }


def training_curves(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """``{name: [[step, value], ...]}`` of the trainer's logged training entries."""
    curves: dict[str, list[list[float]]] = {name: [] for name in TRAINING_CURVES}
    for entry in log_history:
        for name in TRAINING_CURVES:
            if name in entry and "step" in entry:
                curves[name].append([entry["step"], entry[name]])
    return curves


def value(metrics: dict, section: str, split: str | None, metric: str) -> float:
    return metrics[section][split][metric] if split else metrics[section][metric]


def format_table(report: dict) -> str:
    """Before/after/change in percent, for the mean over seeds."""
    seeds = len(report["per_seed"])
    title = f"base model vs base + PIB (DPO stage 1), held-out scenes, {'mean of ' + str(seeds) + ' seeds' if seeds > 1 else 'seed ' + str(report['per_seed'][0]['seed'])}"
    rows = [("metric (%)", "before", "after", "change")]
    for label, section, split, metric in TABLE_ROWS:
        before = 100 * value(report["before"], section, split, metric)
        after = 100 * value(report["after"], section, split, metric)
        rows.append((label, f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([title, *lines])


def format_markdown(report: dict, run: dict) -> str:
    """``report.md``: the table, every seed's numbers, the timings and the figures."""
    table = format_table(report).splitlines()
    out = ["# mllm-pib demo", "", table[0] + ".", "", "```", *table[1:], "```", ""]
    out += ["## Per seed (%)", "", "| seed | model | " + " | ".join(label for label, *_ in TABLE_ROWS) + " |"]
    out.append("|" + "---|" * (len(TABLE_ROWS) + 2))
    for seed in report["per_seed"]:
        for name in ("before", "after"):
            cells = [f"{100 * value(seed[name], *row[1:]):.2f}" for row in TABLE_ROWS]
            out.append(f"| {seed['seed']} | {name} | " + " | ".join(cells) + " |")
    base = run["base_model"]
    out += ["", "## Runs", ""]
    out.append(f"- base model: `{base['path']}` ({'from the cache' if base['cached'] else 'pretrained in this run'}; "
               f"pretraining took {base['pretraining_seconds']:.0f} s, final loss {report['base_model']['final_loss']:.3f})")
    for seed, seconds in zip(report["per_seed"], run["per_seed_seconds"]):
        t = seed["training"]
        out.append(f"- seed {seed['seed']}: DPO loss {t['first_loss']:.3f} -> {t['last_loss']:.3f} over {t['steps']} steps; "
                   f"data {seconds['data']:.0f} s, evaluation {seconds['evaluation']:.0f} s, "
                   f"training {seconds['training']:.0f} s")
    out.append(f"- total: {run['seconds']:.0f} s with {report['threads']} CPU thread(s)")
    out += ["", "## Figures", ""] + [f"![{name}]({name})" for name in FIGURES]
    return "\n".join(out) + "\n"


def write_report(report: dict, run: dict, pretraining_losses: list[float], out_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``run.json``, ``report.md`` and the figures to ``out_dir``;
    returns their paths (``report.json`` last: it marks a complete report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN, run)
    atomic_write_text(out / "report.md", format_markdown(report, run))
    from mllm_pib.demo.plots import plot_chair, plot_dpo_training, plot_pope, plot_pretraining

    plot_pretraining(pretraining_losses, out / "pretraining.png")
    plot_dpo_training(report["per_seed"], out / "dpo_training.png")
    plot_pope(report["per_seed"], out / "pope.png")
    plot_chair(report["per_seed"], out / "chair.png")
    atomic_write_json(out / REPORT, report)
    return [out / RUN, out / "report.md", *(out / name for name in FIGURES), out / REPORT]


# --- the README's table -----------------------------------------------------------------------

README_COLUMNS = (
    ("POPE F1 random", "pope", "random", "f1"),
    ("popular", "pope", "popular", "f1"),
    ("adversarial", "pope", "adversarial", "f1"),
    ("yes-ratio adv.", "pope", "adversarial", "yes_ratio"),
    ("CHAIR_s", "chair", None, "chair_s"),
    ("CHAIR_i", "chair", None, "chair_i"),
    ("CHAIR recall", "chair", None, "recall"),
)
README_THREADS = 1


def check_readme_report(report: dict) -> None:
    """Refuse a report that is not the default demo at the README's thread count: its figures
    would not be what ``mllm-pib demo`` gives with this code."""
    from mllm_pib.demo.config import DemoConfig
    from mllm_pib.errors import UserError

    if report.get("config") != DemoConfig().model_dump(mode="json"):
        raise UserError("the report is not of the default demo settings (a --quick run, or older code); "
                        "measure with `mllm-pib demo --seeds 3`")
    if report.get("threads") != README_THREADS:
        raise UserError(f"the report was measured with {report.get('threads')} thread(s); the README's figures "
                        f"use --threads {README_THREADS}")


def readme_table(report: dict) -> str:
    """The README's Markdown: per model, each metric's mean over seeds and its range over seeds,
    plus the change with its range over seeds, in percent."""
    seeds = report["per_seed"]
    runs = f"`mllm-pib demo --seeds {len(seeds)} --threads {report['threads']}`"
    lines = [
        f"Measured with {runs} from a fresh cache (mllm-pib {report['mllm_pib_version']}), on held-out scenes: "
        f"mean of {len(seeds)} seeds, with the range over the seeds in brackets. The figures depend on the "
        f"thread count (sums of floats split differently), so other counts give slightly different ones.",
        "",
        "| | " + " | ".join(label for label, *_ in README_COLUMNS) + " |",
        "|---" * (len(README_COLUMNS) + 1) + "|",
    ]
    rows = {
        "base model": [[value(s["before"], *c[1:]) for s in seeds] for c in README_COLUMNS],
        "+ PIB": [[value(s["after"], *c[1:]) for s in seeds] for c in README_COLUMNS],
        "change": [[value(s["after"], *c[1:]) - value(s["before"], *c[1:]) for s in seeds] for c in README_COLUMNS],
    }
    for name, columns in rows.items():
        signed = name == "change"
        lines.append(f"| {name} | " + " | ".join(_mean_and_range(v, signed) for v in columns) + " |")
    return "\n".join(lines) + "\n"


def _mean_and_range(values: list[float], signed: bool) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    mean = fmt.format(100 * statistics.fmean(values))
    if len(values) == 1:
        return mean
    return f"{mean} [{fmt.format(100 * min(values))}, {fmt.format(100 * max(values))}]"
