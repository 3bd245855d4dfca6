"""Time and peak memory of one preference-optimisation step of the PIB: the research code's
scheme against mllm-pib, with and without the frozen-feature cache.

Schemes, each a forward + backward + Adam step over the PIB's parameters per batch of pairs:

* ``baseline`` — the research code: the policy plus a deep copy of the whole model as the
  reference (two full models in memory); chosen and rejected rows concatenated into one batch of
  whole sequences, the image encoded once per row (four encodings per pair: policy and
  reference, chosen and rejected); the PIB and ``lm_head`` over every position; backward
  through the policy's PIB only.
* ``ours`` — :class:`~mllm_pib.training.preference.PreferenceStep` on a
  :class:`~mllm_pib.data.dataset.PreferenceCollator` batch: one frozen backbone pass shared by
  policy and reference, the image encoded once, image + prompt run once per pair with both
  answers continued from its KV cache, block and head on the answer positions only.
* ``cached`` — the same step on :func:`~mllm_pib.training.feature_cache.collate_cached` batches
  read from a cache that :func:`~mllm_pib.training.feature_cache.build_cache` wrote beforehand.

Times are medians over steps run round-robin in one process (so a change in the machine's load
hits every scheme alike); each scheme's peak memory comes from a fresh process of its own.

Usage::

    python benchmarks/dpo_step.py                                   # CPU, small model
    python benchmarks/dpo_step.py --device cuda --size realistic    # 7B layer width, bf16
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
from pathlib import Path

import torch

import _common as C
import _pairs as P
from _pairs import BenchSize

SCHEMES = ("baseline", "ours", "cached")
LEARNING_RATE = 1e-5
BETA = 0.1
MEMORY_STEPS = 3  # steps after the warm-up in each memory process: the peak settles after a few


# LLaVA-1.5-7B prompts hold 576 image tokens and ~40 template tokens, HA-DPO descriptions ~100 tokens
SIZES = {
    # a quarter of the image tokens and of the answer length; 3/16 of the width and half the
    # depth, so that the block stays a small part of the model (7% of the decoder; 3% in LLaVA)
    "small": BenchSize(
        model=C.LlavaSize(**P.SMALL_VISION, hidden=768, intermediate=2064, layers=16, heads=12),
        answer_words=25, pairs_per_batch=1, warmup=1, steps=5,
    ),
    # LLaVA-1.5-7B's widths, image tokens and answer length, half its depth (vision and LLM)
    "realistic": BenchSize(model=P.LLAVA_7B_HALF_DEPTH, answer_words=100, pairs_per_batch=2, warmup=2, steps=10),
}


# ---------------------------------------------------------------------------------------- data


def prepare(work: Path, size: BenchSize, device: str, dtype: str) -> dict:
    """Write the model, the preference data and the feature cache; returns the run's setup."""
    from mllm_pib.config import TrainConfig
    from mllm_pib.training.feature_cache import build_cache

    pairs = P.write_pairs_and_model(work, size, device, dtype)
    config = TrainConfig(
        backbone="llava", model=str(work / "model"), backbone_options={"dtype": dtype, "device": device},
        data=[{"format": "generic", "path": str(pairs)}], pib=size.pib, max_length=8192,
    )
    cache_dtype = "float16" if dtype == "float32" else dtype
    build_cache(config, work / "cache", dtype=cache_dtype, batch_size=size.pairs_per_batch)
    setup = {"device": device, "dtype": dtype, "config": json.loads(config.model_dump_json())}
    setup["tokens"] = P.token_counts(pair_dataset(*load_backbone(setup)))
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


# ------------------------------------------------------------------------------------- schemes


_LOADED: dict[str, object] = {}  # one frozen backbone per process, shared by the schemes built in it


def load_backbone(setup: dict):
    """The frozen backbone and the training config of the run."""
    from mllm_pib.config import TrainConfig

    config = TrainConfig(**setup["config"])
    if config.model not in _LOADED:
        _LOADED[config.model] = C.load_llava(config.model, setup["device"], setup["dtype"])
    return _LOADED[config.model], config


def pair_dataset(backbone, config):
    """The checked, tokenised preference pairs."""
    from mllm_pib.data.records import BadRecordBudget
    from mllm_pib.training.run import build_dataset

    return build_dataset(config, backbone, BadRecordBudget(0))


def stage1_model(backbone, config):
    """A PIBModel whose block alone trains (the published stage 1), and its optimizer."""
    from mllm_pib.freezing import FreezePolicy
    from mllm_pib.training.run import build_model

    model = build_model(config, backbone)
    policy = FreezePolicy.preset("stage1")
    policy.apply(model)
    model.train()
    return model, policy, optimizer(model.pib.parameters())


def optimizer(params):
    """The trainer's optimizer: transformers' default for torch >= 2.8, ``adamw_torch_fused``."""
    return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True)


def optimise(optimizer, loss) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def pair_loader(backbone, config, pairs: int):
    from torch.utils.data import DataLoader

    from mllm_pib.data.dataset import PreferenceCollator

    dataset = pair_dataset(backbone, config)
    return P.endless(DataLoader(dataset, batch_size=pairs, collate_fn=PreferenceCollator(backbone)))


def baseline_scheme(setup: dict, size: BenchSize) -> P.Step:
    import copy

    from mllm_pib.objectives import IGNORE_INDEX, preference_loss, sequence_logps

    backbone, config = load_backbone(setup)
    device = setup["device"]
    policy, _, optimizer = stage1_model(backbone, config)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # the second full model
    batches = pair_loader(backbone, config, size.pairs_per_batch)

    def step() -> None:
        batch = C.to_device(next(batches), device)
        n = batch["prompt_ids"].shape[0]
        rows = torch.arange(n, device=device).repeat(2)  # chosen rows, then rejected rows
        ids = torch.cat([batch["prompt_ids"][rows], batch["answer_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"][rows], batch["answer_mask"]], 1)
        labels = torch.cat([torch.full_like(batch["prompt_ids"][rows], IGNORE_INDEX),
                            batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, IGNORE_INDEX)], 1)
        per_row = {"pixel_values": batch["vision_inputs"]["pixel_values"][rows]}  # one encoding per row
        policy_logps = sequence_logps(policy(ids, mask, per_row), labels)
        with torch.no_grad():
            ref_logps = sequence_logps(reference(ids, mask, per_row), labels)
        loss, _ = preference_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta=BETA)
        optimise(optimizer, loss)

    return step


def preference_scheme(setup: dict, batches) -> P.Step:
    """mllm-pib's step (:class:`PreferenceStep`, stage 1) on the batches of ``batches``."""
    from mllm_pib.config import LossConfig
    from mllm_pib.training.preference import PreferenceStep

    backbone, config = load_backbone(setup)  # training from a cache loads it too: the head is used
    model, _, optimizer = stage1_model(backbone, config)
    preference_step = PreferenceStep(model, LossConfig(beta=BETA))

    def step() -> None:
        loss, _ = preference_step(C.to_device(next(batches), setup["device"]))
        optimise(optimizer, loss)

    return step


def ours_scheme(setup: dict, size: BenchSize) -> P.Step:
    return preference_scheme(setup, pair_loader(*load_backbone(setup), size.pairs_per_batch))


def cached_scheme(setup: dict, size: BenchSize, cache_dir: Path) -> P.Step:
    from torch.utils.data import DataLoader

    from mllm_pib.training.feature_cache import CachedPairs, collate_cached

    cached = CachedPairs(cache_dir, json.loads((cache_dir / "manifest.json").read_text()))
    return preference_scheme(setup, P.endless(DataLoader(cached, batch_size=size.pairs_per_batch, collate_fn=collate_cached)))


def build_scheme(name: str, setup: dict, size: BenchSize, work: Path) -> P.Step:
    if name == "baseline":
        return baseline_scheme(setup, size)
    if name == "ours":
        return ours_scheme(setup, size)
    return cached_scheme(setup, size, work / "cache")


# ------------------------------------------------------------------------------------- workers


# what a scheme imports, loaded before the memory baseline so that the libraries are in it
PRELOAD = (
    "transformers.models.clip.modeling_clip", "transformers.models.llama.modeling_llama",
    "transformers.models.llava.modeling_llava", "mllm_pib_llava.backbone", "mllm_pib.training.feature_cache",
    "mllm_pib.training.preference", "mllm_pib.training.run",
)


def preload() -> None:
    from mllm_pib.plugins import get_backbone

    for module in PRELOAD:
        importlib.import_module(module)
    get_backbone("llava")


def memory_worker(name: str, work: Path, size: BenchSize) -> dict:
    """Peak memory of one scheme above this fresh process's baseline (taken before the model)."""
    setup = json.loads((work / "setup.json").read_text())
    preload()
    meter = C.PeakMemory(setup["device"])
    meter.start()
    step = build_scheme(name, setup, size, work)
    for _ in range(size.warmup + MEMORY_STEPS):
        step()
    return {"peak_mb": meter.peak_mb()}


def timing_worker(work: Path, size: BenchSize) -> dict:
    """Median wall-clock and CPU seconds per step of every scheme, run round-robin."""
    setup = json.loads((work / "setup.json").read_text())
    return P.round_robin({name: build_scheme(name, setup, size, work) for name in SCHEMES}, size, setup["device"])


# --------------------------------------------------------------------------------------- flops


def pair_flops(m: C.LlavaSize, prompt: float, answer: float) -> dict[str, float]:
    """Analytic FLOPs of one pair (a multiply-add counts 2), for a prompt of ``prompt`` tokens
    (image tokens included) and answers of ``answer`` tokens.

    Per token a linear layer costs ``2 * in * out``; attention adds ``4 * width`` per
    (query, key) pair (scores and weighted values); a causal pass over ``T`` tokens has
    ``T (T + 1) / 2`` pairs, ``A`` tokens continuing a cached ``P`` have ``A P + A (A + 1) / 2``.
    The backward of the trained block costs twice its forward (input and weight gradients),
    that of the frozen ``lm_head`` once (input gradients only); the frozen backbone has none.
    """
    h, v, n_img = m.hidden, m.vocab_size, m.image_tokens
    n_vis = n_img + 1  # CLIP's CLS token
    vision_layer = 2 * (4 * m.vision_hidden**2 + 2 * m.vision_hidden * m.vision_intermediate)
    vision = (n_vis * (2 * 3 * m.patch_size**2 * m.vision_hidden + m.vision_layers * vision_layer)
              + m.vision_layers * 4 * m.vision_hidden * n_vis**2
              + n_img * 2 * (m.vision_hidden * h + h * h))  # projector
    decoder_token = 2 * m.layers * (4 * h * h + 3 * h * m.intermediate)

    def decoder(tokens: float, pairs: float) -> float:
        return tokens * decoder_token + m.layers * 4 * h * pairs

    causal = lambda t: t * (t + 1) / 2  # noqa: E731
    align = n_img * 2 * (m.vision_hidden * m.intermediate + m.intermediate * h + 2 * h * h)  # MLP + keys/values
    pib_query = 2 * (2 * h * h + 2 * h * m.intermediate) + 4 * h * n_img  # q, o, MLP, attention
    head = 2 * h * v
    whole = prompt + answer
    continued = decoder(2 * answer, 2 * (answer * prompt + causal(answer)))
    baseline = (4 * vision + 4 * decoder(whole, causal(whole))
                + (4 + 2 * 2) * (align + whole * pib_query)  # policy + reference forward, policy backward
                + (4 + 2) * whole * head)
    # each image aligned and projected once for both answers; the decoder runs the packed row
    # prompt + chosen + rejected, whose attention kernel also scores the masked-out pairs
    block_and_head = 3 * (align + 2 * answer * pib_query) + 3 * 2 * answer * head
    ours = vision + decoder(prompt + 2 * answer, (prompt + 2 * answer) ** 2) + block_and_head
    lower = vision + decoder(prompt, causal(prompt)) + continued + block_and_head
    return {"baseline": baseline, "ours": ours, "lower_bound": lower}


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arguments(parser, tuple(SIZES))
    parser.add_argument("--steps", type=int, help="timed rounds (default: the size preset's)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the size preset's; LLaVA-1.5-7B has 32)")
    parser.add_argument("--worker", choices=(*SCHEMES, "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args) -> dict:
    size = SIZES[args.size].resized(args.steps, args.layers)
    dtype = C.resolve_dtype(args)
    worker_args = ["--size", args.size, "--steps", str(size.steps), "--threads", str(args.threads), "--device", args.device]
    with tempfile.TemporaryDirectory(prefix="mllm-pib-bench-") as tmp:
        work = Path(tmp)
        setup = prepare(work, size, args.device, dtype)
        memory = {name: C.run_worker(__file__, [*worker_args, "--worker", name, "--workdir", tmp]) for name in SCHEMES}
        timing = C.run_worker(__file__, [*worker_args, "--worker", "timing", "--workdir", tmp])
    per_pair = {name: s / size.pairs_per_batch for name, s in timing["s_per_step"].items()}
    cpu = timing["cpu_s_per_step"]
    tokens = setup["tokens"]
    flops = pair_flops(size.model, tokens["prompt"], tokens["answer"])
    return {
        "baseline_s_per_pair": per_pair["baseline"],
        "ours_s_per_pair": per_pair["ours"],
        "cached_s_per_pair": per_pair["cached"],
        "speedup": per_pair["baseline"] / per_pair["ours"],
        "cached_speedup": per_pair["baseline"] / per_pair["cached"],
        "cpu_time_speedup": cpu["baseline"] / cpu["ours"],
        "cpu_time_cached_speedup": cpu["baseline"] / cpu["cached"],
        "baseline_peak_mb": memory["baseline"]["peak_mb"],
        "ours_peak_mb": memory["ours"]["peak_mb"],
        "cached_peak_mb": memory["cached"]["peak_mb"],
        "memory_ratio": memory["ours"]["peak_mb"] / memory["baseline"]["peak_mb"],
        "baseline_gflop_per_pair": flops["baseline"] / 1e9,
        "ours_gflop_per_pair": flops["ours"] / 1e9,
        "lower_bound_gflop_per_pair": flops["lower_bound"] / 1e9,
        "ours_flops_over_lower_bound": flops["ours"] / flops["lower_bound"],
        "baseline_gflops_per_s": flops["baseline"] / 1e9 / per_pair["baseline"],
        "ours_gflops_per_s": flops["ours"] / 1e9 / per_pair["ours"],
        "setup": {"device": args.device, "dtype": dtype, "size": args.size, "pairs_per_batch": size.pairs_per_batch,
                  "timed_steps": size.steps, "warmup_steps": size.warmup, "image_tokens": size.model.image_tokens,
                  "prompt_tokens": tokens["prompt"], "answer_tokens": tokens["answer"],
                  "threads": args.threads, "model": size.model.model_dump()},
    }


def report_lines(r: dict) -> list[str]:
    s = r["setup"]
    return [
        f"DPO step, {s['size']} model on {s['device']} ({s['dtype']}), {s['pairs_per_batch']} pairs per step, "
        f"prompt {s['prompt_tokens']:.0f} tokens ({s['image_tokens']} image), answers {s['answer_tokens']:.0f} tokens",
        f"  s/pair:  baseline {r['baseline_s_per_pair']:.4f}   ours {r['ours_s_per_pair']:.4f}   cached {r['cached_s_per_pair']:.4f}",
        f"  speedup {r['speedup']:.2f}x   cached speedup {r['cached_speedup']:.1f}x   "
        f"(by CPU time: {r['cpu_time_speedup']:.2f}x, {r['cpu_time_cached_speedup']:.1f}x)",
        f"  peak MB: baseline {r['baseline_peak_mb']:.0f}   ours {r['ours_peak_mb']:.0f}   cached {r['cached_peak_mb']:.0f}"
        f"   memory ratio {r['memory_ratio']:.2f}",
        f"  GFLOP/pair: baseline {r['baseline_gflop_per_pair']:.1f}   ours {r['ours_gflop_per_pair']:.1f}   "
        f"lower bound {r['lower_bound_gflop_per_pair']:.1f}   (ours / bound {r['ours_flops_over_lower_bound']:.3f})",
        f"  achieved GFLOP/s: baseline {r['baseline_gflops_per_s']:.1f}   ours {r['ours_gflops_per_s']:.1f}",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    C.configure(args)
    size = SIZES[args.size].resized(args.steps)

    def worker(name: str, work: Path) -> dict:
        return timing_worker(work, size) if name == "timing" else memory_worker(name, work, size)

    C.run_or_work(args, worker, run, report_lines)


if __name__ == "__main__":
    main()
