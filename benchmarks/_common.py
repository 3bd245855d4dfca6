"""Pieces the benchmark scripts share: LLaVA models of a chosen size, the synthetic world's images,
moving batches to a device, wall-clock timing, peak memory, worker subprocesses and output.

The scripts import this module as ``_common`` (their own folder is first on ``sys.path`` when
they run as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LlavaSize(BaseModel):
    """The widths and depths of a LLaVA-1.5-shaped model (CLIP tower + MLP projector + LLaMA).

    ``tiny_config`` gives every part the same depth and head count and 2x MLP widths; these
    fields set the parts apart as LLaVA-1.5 does (CLIP MLP 4x, LLaMA MLP ~2.7x).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    vision_hidden: int = Field(gt=0)
    vision_intermediate: int = Field(gt=0)
    vision_layers: int = Field(gt=0)
    vision_heads: int = Field(gt=0)
    hidden: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    vocab_size: int = Field(ge=0, description="rows of the embedding and lm_head (0 or less than the tokenizer's: the tokenizer's)")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def write_llava(size: LlavaSize, out_dir: str | Path, corpus: Iterable[str], *, device: str = "cpu",
                dtype: str = "float32", seed: int = 0, legacy: bool = False) -> None:
    """Write a random ``LlavaForConditionalGeneration`` of ``size`` and its processor (tokenizer
    trained on ``corpus``, with the Llama tokenizer's ``legacy`` setting) to ``out_dir``, in the
    llava-hf layout the plugin loads."""
    from transformers import LlavaForConditionalGeneration

    from mllm_pib_llava.tiny import IMAGE_TOKEN, tiny_config, tiny_processor

    processor = tiny_processor(corpus, size.image_size, size.patch_size, legacy=legacy)
    tokenizer = processor.tokenizer
    config = tiny_config(
        max(size.vocab_size, len(tokenizer)), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_size=size.image_size, patch_size=size.patch_size, vision_hidden=size.vision_hidden,
        hidden=size.hidden, layers=size.layers, heads=size.heads,
    )
    vision, text = config.vision_config, config.text_config
    vision.intermediate_size, vision.num_hidden_layers = size.vision_intermediate, size.vision_layers
    vision.num_attention_heads = size.vision_heads
    text.intermediate_size = size.intermediate
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where the model runs: a GPU does it in a blink
        model = LlavaForConditionalGeneration(config).to(DTYPES[dtype]).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def load_llava(model_dir: str | Path, device: str, dtype: str):
    """The mllm-pib ``llava`` backbone of a written model, frozen, on ``device``."""
    from mllm_pib.plugins import get_backbone

    return get_backbone("llava").load(str(model_dir), dtype=dtype, device=device)


def write_scene_images(scenes: Sequence, image_dir: Path) -> None:
    """Render the world's scenes as ``<image_id>.png`` files."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        scene.render().save(image_dir / scene.filename)


def to_device(batch, device: str):
    """``batch`` with every tensor (in nested dicts and lists) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [to_device(value, device) for value in batch]
    return batch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds ``fn()`` takes, including the device work it queued.

    CPU time is the cross-check on a shared machine: it leaves out the time other processes
    held the cores."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class PeakMemory:
    """Peak memory held above a baseline taken by :meth:`start`.

    On CUDA it is torch's allocator peak (``max_memory_allocated``). On CPU it is the process's
    resident set size: torch's CPU tensors live in ordinary process memory, which Python-level
    tracers (``tracemalloc``) do not see. The kernel keeps the high-water mark (``VmHWM``);
    writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so the peak is
    exact and counts nothing from before the baseline (the interpreter and its imports).
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0.0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        Path("/proc/self/clear_refs").write_text("5")
        self.baseline = _proc_status_bytes("VmRSS")

    def peak_mb(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_bytes("VmHWM")
        return (peak - self.baseline) / 2**20


def _proc_status_bytes(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")
    return float(found.group(1)) * 1024


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Run ``script`` in a fresh Python process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict, as_json: bool, lines: Sequence[str]) -> None:
    """Print the result as one JSON object (``--json``) or as readable lines."""
    print(json.dumps(result) if as_json else "\n".join(lines), flush=True)


def run_or_work(args, worker: Callable[[str, Path], dict], run: Callable[..., dict],
                report_lines: Callable[[dict], Sequence[str]]) -> None:
    """A script's body after its arguments: in a worker process (``--worker NAME --workdir DIR``)
    print the worker's JSON result; otherwise run the whole comparison and report it."""
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.workdir))), flush=True)
        return
    result = run(args)
    emit(result, args.json, report_lines(result))


def add_device_arguments(parser, sizes: Sequence[str]) -> None:
    """``--device``, ``--size`` (a preset) and ``--dtype`` (default: bfloat16 on CUDA, else float32)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", default=sizes[0], choices=sizes, help="model and data size preset")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: steadier than 2 on a small shared machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def resolve_dtype(args) -> str:
    if args.dtype:
        return args.dtype
    return "bfloat16" if args.device.startswith("cuda") else "float32"


def configure(args) -> None:
    """Check the device, set the CPU thread count, and keep stdout for the results."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):
        # saving a model imports deepspeed (through accelerate), which otherwise prints a
        # warning on stdout when it finds no GPU, and stdout must hold nothing but the results
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
