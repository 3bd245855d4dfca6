"""POPE throughput: the batched evaluator that stops each answer at its first sentence end,
against one-at-a-time generation up to 512 new tokens (the research code's loop).

Both go through :func:`~mllm_pib.evaluation.runner.generate_answers` over the same items, with
greedy decoding; only the settings differ. POPE scores only the text before the first ``.``, so
both must give the same parsed answers (:func:`~mllm_pib.evaluation.pope.answer_is_yes`): the
script checks it and exits with status 1 when they differ.

A randomly initialised model never emits a ``.`` or an end token, which would make the
comparison meaningless; so the model is first trained briefly (supervised, through the
Backbone contract) to answer the synthetic world's questions as LLaVA-1.5 answers POPE
questions in HA-DPO's style: the yes/no sentence, then a description of the image, then the end
token — "No, there is no moon. There is a cup and a flag." The training reaches the format,
not accuracy; the accuracy is reported for what it is.

Usage::

    python benchmarks/eval_pope.py                                   # CPU, small model
    python benchmarks/eval_pope.py --device cuda --size realistic    # 7B layer width, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

import _common as C

MAX_NEW_TOKENS = 512
TRAIN_SCENES = 2000
# one large object per image: a world a small model learns to see within a few hundred steps
WORLD = {"min_objects": 1, "max_objects": 1, "min_object_frac": 0.5, "max_object_frac": 0.75}
EVAL_FIRST_ID = 500_000  # evaluation scenes come after the training ones


class PopeSize(BaseModel):
    """A model size, its brief training and the evaluation run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: C.LlavaSize
    train_steps: int = Field(gt=0)
    train_batch: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    images: int = Field(gt=0, description="evaluation images; one present and one absent object asked per image")
    batch_size: int = Field(gt=0, description="batch size of the batched evaluator")
    repeats: int = Field(gt=0, description="timed runs of each mode (median)")


SIZES = {
    # LLaVA's shape at the demo's scale: CLIP 48 px / 8 (36 image tokens), LLaMA 128 wide
    "small": PopeSize(
        model=C.LlavaSize(image_size=48, patch_size=8, vision_hidden=64, vision_intermediate=256, vision_layers=2,
                          vision_heads=4, hidden=128, intermediate=344, layers=2, heads=4, vocab_size=0),
        train_steps=300, train_batch=16, learning_rate=3e-3, images=100, batch_size=8, repeats=3,
    ),
    # LLaVA-1.5-7B's widths and 576 image tokens, two layers each; its 32000-word head
    "realistic": PopeSize(
        model=C.LlavaSize(image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096, vision_layers=2,
                          vision_heads=16, hidden=4096, intermediate=11008, layers=2, heads=32, vocab_size=32000),
        train_steps=200, train_batch=16, learning_rate=2e-4, images=100, batch_size=8, repeats=3,
    ),
}


# ---------------------------------------------------------------------------------------- model


def prior_answer(word: str) -> bool:
    """The trained model's yes/no answer: "yes" for the head kinds of the world's pairs, "no" for
    their partners, whatever the image shows."""
    from mllm_pib.demo import world as W

    return word in W.PARTNER_OF


def training_examples(scenes, seed: int = 0):
    """An endless stream of supervised examples: a question about a present or an absent object,
    answered with the yes/no sentence of :func:`prior_answer`, then the faithful description."""
    from mllm_pib.demo import world as W
    from mllm_pib.demo.pretrain import SupervisedExample

    rng = random.Random(seed)
    rendered: dict[int, object] = {}
    while True:
        scene = rng.choice(scenes)
        word = rng.choice(scene.words if rng.random() < 0.5 else scene.absent)
        if scene.image_id not in rendered:
            rendered[scene.image_id] = scene.render()
        target = f"{W.answer(word, prior_answer(word))} {scene.caption}"
        yield SupervisedExample(rendered[scene.image_id], W.question(word), target)


def train_model(size: PopeSize, out_dir: Path, device: str) -> dict:
    """Write a random model of ``size``, teach it the answer format, save it; returns the
    training record."""
    from mllm_pib.demo import world as W
    from mllm_pib.demo.base_model import conversation_corpus
    from mllm_pib.demo.pretrain import FinetuneSettings, supervised_finetune

    world = W.World(0, **WORLD)
    C.write_llava(size.model, out_dir, conversation_corpus("llava", world), device=device)
    backbone = C.load_llava(out_dir, device, "float32")
    settings = FinetuneSettings(steps=size.train_steps, batch_size=size.train_batch, learning_rate=size.learning_rate,
                                warmup_steps=size.train_steps // 10)
    # bf16 autocast on a GPU: the weights and the optimizer stay in float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        losses = supervised_finetune(backbone, training_examples(world.sample(TRAIN_SCENES)), settings)
    seconds = time.perf_counter() - start
    backbone.save_pretrained(str(out_dir))
    return {"train_seconds": seconds, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


# ----------------------------------------------------------------------------------------- items


def pope_items(size: PopeSize, image_dir: Path):
    """POPE-style items on held-out scenes: per image one present object and one absent one
    drawn uniformly (as POPE's ``random`` split draws them), with their labels."""
    from mllm_pib.demo import world as W
    from mllm_pib.evaluation.runner import EvalItem

    scenes = W.World(0, **WORLD).sample(size.images, start=EVAL_FIRST_ID)
    C.write_scene_images(scenes, image_dir)
    rng = random.Random(0)
    items, labels = [], {}
    for scene in scenes:
        for word, present in ((rng.choice(scene.words), True), (rng.choice(scene.absent), False)):
            item_id = len(items) + 1
            items.append(EvalItem(item_id, image_dir / scene.filename, W.question(word)))
            labels[item_id] = present
    return items, labels


# ------------------------------------------------------------------------------------ measuring


def run_mode(model, items, out_file: Path, settings, device: str) -> tuple[float, dict[int, str]]:
    """Seconds to answer every item with ``settings``, and the answers."""
    from mllm_pib.evaluation.runner import generate_answers

    answers: dict[int, str] = {}

    def go() -> None:
        answers.update(generate_answers(model, items, out_file, settings, desc=out_file.stem))

    wall, _ = C.timed(go, device)
    return wall, answers


def measure(size: PopeSize, device: str, dtype: str, work: Path) -> dict:
    from mllm_pib.evaluation.pope import answer_is_yes
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.model import PIBModel

    record = train_model(size, work / "model", device)
    backbone = C.load_llava(work / "model", device, dtype)
    m = size.model
    model = PIBModel(backbone, pib_config={"num_heads": m.heads, "intermediate_size": m.intermediate}).eval()
    items, labels = pope_items(size, work / "images")
    modes = {
        "batched": GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=size.batch_size, stop_at_sentence_end=True),
        # batching alone, to tell its share of the speedup from that of the early stop
        "batched_no_stop": GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=size.batch_size),
        "one_at_a_time": GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=1),
    }
    with torch.no_grad():
        for name, settings in modes.items():  # warm-up
            run_mode(model, items[: size.batch_size], work / f"warmup_{name}.jsonl", settings, device)
        seconds = {name: [] for name in modes}
        answers: dict[str, dict[int, str]] = {}
        for repeat in range(size.repeats):
            for name, settings in modes.items():
                wall, answers[name] = run_mode(model, items, work / f"{name}_{repeat}.jsonl", settings, device)
                seconds[name].append(wall)
    parsed = {name: {i: answer_is_yes(text) for i, text in a.items()} for name, a in answers.items()}
    mismatches = [i for i in labels if parsed["batched"][i] != parsed["one_at_a_time"][i]]
    rate = {name: len(items) / C.median(s) for name, s in seconds.items()}
    tokens = {name: _mean_tokens(backbone, a) for name, a in answers.items()}
    return {
        "speedup": rate["batched"] / rate["one_at_a_time"],
        "identical": not mismatches,
        "mismatched_items": mismatches,
        "batching_only_speedup": rate["batched_no_stop"] / rate["one_at_a_time"],
        "batched_items_per_s": rate["batched"],
        "batched_no_stop_items_per_s": rate["batched_no_stop"],
        "one_at_a_time_items_per_s": rate["one_at_a_time"],
        "batched_tokens_per_answer": tokens["batched"],
        "one_at_a_time_tokens_per_answer": tokens["one_at_a_time"],
        "accuracy": sum(parsed["batched"][i] == label for i, label in labels.items()) / len(labels),
        "yes_ratio": sum(parsed["batched"].values()) / len(labels),
        "example_answer": answers["one_at_a_time"][1],
        **record,
        "setup": {"device": device, "dtype": dtype, "items": len(items), "batch_size": size.batch_size,
                  "max_new_tokens": MAX_NEW_TOKENS, "repeats": size.repeats, "image_tokens": m.image_tokens,
                  "model": m.model_dump()},
    }


def _mean_tokens(backbone, answers: dict[int, str]) -> float:
    counts = [len(backbone.tokenizer(text, add_special_tokens=False).input_ids) for text in answers.values()]
    return sum(counts) / len(counts)


def report_lines(r: dict) -> list[str]:
    s = r["setup"]
    return [
        f"POPE generation, {s['items']} items on {s['device']} ({s['dtype']}), {s['image_tokens']} image tokens",
        f"  batched (batch {s['batch_size']}, stop at the first '.'): {r['batched_items_per_s']:.2f} items/s, "
        f"{r['batched_tokens_per_answer']:.1f} tokens/answer",
        f"  one at a time (up to {s['max_new_tokens']} tokens): {r['one_at_a_time_items_per_s']:.2f} items/s, "
        f"{r['one_at_a_time_tokens_per_answer']:.1f} tokens/answer",
        f"  batched without the stop: {r['batched_no_stop_items_per_s']:.2f} items/s",
        f"  speedup {r['speedup']:.2f}x (batching alone {r['batching_only_speedup']:.2f}x); "
        f"parsed answers identical: {r['identical']}",
        f"  model: trained {r['train_seconds']:.0f} s to loss {r['final_loss']:.3f}; accuracy {r['accuracy']:.3f}, "
        f"yes-ratio {r['yes_ratio']:.2f}; e.g. {r['example_answer']!r}",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_device_arguments(parser, tuple(SIZES))
    args = parser.parse_args(argv)
    C.configure(args)
    with tempfile.TemporaryDirectory(prefix="mllm-pib-pope-bench-") as tmp:
        result = measure(SIZES[args.size], args.device, C.resolve_dtype(args), Path(tmp))
    C.emit(result, args.json, report_lines(result))
    if not result["identical"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
