"""Memory over a long run: the process's resident set size (RSS) through 1000 training steps and
1000 evaluation items on the tiny LLaVA, sampled at intervals, with the fitted slope.

Training runs the real stack — :class:`~mllm_pib.training.trainer.PIBTrainer` on a
:class:`~mllm_pib.data.dataset.PreferenceDataset` of the synthetic world, with periodic
checkpoints — and samples RSS every ``--every`` steps. Evaluation answers POPE-style questions
with :func:`~mllm_pib.evaluation.runner.generate_answers` (batched greedy generation, answers
appended to a JSON-lines file, resumable), ``--every`` items at a time, sampling after each chunk.

A leak shows as a steady positive slope. The slope is a least-squares fit over the samples after
a warm-up (the first ``--warmup`` fraction: allocator pools, caches and lazily built kernels fill
up there), in MiB per 1000 steps or items.

Usage::

    python benchmarks/steady_state.py                 # 1000 steps, 1000 items
    python benchmarks/steady_state.py --steps 200 --items 200 --json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

import _common as C


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def fit(samples: list[tuple[int, float]], warmup: float) -> dict:
    """Least-squares slope (MiB per 1000) over the samples past the warm-up, and the extremes."""
    last = samples[-1][0]
    kept = [(x, y) for x, y in samples if x >= warmup * last] or samples
    xs, ys = [x for x, _ in kept], [y for _, y in kept]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in kept) / spread if spread else 0.0
    return {
        "samples": [[x, round(y, 1)] for x, y in samples],
        "slope_mib_per_1000": round(1000 * slope, 2),
        "after_warmup_mib": round(ys[0], 1),
        "end_mib": round(ys[-1], 1),
        "peak_mib": round(max(y for _, y in samples), 1),
        "fitted_from": xs[0],
    }


class RssSampler(TrainerCallback):
    def __init__(self, every: int):
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.samples.append((state.global_step, rss_mib()))


def prepare(work: Path, scenes: int):
    from mllm_pib.demo.world import World, export_dataset
    from mllm_pib.plugins import get_backbone

    get_backbone("llava").write_tiny(str(work / "model"), seed=0)
    world = World(0).sample(scenes)
    export_dataset(world, work / "data", seed=0)
    return world


def train(work: Path, steps: int, every: int):
    """The PIB model after ``steps`` training steps, and the RSS samples taken on the way."""
    from mllm_pib.config import TrainConfig
    from mllm_pib.data.dataset import PreferenceCollator
    from mllm_pib.data.records import BadRecordBudget
    from mllm_pib.plugins import get_backbone
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.run import build_dataset, build_model
    from mllm_pib.training.trainer import PIBTrainer

    data = work / "data"
    config = TrainConfig(
        backbone="llava", model=str(work / "model"), max_length=256,
        data=[{"format": "desc", "path": str(data / "hadpo/desc_data.json"), "images": str(data / "VG")},
              {"format": "pope", "path": str(data / "hadpo/pope_data.json"), "images": str(data / "VG")}],
        pib={"num_heads": 4, "intermediate_size": 64},
        training={"output_dir": str(work / "run"), "per_device_train_batch_size": 4, "max_steps": steps,
                  "learning_rate": 1e-3, "logging_steps": every, "save_steps": max(1, steps // 4),
                  "save_total_limit": 2, "seed": 0, "use_cpu": True, "disable_tqdm": True},
    )
    args = config.training_arguments()
    backbone = get_backbone("llava").load(config.model)
    model = build_model(config, backbone)
    policy = config.freeze_policy()
    policy.apply(model)
    dataset = build_dataset(config, backbone, BadRecordBudget(0))
    sampler = RssSampler(every)
    trainer = PIBTrainer(model, args=args, train_dataset=dataset, data_collator=PreferenceCollator(backbone),
                         step=PreferenceStep(model, config.loss), policy=policy, callbacks=[sampler])
    trainer.remove_callback(PrinterCallback)  # it prints every log to stdout, which carries the result
    sampler.samples.append((0, rss_mib()))
    trainer.train()
    return model, sampler.samples


def evaluate(model, world, work: Path, items: int, every: int) -> list[tuple[int, float]]:
    from mllm_pib.demo.world import KINDS, question
    from mllm_pib.evaluation.pope import format_prompt
    from mllm_pib.evaluation.runner import EvalItem, GenerationSettings, generate_answers

    images = work / "data" / "VG" / "VG_100K"
    queue = [
        EvalItem(i, images / world[i % len(world)].filename, format_prompt(question(KINDS[i % len(KINDS)].word), "hadpo"))
        for i in range(items)
    ]
    settings = GenerationSettings(max_new_tokens=8, batch_size=8, stop_at_sentence_end=True)
    model.eval()
    samples = [(0, rss_mib())]
    with torch.no_grad():
        for done in range(every, items + every, every):
            generate_answers(model, queue[: min(done, items)], work / "answers.jsonl", settings, desc="answering")
            samples.append((min(done, items), rss_mib()))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--items", type=int, default=1000, help="evaluation items")
    parser.add_argument("--every", type=int, default=50, help="sampling interval (steps, items)")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction left out of the slope fit")
    parser.add_argument("--scenes", type=int, default=24, help="synthetic scenes (training pairs, images)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if min(args.steps, args.items, args.every) < 1 or not 0 <= args.warmup < 1:
        sys.exit("--steps, --items and --every must be positive, --warmup in [0, 1)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        world = prepare(work, args.scenes)
        gc.collect()
        start = time.perf_counter()
        model, train_samples = train(work, args.steps, args.every)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        eval_samples = evaluate(model, world, work, args.items, args.every)
        eval_seconds = time.perf_counter() - start

    result = {
        "train": {"steps": args.steps, "seconds": round(train_seconds, 1), **fit(train_samples, args.warmup)},
        "eval": {"items": args.items, "seconds": round(eval_seconds, 1), **fit(eval_samples, args.warmup)},
        "threads": args.threads, "torch": torch.__version__,
    }
    lines = []
    for phase, unit in (("train", "steps"), ("eval", "items")):
        r = result[phase]
        lines.append(f"{phase}: {r[unit]} {unit} in {r['seconds']} s; RSS {r['after_warmup_mib']} MiB at {unit[:-1]} "
                     f"{r['fitted_from']} -> {r['end_mib']} MiB at the end (peak {r['peak_mib']} MiB); "
                     f"slope {r['slope_mib_per_1000']} MiB per 1000 {unit}")
        lines.append("  " + "  ".join(f"{x}:{y:.0f}" for x, y in r["samples"]))
    C.emit(result, args.json, lines)


if __name__ == "__main__":
    main()
