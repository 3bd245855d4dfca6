"""The GPU measurements in one command, within ten minutes: checks first, then the two training
benchmarks at LLaVA-1.5-7B's widths, each part in a process of its own with its own time limit,
its JSON result written as soon as it ends.

Parts, in this order (``--parts`` picks some):

* ``checks`` (~1 min) — tiny random LLaVAs on the GPU: a bf16 training step (the identity block
  leaves the loss at log 2, gradients are finite, a step changes the loss, a pair's packed row
  gives the log-probs of its whole sequences) and generation with and without the KV cache
  (greedy and beam search, float32 and bfloat16, a block that changes the tokens);
* ``dpo_step`` (~4 min) — ``dpo_step.py --device cuda --size realistic --json``;
* ``vs_trl`` (~4 min) — ``vs_trl.py --device cuda --size realistic --json`` (needs the ``bench`` extra).

Results go to a new folder ``OUT/<UTC time>/``: ``<part>.json`` per part and ``summary.json``.
Exit status 0 when every part ran and every check passed, 1 otherwise, 2 when no GPU is visible.

Usage::

    python benchmarks/gpu.py                       # all parts, results under gpu-results/
    python benchmarks/gpu.py --parts checks --out /tmp/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C
import _pairs as P

HERE = Path(__file__).resolve().parent
# seconds each part may take; together they leave half a minute of a ten-minute window
LIMITS = {"checks": 90, "dpo_step": 240, "vs_trl": 240}
BENCHMARKS = {"dpo_step": "dpo_step.py", "vs_trl": "vs_trl.py"}
# a LLaVA small enough to build in a second: 36 image tokens, LLaMA 64 wide with 2 layers
TINY = P.BenchSize(
    model=C.LlavaSize(image_size=48, patch_size=8, vision_hidden=32, vision_intermediate=64, vision_layers=2,
                      vision_heads=4, hidden=64, intermediate=128, layers=2, heads=4, vocab_size=0),
    answer_words=12, pairs_per_batch=2, warmup=0, steps=2,
)
BF16_LOGP_RTOL = 0.02  # packed row against whole sequences: bf16 keeps 8 bits of mantissa


def no_gpu_reason() -> str | None:
    """Why no GPU can be used, or None."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
                "(this repository pins the CPU one for machines without a GPU)")
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the driver and CUDA_VISIBLE_DEVICES"
    return None


# ---------------------------------------------------------------------------------------- checks


def tiny_pairs(work: Path, device: str, dtype: str):
    """A tiny LLaVA and a pair batch of its data, on ``device`` in ``dtype``."""
    from mllm_pib.data.dataset import PreferenceCollator

    if not (work / "model").is_dir():
        P.write_pairs_and_model(work, TINY, "cpu", "float32")
    backbone = C.load_llava(work / "model", device, dtype)
    dataset = P.pair_dataset(backbone, work / "data" / "pairs.jsonl")
    batch = PreferenceCollator(backbone)([dataset[i] for i in range(TINY.pairs_per_batch)])
    return backbone, C.to_device(batch, device)


def strong_block(model) -> None:
    """Open the block's gates and scale its weights, so that it changes the tokens."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.7)
            elif param.dim() > 1:
                param.mul_(8.0)


def check_training_step(work: Path, device: str) -> dict:
    """A stage-1 step with a bfloat16 backbone and the block's float32 weights."""
    from mllm_pib.config import LossConfig
    from mllm_pib.freezing import FreezePolicy
    from mllm_pib.model import PIBModel
    from mllm_pib.training.preference import PreferenceStep

    backbone, batch = tiny_pairs(work, device, "bfloat16")
    model = PIBModel(backbone, pib_config={"num_heads": 4, "intermediate_size": 128})
    policy = FreezePolicy.preset("stage1")
    policy.apply(model)
    model.train()
    step = PreferenceStep(model, LossConfig(beta=0.5))
    optimizer = torch.optim.AdamW(model.pib.parameters(), lr=1e-2)
    loss, _ = step(batch)
    loss.backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.pib.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad()
    after = step(batch)[0].item()
    with torch.no_grad():  # a block that changes the log-probs, scored both ways
        strong_block(model)
        vision = backbone.encode_vision(**batch["vision_inputs"])
        scores = []
        for shared in (True, False):
            rows = model.pair_hidden(batch, vision, shared_prefix=shared)
            scores.append(model.score_answers(rows.hidden, rows.vision(vision), rows.labels, rows.text_mask).logps.float())
    packed, whole = scores
    relative = float(((packed - whole).abs() / whole.abs().clamp(min=1)).max())
    result = {
        "loss_at_identity": loss.item(), "loss_after_one_step": after, "gradients_finite": finite,
        "block_dtype": str(next(model.pib.parameters()).dtype), "packed_vs_whole_max_relative_logp_diff": relative,
    }
    result["passed"] = (abs(result["loss_at_identity"] - math.log(2)) < 1e-6 and finite and math.isfinite(after)
                        and after != result["loss_at_identity"] and relative <= BF16_LOGP_RTOL)
    return result


@torch.no_grad()
def check_generation(work: Path, device: str, dtype: str) -> dict:
    """Greedy and beam-search tokens with and without the KV cache, with a block that changes them."""
    from PIL import Image

    from mllm_pib.model import PIBModel

    backbone, _ = tiny_pairs(work, device, dtype)
    model = PIBModel(backbone, pib_config={"num_heads": 4, "intermediate_size": 128})
    strong_block(model)
    images = [Image.open(path) for path in sorted((work / "data").glob("*.png"))[:2]]
    batch = model.prompt_batch(images, ["Describe this image in detail.", "Is there a tree in the image?"])
    args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    result = {}
    for beams in (1, 3):
        cached = model.generate(*args, max_new_tokens=12, num_beams=beams)
        uncached = model.generate(*args, max_new_tokens=12, num_beams=beams, use_cache=False)
        result[f"beams_{beams}_identical"] = torch.equal(cached, uncached)
    base = model.generate(*args, max_new_tokens=12, bypass_pib=True)
    result["block_changes_tokens"] = not torch.equal(model.generate(*args, max_new_tokens=12), base)
    result["passed"] = all(result.values())
    return result


def run_checks(device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="mllm-pib-gpu-checks-") as tmp:
        work = Path(tmp)
        results = {"bf16_training_step": check_training_step(work, device)}
        for dtype in ("float32", "bfloat16"):
            results[f"generation_{dtype}"] = check_generation(work, device, dtype)
    # bf16 kernels differ between a cached step and a full recomputation: near-tied tokens of a
    # random model may flip, so only float32 generation must match exactly
    results["passed"] = results["bf16_training_step"]["passed"] and results["generation_float32"]["passed"]
    return results


# ----------------------------------------------------------------------------------------- parts


def part_command(part: str) -> list[str]:
    if part == "checks":
        return [sys.executable, __file__, "--worker", "checks"]
    return [sys.executable, str(HERE / BENCHMARKS[part]), "--device", "cuda", "--size", "realistic", "--json"]


def run_part(part: str, limit: float) -> dict:
    """Run one part in its own process group (its workers too), stopped after ``limit`` seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(part_command(part), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"stopped after its limit of {limit:.0f} s", "seconds": time.monotonic() - start}
    seconds = time.monotonic() - start
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "seconds": seconds}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"its last output line is not JSON: {lines[-1][:200]!r}", "seconds": seconds}
    return {"result": result, "seconds": seconds}


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def new_run_dir(root: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = root / stamp
    out.mkdir(parents=True, exist_ok=False)  # never write into an earlier run's folder
    return out


def part_passed(part: str, record: dict) -> bool:
    if "error" in record:
        return False
    return record["result"].get("passed", True) if part == "checks" else True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-results", help="folder for the results (a new subfolder per run)")
    parser.add_argument("--parts", default=",".join(LIMITS),
                        help=f"comma-separated parts to run, in their order: {', '.join(LIMITS)} (default: all)")
    parser.add_argument("--worker", choices=("checks",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(LIMITS))
    if unknown or not args.parts:
        parser.error(f"--parts: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(LIMITS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(run_checks("cuda")), flush=True)
        return 0
    out = new_run_dir(Path(args.out))
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    for part in sorted(args.parts, key=list(LIMITS).index):
        print(f"{part}: running (limit {LIMITS[part]} s)", file=sys.stderr, flush=True)
        record = run_part(part, LIMITS[part])
        write_json(out / f"{part}.json", record)
        summary["parts"][part] = {"passed": part_passed(part, record), "seconds": round(record["seconds"], 1),
                                  **({"error": record["error"]} if "error" in record else {})}
        print(f"{part}: {'ok' if summary['parts'][part]['passed'] else 'FAILED'} "
              f"({record['seconds']:.0f} s) -> {out / (part + '.json')}", file=sys.stderr, flush=True)
    summary["passed"] = all(p["passed"] for p in summary["parts"].values())
    write_json(out / "summary.json", summary)
    print(json.dumps({"results": str(out), **summary}), flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
