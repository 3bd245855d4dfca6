"""DPO training side by side with TRL's ``DPOTrainer``: seconds per pair and peak memory, on the
same LLaVA and the same preference pairs.

Two comparisons, four schemes, each a ``transformers.Trainer`` running its own ``train()`` loop
(its data loader and collator, forward, backward, gradient clipping, AdamW, scheduler):

* ``trl_stage1`` — TRL trains ``lm_head``; its reference is a frozen copy of the whole model,
  which it loads itself (its default for a model without adapters). ``pib_stage1`` — mllm-pib
  trains the PIB (the published stage 1); the reference is the block bypassed, so the frozen
  backbone runs once for policy and reference, and image and prompt once for both answers.
* ``trl_lora`` — LoRA on the LLM's attention ``q_proj``/``v_proj``; the reference is the model
  with the adapters disabled. ``pib_lora`` — mllm-pib with the same LoRA plus the PIB, the
  reference likewise with the adapters disabled.

Times: the four trainers run in one process, each ``train()`` in a thread of its own, and take
one optimisation step each in turn, the order rotating each round (so a change in the machine's
load hits every scheme alike); a step is timed from the moment a trainer gets its turn (data
loading included) to the end of its optimizer step. Medians over the timed rounds, per pair.
Memory: each scheme in a fresh process, the peak above a baseline taken once the model it trains
is loaded (and its weights read), so the figure is what training adds to the loaded model: for
TRL's stage 1 the reference copy it loads, for every scheme gradients, optimizer state and
activations.

Usage::

    python benchmarks/vs_trl.py --json                                 # CPU, small model
    python benchmarks/vs_trl.py --device cuda --size realistic --json  # 7B layer width, bf16

Needs TRL: ``pip install -c constraints.txt -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

import _common as C
import _pairs as P
from _pairs import BenchSize

SCHEMES = ("trl_stage1", "pib_stage1", "trl_lora", "pib_lora")
LEARNING_RATE = 1e-5
BETA = 0.1
LORA = {"rank": 16, "alpha": 32, "targets": ("q_proj", "v_proj")}
MEMORY_STEPS = 3  # steps after the warm-up in each memory process: the peak settles after a few

SIZES = {
    # 144 image tokens (CLIP 96 px / 8), LLaMA 512 wide with 8 layers: a CPU runs it in minutes
    "small": BenchSize(
        model=C.LlavaSize(**P.SMALL_VISION, hidden=512, intermediate=1376, layers=8, heads=8),
        answer_words=25, pairs_per_batch=1, warmup=2, steps=6,
    ),
    # LLaVA-1.5-7B's widths, 576 image tokens and ~100-token answers; a quarter of its depth
    # (eight decoder layers), so that five model copies load within minutes
    "realistic": BenchSize(model=P.LLAVA_7B_HALF_DEPTH.model_copy(update={"layers": 8}), answer_words=100,
                           pairs_per_batch=2, warmup=2, steps=8),
}


# ---------------------------------------------------------------------------------------- data


def trl_rows(setup: dict) -> list[dict]:
    """The pairs as TRL's vision data set takes them: the image, the prompt text with LLaVA's v1
    template (``<image>`` is expanded by the processor) and each answer with its end token."""
    from PIL import Image

    from mllm_pib_llava.backbone import LLAVA_V1

    bos = setup["bos_token"]
    pairs = Path(setup["pairs"])
    answer = LLAVA_V1.answer.format
    return [{"image": Image.open(pairs.parent / r["image"]).convert("RGB"),
             "prompt": bos + LLAVA_V1.prompt_text(r["prompt"], "<image>"),
             "chosen": answer(answer=r["chosen"]), "rejected": answer(answer=r["rejected"])}
            for r in P.read_records(pairs)]


def check_same_tokens(setup: dict, backbone) -> dict:
    """Mean token counts of the pairs, after checking that TRL's collator gives every pair the
    token ids mllm-pib scores: prompt (image tokens included) + chosen, prompt + rejected."""
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    ours = P.pair_dataset(backbone, setup["pairs"])
    collate = DataCollatorForVisionPreference(AutoProcessor.from_pretrained(setup["model"]))
    for item, row in zip(ours.items, trl_rows(setup), strict=True):
        batch = collate([row])
        for r, answer in enumerate((item.chosen_ids, item.rejected_ids)):
            trl_ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
            if trl_ids != item.prompt_ids + answer:
                raise SystemExit(f"pair {item.pair.pair_id}: TRL's collator gives other tokens than mllm-pib "
                                 f"({len(trl_ids)} against {len(item.prompt_ids) + len(answer)})")
    return P.token_counts(ours)


def prepare(work: Path, size: BenchSize, device: str, dtype: str) -> dict:
    """Write the model and the pairs; returns the run's setup."""
    # TRL tokenises the prompt text whole; a legacy Llama tokenizer then gives the ids LLaVA's
    # chunked tokenisation gives (a non-legacy one drops the "▁" after the image), so both
    # schemes train on the same tokens
    pairs = P.write_pairs_and_model(work, size, device, dtype, legacy=True)
    setup = {"device": device, "dtype": dtype, "model": str(work / "model"), "pairs": str(pairs), "work": str(work),
             "pairs_per_batch": size.pairs_per_batch, "pib": size.pib}
    backbone = C.load_llava(work / "model", device, dtype)
    setup["bos_token"] = backbone.tokenizer.bos_token or ""
    setup["tokens"] = check_same_tokens(setup, backbone)
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


# ------------------------------------------------------------------------------------- schemes


def load(name: str, setup: dict):
    """What a scheme trains, loaded: the transformers model for TRL, the backbone for mllm-pib."""
    if name.startswith("pib"):
        return C.load_llava(setup["model"], setup["device"], setup["dtype"])
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(setup["model"], dtype=C.DTYPES[setup["dtype"]])
    return model.to(setup["device"])


def trainer_arguments(name: str, setup: dict, steps: int) -> dict:
    """The same loop for every trainer: one pair batch per step, AdamW (transformers' default,
    fused), gradient clipping at 1, no logging, no checkpoints, no shuffling."""
    return {
        "output_dir": str(Path(setup["work"]) / "runs" / name), "per_device_train_batch_size": setup["pairs_per_batch"],
        "learning_rate": LEARNING_RATE, "max_steps": steps, "report_to": "none", "save_strategy": "no",
        "logging_strategy": "no", "disable_tqdm": True, "use_cpu": setup["device"] == "cpu", "seed": 0,
        "dataloader_num_workers": 0, "train_sampling_strategy": "sequential",
    }


def trl_trainer(name: str, model, setup: dict, steps: int, callbacks: list):
    """TRL's ``DPOTrainer``, in its fastest configuration here: no gradient checkpointing (TRL's
    default turns it on) and no autocast (the model is already in the run's dtype)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    peft_config = None
    if name == "trl_lora":  # the same modules as mllm-pib's LoRA: inside the language model only
        targets = "|".join(LORA["targets"])
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=rf".*language_model\.layers\.\d+\.self_attn\.({targets})")
    else:
        model.requires_grad_(False)
        model.lm_head.requires_grad_(True)
    args = DPOConfig(**trainer_arguments(name, setup, steps), beta=BETA, max_length=None,
                     activation_checkpointing=False, bf16=False)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(setup)),
                      processing_class=AutoProcessor.from_pretrained(setup["model"]), peft_config=peft_config,
                      callbacks=callbacks)


def pib_config(name: str, setup: dict, steps: int):
    from mllm_pib.config import TrainConfig
    from mllm_pib.freezing import FreezePolicy, LoraSettings

    freeze = "stage1"
    if name == "pib_lora":
        lora = LoraSettings(rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0, targets=list(LORA["targets"]))
        freeze = FreezePolicy(parts={"pib": "train", "llm": "lora"}, lora=lora)
    return TrainConfig(
        backbone="llava", model=setup["model"], backbone_options={"dtype": setup["dtype"], "device": setup["device"]},
        data=[{"format": "generic", "path": setup["pairs"]}], pib=setup["pib"], freeze=freeze, loss={"beta": BETA},
        max_length=8192, training=trainer_arguments(name, setup, steps),
    )


def pib_trainer(name: str, backbone, setup: dict, steps: int, callbacks: list):
    """mllm-pib's trainer as ``mllm-pib train`` builds it."""
    from mllm_pib.data.dataset import PreferenceCollator
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.run import build_model
    from mllm_pib.training.trainer import PIBTrainer

    config = pib_config(name, setup, steps)
    model = build_model(config, backbone)
    policy = config.freeze_policy()
    policy.apply(model)
    return PIBTrainer(model=model, args=config.training_arguments(), train_dataset=P.pair_dataset(backbone, setup["pairs"]),
                      data_collator=PreferenceCollator(backbone), step=PreferenceStep(model, config.loss),
                      policy=policy, callbacks=callbacks)


def build_trainer(name: str, loaded, setup: dict, steps: int, callbacks: list = ()):
    build = pib_trainer if name.startswith("pib") else trl_trainer
    return build(name, loaded, setup, steps, list(callbacks))


# ------------------------------------------------------------------------------------- timing


class Relay:
    """Lets trainers, each running its own ``train()`` in a thread, take one optimisation step at
    a time in a fixed order that rotates each round, and times each step.

    A trainer waits for its turn when training begins and after each step; its step is timed from
    the moment it gets the turn to the end of its optimizer step (``on_step_end``). After its last
    step it keeps the turn until ``train()`` has wound up, so nothing runs alongside a timed step.
    """

    def __init__(self, names: list[str], rounds: int, device: str):
        shifted = lambda r: names[r % len(names):] + names[: r % len(names)]  # noqa: E731
        self.schedule = [name for r in range(rounds) for name in shifted(r)]
        self.device = device
        self.turn = 0
        self.error: BaseException | None = None
        self.times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        self._started = (0.0, 0.0)
        self._cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self.schedule[self.turn] == name)
            if self.error is not None:
                raise RuntimeError("another trainer failed") from self.error
        self._started = (time.perf_counter(), time.process_time())

    def record(self, name: str) -> None:
        C.synchronize(self.device)
        wall, cpu = self._started
        self.times[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    def pass_on(self) -> None:
        with self._cond:
            self.turn = min(self.turn + 1, len(self.schedule) - 1)
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    def callback(self, name: str):
        from transformers import TrainerCallback

        relay = self

        class TakeTurns(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                relay.wait(name)

            def on_step_end(self, args, state, control, **kwargs):
                relay.record(name)
                if state.global_step < state.max_steps:
                    relay.pass_on()
                    relay.wait(name)

            def on_train_end(self, args, state, control, **kwargs):
                relay.pass_on()

        return TakeTurns()


def timing_worker(work: Path, size: BenchSize, threads: int) -> dict:
    """Median wall-clock and CPU seconds per step of every scheme, the trainers taking turns."""
    setup = json.loads((work / "setup.json").read_text())
    rounds = size.warmup + size.steps
    relay = Relay(list(SCHEMES), rounds, setup["device"])
    trainers = {name: build_trainer(name, load(name, setup), setup, rounds, [relay.callback(name)]) for name in SCHEMES}

    def train(trainer) -> None:
        torch.set_num_threads(threads)  # a new thread does not inherit the main thread's setting
        try:
            trainer.train()
        except BaseException as err:
            relay.fail(err)
            raise

    workers = [threading.Thread(target=train, args=(trainer,), name=name) for name, trainer in trainers.items()]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if relay.error is not None:
        raise SystemExit(f"timing failed: {relay.error!r}")
    timed = {name: t[size.warmup:] for name, t in relay.times.items()}
    return {
        "s_per_step": {name: C.median([wall for wall, _ in t]) for name, t in timed.items()},
        "cpu_s_per_step": {name: C.median([cpu for _, cpu in t]) for name, t in timed.items()},
    }


# ------------------------------------------------------------------------------------- memory


def memory_worker(name: str, work: Path, size: BenchSize) -> dict:
    """Peak memory of one scheme's training above this fresh process's loaded model."""
    import trl  # noqa: F401  (its import, like the others, comes before the baseline)

    from mllm_pib.training import trainer  # noqa: F401

    setup = json.loads((work / "setup.json").read_text())
    loaded = load(name, setup)
    with torch.no_grad():  # read every weight: a memory-mapped checkpoint is resident only once touched
        sum(float(p.float().sum()) for p in loaded.parameters())
    meter = C.PeakMemory(setup["device"])
    meter.start()
    build_trainer(name, loaded, setup, size.warmup + MEMORY_STEPS).train()
    return {"peak_mb": meter.peak_mb()}


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arguments(parser, tuple(SIZES))
    parser.add_argument("--steps", type=int, help="timed rounds (default: the size preset's)")
    parser.add_argument("--worker", choices=(*SCHEMES, "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the trainers use the first visible GPU; choose it with CUDA_VISIBLE_DEVICES")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def trl_version() -> str:
    try:
        import trl
    except ImportError:
        raise SystemExit("vs_trl.py needs TRL: pip install -c constraints.txt -e '.[bench]'") from None
    return trl.__version__


def run(args) -> dict:
    size = SIZES[args.size].resized(args.steps)
    dtype = C.resolve_dtype(args)
    worker_args = ["--size", args.size, "--steps", str(size.steps), "--threads", str(args.threads), "--device", args.device]
    with tempfile.TemporaryDirectory(prefix="mllm-pib-vs-trl-") as tmp:
        setup = prepare(Path(tmp), size, args.device, dtype)
        memory = {name: C.run_worker(__file__, [*worker_args, "--worker", name, "--workdir", tmp]) for name in SCHEMES}
        timing = C.run_worker(__file__, [*worker_args, "--worker", "timing", "--workdir", tmp])
    pairs = size.pairs_per_batch
    per_pair = {name: s / pairs for name, s in timing["s_per_step"].items()}
    cpu = timing["cpu_s_per_step"]
    peak = {name: m["peak_mb"] for name, m in memory.items()}
    prompt, answer = setup["tokens"]["prompt"], setup["tokens"]["answer"]
    trl_tokens = 2 * (prompt + answer) / (prompt + 2 * answer)  # decoder tokens TRL runs per one of ours, a pass
    return {
        "speedup_stage1": per_pair["trl_stage1"] / per_pair["pib_stage1"],
        "speedup_lora": per_pair["trl_lora"] / per_pair["pib_lora"],
        "memory_ratio_stage1": peak["pib_stage1"] / peak["trl_stage1"],
        "memory_ratio_lora": peak["pib_lora"] / peak["trl_lora"],
        "cpu_time_speedup_stage1": cpu["trl_stage1"] / cpu["pib_stage1"],
        "cpu_time_speedup_lora": cpu["trl_lora"] / cpu["pib_lora"],
        "decoder_token_ratio_stage1": 2 * trl_tokens,  # TRL: policy and reference passes; ours: one
        "decoder_token_ratio_lora": trl_tokens,  # three passes each: forward, backward, reference
        "s_per_pair": per_pair,
        "peak_mb": peak,
        "setup": {"device": args.device, "dtype": dtype, "size": args.size, "pairs_per_batch": pairs,
                  "timed_steps": size.steps, "warmup_steps": size.warmup, "image_tokens": size.model.image_tokens,
                  "prompt_tokens": prompt, "answer_tokens": answer,
                  "threads": args.threads, "trl": trl_version(), "model": size.model.model_dump()},
    }


def report_lines(r: dict) -> list[str]:
    s, t, m = r["setup"], r["s_per_pair"], r["peak_mb"]
    return [
        f"DPO training vs TRL {s['trl']}, {s['size']} model on {s['device']} ({s['dtype']}), {s['pairs_per_batch']} pairs per step, "
        f"prompt {s['prompt_tokens']:.0f} tokens ({s['image_tokens']} image), answers {s['answer_tokens']:.0f} tokens",
        f"  stage 1: s/pair TRL (lm_head + reference copy) {t['trl_stage1']:.4f}   mllm-pib {t['pib_stage1']:.4f}   "
        f"speedup {r['speedup_stage1']:.2f}x (CPU time {r['cpu_time_speedup_stage1']:.2f}x; "
        f"decoder tokens {r['decoder_token_ratio_stage1']:.2f}x)",
        f"           peak MB above the loaded model: TRL {m['trl_stage1']:.0f}   mllm-pib {m['pib_stage1']:.0f}   "
        f"ratio {r['memory_ratio_stage1']:.2f}",
        f"  LoRA:    s/pair TRL {t['trl_lora']:.4f}   mllm-pib (LoRA + PIB) {t['pib_lora']:.4f}   "
        f"speedup {r['speedup_lora']:.2f}x (CPU time {r['cpu_time_speedup_lora']:.2f}x; "
        f"decoder tokens {r['decoder_token_ratio_lora']:.2f}x)",
        f"           peak MB above the loaded model: TRL {m['trl_lora']:.0f}   mllm-pib {m['pib_lora']:.0f}   "
        f"ratio {r['memory_ratio_lora']:.2f}",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    trl_version()
    C.configure(args)
    size = SIZES[args.size].resized(args.steps)

    def worker(name: str, work: Path) -> dict:
        return timing_worker(work, size, args.threads) if name == "timing" else memory_worker(name, work, size)

    C.run_or_work(args, worker, run, report_lines)


if __name__ == "__main__":
    main()
