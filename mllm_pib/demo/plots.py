"""The demo's figures, drawn with matplotlib's Agg renderer (no display, no global pyplot state).

Each figure is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mllm_pib.evaluation.pope import SPLITS
from mllm_pib.io import atomic_write_bytes

BEFORE, AFTER = "#9e9e9e", "#1f77b4"


def _figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_pretraining(losses: list[float], path: Path) -> None:
    """The base model's supervised loss per step (and its moving average)."""
    fig, (ax,) = _figure(6, 3.5)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color=BEFORE, linewidth=0.6, label="per step")
    ax.plot(steps, _moving_average(losses, 50), color=AFTER, label="moving average (50)")
    ax.set(title="Pretraining of the base model (captions + yes/no)", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax.legend()
    _save(fig, path)


def plot_dpo_training(per_seed: list[dict], path: Path) -> None:
    """DPO loss, reward margin and reward accuracy of the PIB over training, one line per seed."""
    panels = (("loss", "DPO loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"))
    fig, axes = _figure(12, 3.5, columns=len(panels))
    for ax, (name, title) in zip(axes, panels):
        for seed in per_seed:
            curve = seed["training"]["curves"][name]
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", label=f"seed {seed['seed']}")
        ax.set(title=title, xlabel="step")
        ax.legend()
    _save(fig, path)


def _bars(ax, labels: list[str], before: list[list[float]], after: list[list[float]], title: str, ylabel: str) -> None:
    """Grouped before/after bars of the mean over seeds, error bars at +-1 standard deviation."""
    width = 0.38
    for offset, series, colour, name in ((-width / 2, before, BEFORE, "before"), (width / 2, after, AFTER, "after")):
        means = [statistics.fmean(values) for values in series]
        errors = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in series]
        xs = [i + offset for i in range(len(labels))]
        ax.bar(xs, means, width, yerr=errors, color=colour, label=name, capsize=3)
        for x, m in zip(xs, means):
            ax.annotate(f"{m:.1f}", (x, m), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, frameon=False)


def plot_pope(per_seed: list[dict], path: Path) -> None:
    """POPE F1 and yes-ratio per split, before and after the PIB."""
    fig, (f1, yes) = _figure(11, 4, columns=2)
    for ax, metric, title in ((f1, "f1", "POPE F1 (%)"), (yes, "yes_ratio", "POPE yes-ratio (%)")):
        series = {
            name: [[100 * s[name]["pope"][split][metric] for s in per_seed] for split in SPLITS]
            for name in ("before", "after")
        }
        _bars(ax, list(SPLITS), series["before"], series["after"], title, "%")
    yes.axhline(50, color="black", linewidth=0.8, linestyle="--")
    _save(fig, path)


def plot_chair(per_seed: list[dict], path: Path) -> None:
    """CHAIR_s, CHAIR_i and object recall of the descriptions, before and after the PIB."""
    metrics = (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "recall"))
    fig, (ax,) = _figure(6, 4)
    series = {
        name: [[100 * s[name]["chair"][m] for s in per_seed] for m, _ in metrics] for name in ("before", "after")
    }
    _bars(ax, [label for _, label in metrics], series["before"], series["after"], "CHAIR of held-out descriptions (%)", "%")
    _save(fig, path)
