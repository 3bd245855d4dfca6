"""``mllm-pib sweep``: every combination of a grid of config values, from one feature cache.

``--grid learning_rate=2e-7,5e-7 --grid pib.align=mlp,linear`` runs four trainings. Keys are
config keys (``pib.align``, ``loss.beta``); a bare ``TrainingArguments`` field name
(``learning_rate``) means ``training.<field>``. When the freeze policy allows it, the frozen
backbone runs once: a feature cache is built (or reused) and every run trains from it. Runs go
sequentially or in parallel processes; the results table holds each run's final metrics and
its POPE scores when the config has a ``pope`` section.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mllm_pib.config import TrainConfig, load_config, parse_value
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_write_json, atomic_write_text
from mllm_pib.outputs import OutputKind, claim
from mllm_pib.training.run import TRAIN_OUTPUT

METRICS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def parse_grid(grids: list[str]) -> dict[str, list]:
    """``["a.b=1,2", "lr=3"]`` -> ``{"a.b": [1, 2], "training.lr": [3]}`` (values parsed as YAML)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    parsed: dict[str, list] = {}
    for grid in grids:
        key, sep, values = grid.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {grid!r}: expected key=v1,v2,... (e.g. --grid learning_rate=2e-7,5e-7)")
        key = f"training.{key}" if key in fields else key
        parsed[key] = [parse_value(v) for v in values.split(",")]
    return parsed


def run_name(combination: dict) -> str:
    return "_".join(f"{key.split('.')[-1]}={value}" for key, value in combination.items()) or "base"


CACHE_DIR = "feature-cache"
RESULTS = "results.json"
SWEEP_OUTPUT = OutputKind(command="sweep", what="sweep", writes=(CACHE_DIR, RESULTS, "results.md"), done=RESULTS,
                          resumable=True)


def run_sweep(config_path: str, grids: list[str], out: str, overrides: list[str] = (), parallel: int = 1,
              resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Train every combination of ``grids`` into ``out/<run>``; ``resume`` keeps the finished
    runs, continues the interrupted ones from their last checkpoint and starts the others."""
    grid = parse_grid(grids)
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    out_dir = Path(out)
    base = load_config(config_path, list(overrides))
    names = [run_name(combination) for combination in combinations]
    output = claim(out_dir, SWEEP_OUTPUT, resume=resume, overwrite=overwrite)
    output = dataclasses.replace(output, kind=dataclasses.replace(
        SWEEP_OUTPUT, writes=SWEEP_OUTPUT.writes + tuple(glob.escape(n) + suffix for n in names for suffix in ("", ".log"))
    ))
    output.prepare()
    cache_overrides = shared_cache(config_path, list(overrides), base, combinations, out_dir)
    runs = []
    for name, combination in zip(names, combinations):
        sets = [*overrides, *cache_overrides, *(f"{k}={json.dumps(v)}" for k, v in combination.items())]
        load_config(config_path, sets)  # refuse a bad combination before anything runs
        runs.append((name, combination, sets))

    def launch(run) -> dict:
        name, combination, sets = run
        run_dir, log = out_dir / name, out_dir / f"{name}.log"
        if (run_dir / TRAIN_OUTPUT.done).is_file():  # finished by an earlier, interrupted sweep
            return {"run": name, **combination, "returncode": 0, **final_metrics(run_dir), "log": str(log)}
        command = [sys.executable, "-m", "mllm_pib.cli", "train", "--config", config_path, "--output-dir", str(run_dir)]
        for value in sets:
            command += ["--set", value]
        command += continue_flags(run_dir)
        with log.open("a") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        return {"run": name, **combination, "returncode": code, **final_metrics(run_dir), "log": str(log)}

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = list(pool.map(launch, runs))
    atomic_write_text(out_dir / "results.md", results_table(results))
    atomic_write_json(out_dir / RESULTS, results)
    return results


def continue_flags(run_dir: Path) -> list[str]:
    """How ``train`` takes up a run an interrupted sweep left: from its newest complete
    checkpoint, or afresh when it has none."""
    from mllm_pib.training.trainer import checkpoint_problem, sorted_checkpoints

    if any(checkpoint_problem(c) is None for c in sorted_checkpoints(run_dir)):
        return ["--resume"]
    return ["--overwrite"] if run_dir.exists() else []


def shared_cache(config_path: str, overrides: list[str], base: TrainConfig, combinations: list[dict], out_dir: Path) -> list[str]:
    """Build one feature cache for all runs when nothing upstream of the PIB trains (or reuse
    the one an interrupted sweep built)."""
    if base.freeze_policy().trains_before_pib or any(k.startswith(("data", "model", "backbone", "max_length"))
                                                    for c in combinations for k in c):
        return []
    if base.feature_cache:
        return []
    from mllm_pib.training.feature_cache import MANIFEST, build_cache

    cache = out_dir / CACHE_DIR
    if not (cache / MANIFEST).is_file():
        needs_all = any(load_config(config_path, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in c.items())]).pib.interaction
                        == "self_attention" for c in combinations)
        config = load_config(config_path, [*overrides, *(["pib.interaction=self_attention"] if needs_all else [])])
        build_cache(config, cache, dtype="float32", overwrite=True)  # inside the sweep's own folder
    return [f"feature_cache={cache}"]


def final_metrics(run_dir: Path) -> dict:
    """The last logged value of each objective metric, and POPE F1s when evaluated."""
    out: dict = {}
    history = run_dir / "log_history.json"
    if history.is_file():
        logs = [entry for entry in json.loads(history.read_text()) if "loss" in entry]
        if logs:
            out.update({key: logs[-1][key] for key in METRICS if key in logs[-1]})
    from mllm_pib.evaluation.pope import split_scores

    pope = run_dir / "pope" / "pope.json"
    if pope.is_file():
        report = json.loads(pope.read_text())
        out.update({f"pope_{split}_f1": v["f1"] for split, v in split_scores(report).items()})
        out["pope_mean_f1"] = report["mean_f1"]
    return out


def results_table(results: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in results for k in r if k not in ("log",)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        cells = [f"{result[c]:.4g}" if isinstance(result.get(c), float) else str(result.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
