"""The demo end to end at reduced size, and its pieces: pretraining, the cache, the data split."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mllm_pib.cli import main
from mllm_pib.demo import world as W
from mllm_pib.demo.base_model import FINISHED, conversation_corpus, pretrained_base_model
from mllm_pib.demo.config import EVAL_OFFSET, SEED_STRIDE, DemoConfig, PretrainConfig
from mllm_pib.demo.data import prepare_seed_data
from mllm_pib.demo.pretrain import (
    FinetuneSettings,
    SupervisedExample,
    answer_loss,
    collate,
    lr_factor,
    shared_prefix_length,
    supervised_finetune,
)
from mllm_pib.demo.report import FIGURES
from mllm_pib.plugins import get_backbone

SPLITS = ("random", "popular", "adversarial")
OBJECT_WORDS = {kind.word for kind in W.KINDS}


# --- independent metric computations ------------------------------------------------------------


def says_yes(text: str) -> bool:
    words = text.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pope_metrics(questions: Path, answers: Path) -> dict:
    labels = {q["question_id"]: q["label"] == "yes" for q in jsonl(questions)}
    said = {a["question_id"]: says_yes(a["text"]) for a in jsonl(answers)}
    assert said.keys() == labels.keys()
    tp = sum(said[i] and labels[i] for i in labels)
    fp = sum(said[i] and not labels[i] for i in labels)
    fn = sum(not said[i] and labels[i] for i in labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "yes_ratio": sum(said.values()) / len(said)}


def chair_metrics(descriptions: Path, objects: Path) -> dict:
    truth = {r["image_id"]: set(r["objects"]) for r in jsonl(objects)}
    mentions = hallucinated = with_hallucination = 0
    for record in jsonl(descriptions):
        named = [w for w in re.findall(r"[a-z]+", record["text"].lower()) if w in OBJECT_WORDS]
        wrong = [w for w in named if w not in truth[record["question_id"]]]
        mentions += len(named)
        hallucinated += len(wrong)
        with_hallucination += bool(wrong)
    return {"chair_i": hallucinated / mentions if mentions else 0.0, "chair_s": with_hallucination / len(truth)}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


# --- the whole demo -------------------------------------------------------------------------------


def run_cli(capsys, out: Path, cache: Path, *flags: str) -> dict:
    code = main(["demo", "--quick", "--json", "--out", str(out), "--cache-dir", str(cache), *flags])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)  # stdout holds the report alone
    assert printed == json.loads((out / "report.json").read_text())
    return printed


def check_report(report: dict, out: Path) -> None:
    (seed,) = report["per_seed"]
    data = out / "seed0" / "data" / "eval"
    for model in ("before", "after"):
        for split in SPLITS:
            expected = pope_metrics(data / "pope" / f"coco_pope_{split}.json",
                                    out / "seed0" / model / "pope" / f"answers_coco_pope_{split}.jsonl")
            for metric, value in expected.items():
                assert report[model]["pope"][split][metric] == pytest.approx(value)
                assert seed[model]["pope"][split][metric] == pytest.approx(value)
        expected = chair_metrics(out / "seed0" / model / "chair" / "descriptions.jsonl", data / "chair_objects.jsonl")
        for metric, value in expected.items():
            assert report[model]["chair"][metric] == pytest.approx(value)

    # the DPO run is the trainer's own: its log, and a block that left the identity. (Whether
    # the loss falls within the quick run's 16 steps on a 20-step base model is chance; learning
    # itself is tested in test_training.py and measured by the full demo.)
    checkpoint = out / seed["training"]["checkpoint"]
    history = json.loads((checkpoint / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 4 and all(math.isfinite(loss) for loss in losses)
    assert (seed["training"]["first_loss"], seed["training"]["last_loss"]) == (losses[0], losses[-1])
    gates = [v for k, v in load_file(checkpoint / "model.safetensors").items() if k.endswith("_gate")]
    assert gates and all(bool((gate != 0).all()) for gate in gates)

    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    markdown = (out / "report.md").read_text()
    assert "POPE adversarial F1" in markdown and "CHAIR_i" in markdown


def test_quick_demo_writes_the_same_report_on_a_fresh_rerun_and_reuses_the_cached_model(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "demo"
    first = run_cli(capsys, out, cache)
    run = json.loads((out / "run.json").read_text())
    assert run["base_model"]["cached"] is False and first["threads"] == 1
    check_report(first, out)
    (model_dir,) = (cache / "demo").iterdir()  # nothing else left behind, no temporary folder
    assert str(model_dir) == run["base_model"]["path"] and (model_dir / FINISHED).is_file()
    assert model_dir.name == first["base_model"]["key"] == DemoConfig.quick().backbone_key()
    report = (out / "report.json").read_bytes()

    # the folder holds a finished demo: refused, then replaced on request; a second run from a
    # fresh cache (the base model pretrained again) writes the very same report.json
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache2")]) == 2
    assert "holds a finished demo report of an earlier `mllm-pib demo`; give --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "cache2").exists()
    run_cli(capsys, out, tmp_path / "cache2", "--overwrite")
    assert json.loads((out / "run.json").read_text())["base_model"]["cached"] is False
    assert (out / "report.json").read_bytes() == report

    before = snapshot(model_dir)
    again = pretrained_base_model(DemoConfig.quick(), cache, progress=False)
    assert (again.cached, again.path) == (True, model_dir)
    assert snapshot(model_dir) == before  # not pretrained again, not rewritten
    assert again.record["seconds"] == run["base_model"]["pretraining_seconds"]


def test_cli_refuses_bad_counts(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


# --- pieces ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A tiny llava whose tokenizer was trained on the conversations of the world."""
    out = tmp_path_factory.mktemp("world-llava")
    registered = get_backbone("llava")
    options = DemoConfig().pretrain.tiny_options
    registered.write_tiny(str(out), seed=0, corpus=conversation_corpus("llava", W.World(0), options), **options)
    return out


def test_every_template_and_world_word_is_one_token(world_model):
    backbone = get_backbone("llava").load(str(world_model))
    for scene in W.World(0).sample(30, start=500):
        for prompt, target in [(W.DESCRIBE_PROMPT, scene.biased_caption), *[(W.question(w), W.answer(w, True)) for w in scene.words]]:
            # answer tokens = the words and punctuation marks, plus the end token
            assert len(backbone.answer_ids(target)) == len(W.split_words(target)) + 1
            prompt_ids = [i for i in backbone.prompt_ids(prompt) if i != backbone.image_token_id]
            text = backbone.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            assert len(prompt_ids) <= len(re.findall(r"\w+|[^\w\s]", text)) + 3  # BOS, line break, image gap


def examples(n: int, start: int = 0) -> list[SupervisedExample]:
    scenes = W.World(3).sample(n, start=start)
    return [SupervisedExample(s.render(), p, t) for s in scenes for p, t in
            [(W.DESCRIBE_PROMPT, s.caption), (W.question(s.words[0]), W.answer(s.words[0], True))]]


def test_answer_loss_and_its_gradients_equal_the_plain_models(world_model):
    backbone = get_backbone("llava").load(str(world_model))
    backbone.requires_grad_(True)
    batch = collate(backbone, examples(3))
    ids = batch["input_ids"]
    assert shared_prefix_length(ids, backbone.image_token_id) > 20  # the system prompt runs once

    def gradients(loss):
        backbone.zero_grad()
        loss.backward()
        # parameters after the vision feature layer get no gradient on either path
        return {name: None if p.grad is None else p.grad.clone() for name, p in backbone.named_parameters()}

    logits = backbone.model(input_ids=ids, attention_mask=batch["attention_mask"], **batch["vision_inputs"]).logits
    # right-padded rows: the logits at t predict token t + 1, scored where that token is labelled
    terms = [
        F.cross_entropy(logits[row, t][None], ids[row, t + 1][None])
        for row in range(len(ids))
        for t in range(ids.shape[1] - 1)
        if batch["labels"][row, t + 1] != -100
    ]
    assert len(terms) == int((batch["labels"] != -100).sum())
    expected = torch.stack(terms).mean()
    expected_grads = gradients(expected)
    loss = answer_loss(backbone, batch)
    assert torch.allclose(loss, expected, atol=1e-5)
    grads = gradients(loss)
    assert all(g is not None for name, g in grads.items() if "vision_tower" not in name)
    for name, grad in grads.items():
        if grad is None:
            assert expected_grads[name] is None, name
        else:
            assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name


def test_shared_prefix_stops_at_the_first_difference_or_image():
    ids = torch.tensor([[1, 2, 3, 9, 4, 5], [1, 2, 3, 9, 6, 7]])
    assert shared_prefix_length(ids, image_token_id=9) == 3
    assert shared_prefix_length(ids, image_token_id=99) == 4
    assert shared_prefix_length(ids[:1], image_token_id=99) == 5  # one row: all but its last token
    assert shared_prefix_length(torch.tensor([[9, 1], [9, 2]]), image_token_id=9) == 0


def test_supervised_finetune_trains_every_part_and_overfits(world_model):
    backbone = get_backbone("llava").load(str(world_model))
    data = examples(4)
    initial = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    start = answer_loss(backbone, collate(backbone, data)).item()
    settings = FinetuneSettings(steps=40, batch_size=len(data), learning_rate=3e-3, warmup_steps=5)
    losses = supervised_finetune(backbone, iter(data * settings.steps), settings, progress=False)
    assert len(losses) == 40 and losses[0] == pytest.approx(start, rel=1e-5)
    assert answer_loss(backbone, collate(backbone, data)).item() < 0.3 * start
    for part, module in backbone.parts().items():
        prefix = next(name for name, m in backbone.named_modules() if m is module)
        changed = [n for n, p in module.named_parameters() if not torch.equal(p, initial[f"{prefix}.{n}"])]
        assert changed, part
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
    with pytest.raises(ValueError, match="ran out after 1 of 40 steps"):
        supervised_finetune(backbone, iter(data * 1), settings, progress=False)


def test_learning_rate_schedule():
    s = FinetuneSettings(steps=110, warmup_steps=10, final_lr_ratio=0.1)
    assert [lr_factor(i, s) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(60, s) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_factor(110, s) == pytest.approx(0.1) and lr_factor(500, s) == pytest.approx(0.1)


def test_backbone_key_follows_world_pretraining_and_version(monkeypatch):
    import mllm_pib.demo.config as config_module

    base = DemoConfig.quick()
    assert base.backbone_key() == DemoConfig.quick().backbone_key()
    changed = [
        base.model_copy(update={"world_seed": 1}),
        base.model_copy(update={"world": W.WorldConfig(partner_rate=0.7)}),
        base.model_copy(update={"pretrain": PretrainConfig(scenes=65, finetune=base.pretrain.finetune)}),
    ]
    assert len({base.backbone_key(), *(c.backbone_key() for c in changed)}) == 4
    # the PIB's training and the evaluation do not touch the base model
    assert base.model_copy(update={"preference": DemoConfig().preference}).backbone_key() == base.backbone_key()
    key = base.backbone_key()
    monkeypatch.setattr(config_module, "__version__", "0.0.0-other")
    assert base.backbone_key() != key


def test_an_incomplete_cached_model_is_rebuilt(tmp_path):
    config = DemoConfig.quick()
    folder = tmp_path / "demo" / config.backbone_key()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{half written")
    model = pretrained_base_model(config, tmp_path, progress=False)
    assert (model.path, model.cached) == (folder, False)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert len(model.record["losses"]) == config.pretrain.finetune.steps
    assert [p.name for p in tmp_path.joinpath("demo").iterdir()] == [folder.name]
    assert pretrained_base_model(config, tmp_path, progress=False).cached


def test_rejected_descriptions_swap_one_real_object_for_a_hallucinated_one():
    scenes = W.World(5).sample(400)
    for record, scene in zip(W.hadpo_desc_records(scenes, seed=0), scenes):
        (chosen,) = record["chosen"]
        for rejected in record["rejected"]:
            named = [w for w in re.findall(r"[a-z]+", rejected) if w in OBJECT_WORDS]
            (extra,) = set(named) - set(scene.words)
            assert len(named) == len(scene.words)  # one object swapped, none added
            if scene.lures:  # the lure follows its head, which is kept
                assert extra in scene.lures and named[named.index(extra) - 1] == W.HEAD_OF[extra]
    assert sum(bool(s.lures) for s in scenes) > 40


def test_seed_data_is_held_out_and_labelled_by_the_world(tmp_path):
    config = DemoConfig.quick()
    data = prepare_seed_data(config, seed=1, out_dir=tmp_path, progress=False)
    world = W.World(config.world_seed, config.world)
    preference_ids = {r["image_id"] for r in json.loads(data.preference.desc_data.read_text())}
    assert preference_ids == set(range(2 * SEED_STRIDE, 2 * SEED_STRIDE + config.preference.scenes))
    eval_ids = set()
    for split in SPLITS:
        questions = jsonl(data.pope_dir / f"coco_pope_{split}.json")
        assert len(questions) == 6 * config.evaluation.pope_images
        for q in questions:
            image_id = int(q["image"].removesuffix(".png"))
            eval_ids.add(image_id)
            (word,) = [w for w in re.findall(r"[a-z]+", q["text"]) if w in OBJECT_WORDS]
            assert (q["label"] == "yes") == (word in world.scene(image_id).words)
            assert (data.eval_image_dir / q["image"]).is_file()
    eval_ids |= set(data.chair_images)
    assert min(eval_ids) >= 2 * SEED_STRIDE + EVAL_OFFSET and not eval_ids & preference_ids
    assert max(eval_ids) < 3 * SEED_STRIDE  # clear of the pretraining scenes and of other seeds
    truth = {r["image_id"]: r["objects"] for r in jsonl(data.chair_annotations)}
    assert truth == {i: list(world.scene(i).words) for i in data.chair_images}
    assert data.chair_synonyms.read_text().split() == [kind.word for kind in W.KINDS]
