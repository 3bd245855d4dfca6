"""The whole demo: pretrain (or reuse) the base model, then per seed export the data, evaluate
the base model, train the PIB with DPO, evaluate base + PIB; finally write the report.

Every step goes through the project's public code paths: the backbone plugin's ``write_tiny``
and ``load``, the HA-DPO exports and the POPE builder, ``mllm-pib train``'s config and
``train()``, and the model-driven POPE / description runners with CHAIR scoring.

Output layout (``out_dir``)::

    report.json          the results: settings, metrics, training curves; the same bytes on every
                         run of the same code, settings and thread count
    run.json             facts of this run: where the base model is, whether it came from the
                         cache, timings
    report.md  pretraining.png  dpo_training.png  pope.png  chair.png
    seed<N>/data/        preference data, held-out images, POPE splits, CHAIR files
    seed<N>/before/      the base model's evaluation folders: pope/ (answers, scores) and
                         chair/ (descriptions, CHAIR details)
    seed<N>/train/       train.yaml and the PIB checkpoint (pib/, with log_history.json)
    seed<N>/after/       the same evaluation with the trained PIB
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mllm_pib import __version__
from mllm_pib.demo.base_model import pretrained_base_model
from mllm_pib.demo.config import DemoConfig
from mllm_pib.demo.data import prepare_seed_data
from mllm_pib.demo.dpo import train_pib
from mllm_pib.demo.evaluate import evaluate_model
from mllm_pib.demo.report import FIGURES, REPORT, RUN, mean_metrics, training_curves, write_report
from mllm_pib.io import read_json
from mllm_pib.log import get_logger
from mllm_pib.outputs import OutputKind, claim

log = get_logger(__name__)


DEMO_OUTPUT = OutputKind(command="demo", what="demo report", writes=(REPORT, RUN, "report.md", *FIGURES, "seed*"),
                         done=REPORT)


def run_seed(config: DemoConfig, model_path: Path, seed: int, out_dir: Path, progress: bool = True) -> tuple[dict, dict]:
    """One seed, into the new folder ``out_dir``: data, evaluation before, DPO, evaluation after.

    Returns the seed's results (for ``report.json``, with paths relative to ``out_dir``'s parent)
    and the seconds each step took.
    """
    backbone = config.pretrain.backbone
    seconds: dict[str, float] = {}
    with timed(seconds, "data"):
        step(f"seed {seed}: exporting preference data and building POPE/CHAIR sets in {out_dir / 'data'}")
        data = prepare_seed_data(config, seed, out_dir / "data", progress=progress)
    with timed(seconds, "evaluation"):
        step(f"seed {seed}: evaluating the base model (identity PIB)")
        before = evaluate_model(model_path, backbone, None, data, config.evaluation, out_dir / "before")
    with timed(seconds, "training"):
        step(f"seed {seed}: training the PIB with DPO, {config.preference.steps} steps ({out_dir / 'train' / 'train.yaml'})")
        pib = train_pib(config, model_path, data, seed, out_dir / "train")
    with timed(seconds, "evaluation"):
        step(f"seed {seed}: evaluating base + PIB")
        after = evaluate_model(model_path, backbone, pib, data, config.evaluation, out_dir / "after")

    curves = training_curves(read_json(pib / "log_history.json"))
    losses = [point[1] for point in curves["loss"]]
    result = {
        "seed": seed,
        "before": before,
        "after": after,
        "training": {
            "checkpoint": pib.relative_to(out_dir.parent).as_posix(),
            "steps": config.preference.steps,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "curves": curves,
        },
    }
    return result, seconds


def run_demo(
    config: DemoConfig,
    seeds: int = 1,
    out_dir: str | Path = "runs/demo",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[dict, dict]:
    """Run the demo for seeds ``0 .. seeds - 1`` and write the report; returns the content of
    ``report.json`` and of ``run.json``. A folder holding an earlier demo report is replaced
    only with ``overwrite`` (see :mod:`mllm_pib.outputs`)."""
    start = time.perf_counter()
    output = claim(out_dir, DEMO_OUTPUT, overwrite=overwrite)
    out = output.path
    step("base model: pretraining on the biased world, or reusing it from the cache")
    base = pretrained_base_model(config, cache_dir, progress=progress)
    step(f"base model: {base.path} ({'from the cache' if base.cached else 'pretrained and cached'})")
    output.prepare()
    per_seed, seconds = zip(*(run_seed(config, base.path, seed, out / f"seed{seed}", progress) for seed in range(seeds)))
    losses = base.record["losses"]
    report = {
        "mllm_pib_version": __version__,
        "config": config.model_dump(mode="json"),
        "threads": torch.get_num_threads(),  # float sums, hence the numbers, depend on it
        "seeds": list(range(seeds)),
        "base_model": {
            "key": config.backbone_key(),
            "prompt_tokens": base.record["prompt_tokens"],
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        },
        "before": mean_metrics([s["before"] for s in per_seed]),
        "after": mean_metrics([s["after"] for s in per_seed]),
        "per_seed": list(per_seed),
    }
    run = {
        "base_model": {"path": str(base.path), "cached": base.cached, "pretraining_seconds": base.record["seconds"]},
        "per_seed_seconds": list(seconds),
        "seconds": time.perf_counter() - start,
    }
    step(f"writing the report to {out}")
    write_report(report, run, losses, out)
    return report, run


@contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``seconds[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


def step(message: str) -> None:
    """Announce a step of the demo (a status message: stderr, between the progress bars)."""
    log.info(f"==> {message}")
