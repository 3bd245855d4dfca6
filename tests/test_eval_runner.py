"""Model-driven POPE: batched generation, resume after a crash, torchrun sharding."""

import json
import os
import subprocess
import sys

import pytest

from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.demo.world import World, export_dataset
from mllm_pib.evaluation import pope
from mllm_pib.evaluation.runner import EvalItem, GenerationSettings, generate_answers


@pytest.fixture(scope="module")
def pope_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope-world")
    paths = export_dataset(World(5).sample(8, start=500), root, seed=5)
    splits = pope.build_splits(pope.load_object_images(paths.objects), num_images=2, seed=1)
    pope.write_splits(splits, root / "pope")
    return root, paths.image_dir


def items(root, image_dir, split="random"):
    questions = pope.load_questions(root / "pope" / f"coco_pope_{split}.json")
    return [EvalItem(q.question_id, image_dir / q.image, q.text) for q in questions]


SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=3, stop_at_sentence_end=True)


def test_batched_answers_equal_one_at_a_time(pope_world, tiny_model_dir, tmp_path):
    root, image_dir = pope_world
    model = load_model(tiny_model_dir("llava"), backbone="llava")
    todo = items(root, image_dir)
    batched = generate_answers(model, todo, tmp_path / "a.jsonl", SETTINGS)
    single = generate_answers(model, todo, tmp_path / "b.jsonl", GenerationSettings(max_new_tokens=4, batch_size=1, stop_at_sentence_end=True))
    assert batched == single and len(batched) == len(todo)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == sorted(i.item_id for i in todo)


def test_resume_skips_answered_and_drops_a_torn_line(pope_world, tiny_model_dir, tmp_path):
    root, image_dir = pope_world
    model = load_model(tiny_model_dir("llava"), backbone="llava")
    todo = items(root, image_dir)
    reference = generate_answers(model, todo, tmp_path / "ref.jsonl", SETTINGS)
    # a crashed run: two answers written (one deliberately different), the third cut mid-line
    part = tmp_path / "answers.part0.jsonl"
    first, second, third = todo[:3]
    part.write_text(
        json.dumps({"question_id": first.item_id, "prompt": first.prompt, "text": "Kept from before."}) + "\n"
        + json.dumps({"question_id": second.item_id, "prompt": second.prompt, "text": reference[second.item_id]}) + "\n"
        + '{"question_id": %d, "prompt": "torn' % third.item_id
    )
    resumed = generate_answers(model, todo, tmp_path / "answers.jsonl", SETTINGS)
    assert resumed[first.item_id] == "Kept from before."  # not generated again
    assert {k: v for k, v in resumed.items() if k != first.item_id} == {k: v for k, v in reference.items() if k != first.item_id}
    ids = [json.loads(line)["question_id"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(todo)
    assert not part.exists()


def test_cli_eval_pope_scores_by_split(pope_world, tiny_model_dir, tmp_path, capsys):
    root, image_dir = pope_world
    args = ["eval", "pope", "--backbone", "llava", "--model", tiny_model_dir("llava"), "--questions", str(root / "pope"),
            "--images", str(image_dir), "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--json"]
    capsys.readouterr()  # drop what building the tiny model printed
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["random", "popular", "adversarial", "mean_f1", "identity"]
    for split in ("random", "popular", "adversarial"):
        questions = pope.load_questions(root / "pope" / f"coco_pope_{split}.json")
        answers = pope.read_answers(tmp_path / "out" / f"answers_coco_pope_{split}.jsonl")
        expected = pope.score(questions, answers)[split].to_dict()
        assert report[split] == expected and report[split]["total"] == len(questions)


def test_torchrun_two_processes_equal_one(pope_world, tiny_model_dir, tmp_path):
    root, image_dir = pope_world
    common = ["eval", "pope", "--backbone", "llava", "--model", tiny_model_dir("llava"), "--questions",
              str(root / "pope" / "coco_pope_adversarial.json"), "--images", str(image_dir), "--max-new-tokens", "4",
              "--batch-size", "2"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "mllm_pib.cli", *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    name = "answers_coco_pope_adversarial.jsonl"
    assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert json.loads((tmp_path / "two" / "pope.json").read_text()) == json.loads((tmp_path / "one" / "pope.json").read_text())


DELAYED_RANK = """
import os, sys, time

import mllm_pib.evaluation.runner as runner

read = runner._answered


def late(out_file):  # rank 1 looks at the answers files only after rank 0 has started writing
    if os.environ["RANK"] == "1":
        time.sleep(4)
    return read(out_file)


runner._answered = late
from mllm_pib.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_with_a_late_rank_loses_no_item(pope_world, tiny_model_dir, tmp_path):
    """Each rank must answer its share of one pending list: a rank that reads the answers files
    after another has written must not compute another list (items fell between the slices)."""
    root, image_dir = pope_world
    common = ["eval", "pope", "--backbone", "llava", "--model", tiny_model_dir("llava"), "--questions",
              str(root / "pope" / "coco_pope_random.json"), "--images", str(image_dir), "--max-new-tokens", "4",
              "--batch-size", "1"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    (tmp_path / "late.py").write_text(DELAYED_RANK)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "late.py"), *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    name = "answers_coco_pope_random.jsonl"
    assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_cli_eval_shr_describes_with_the_model_then_judges(tmp_path, tiny_model_dir, capsys):
    from PIL import Image
    from test_shr import REGIONS, FakeJudge, shr_inputs

    shr_dir, vg_dir = shr_inputs(tmp_path)
    (vg_dir / "VG_100K").mkdir()
    for i in REGIONS:
        Image.new("RGB", (40 + i, 40), (30 * i, 100, 50)).save(vg_dir / "VG_100K" / f"{i}.jpg")
    judge = FakeJudge()
    try:
        args = ["eval", "shr", "--backbone", "llava", "--model", tiny_model_dir("llava"), "--shr-dir", str(shr_dir),
                "--vg-dir", str(vg_dir), "--out", str(tmp_path / "out"), "--num-beams", "2", "--max-new-tokens", "6",
                "--judge-url", judge.url, "--judge-model", "m", "--json"]
        capsys.readouterr()  # drop what building the tiny model printed
        assert main(args) == 0
        metrics = json.loads(capsys.readouterr().out)
        # the descriptions it wrote feed eval shr judge as they are: the same verdicts
        assert main(["eval", "shr", "judge", "--descriptions", str(tmp_path / "out" / "descriptions.jsonl"),
                     "--shr-dir", str(shr_dir), "--vg-dir", str(vg_dir), "--out", str(tmp_path / "judged"),
                     "--judge-url", judge.url, "--judge-model", "m", "--json"]) == 0
        rejudged = json.loads(capsys.readouterr().out)
    finally:
        judge.close()
    assert metrics["described_images"] == len(REGIONS)
    model = load_model(tiny_model_dir("llava"), backbone="llava")
    images = [Image.open(vg_dir / "VG_100K" / f"{i}.jpg") for i in REGIONS]
    expected = model.generate_text(images, ["Describe this image in detail."] * len(images), max_new_tokens=6, num_beams=2)
    judged = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert [j["description"] for j in judged] == expected
    assert {k: v for k, v in rejudged.items() if k != "identity"} == {k: v for k, v in metrics.items() if k != "identity"}
    assert (tmp_path / "judged" / "judgements.jsonl").read_text() == (tmp_path / "out" / "judgements.jsonl").read_text()


def test_eval_run_report_for_two_models(pope_world, tiny_model_dir, tmp_path):
    import torch
    import yaml

    from mllm_pib.checkpoint import save_checkpoint
    from mllm_pib.demo.world import World
    from mllm_pib.evaluation import chair
    from mllm_pib.freezing import FreezePolicy

    root, image_dir = pope_world
    base = load_model(tiny_model_dir("llava"), backbone="llava")
    with torch.no_grad():
        for name, param in base.pib.named_parameters():
            param.add_(1.0 if name.endswith("_gate") else 0.0)
    save_checkpoint(tmp_path / "pib", base, FreezePolicy.preset("stage1"))
    scenes = World(5).sample(8, start=500)
    (tmp_path / "objects.jsonl").write_text("".join(
        json.dumps({"image_id": s.image_id, "objects": list(s.words)}) + "\n" for s in scenes))
    words = sorted({w for s in World(5).sample(200) for w in s.words})
    (tmp_path / "synonyms.txt").write_text("\n".join(words) + "\n")
    config = {
        "out": str(tmp_path / "eval"),
        "models": [
            {"name": "base", "backbone": "llava", "model": tiny_model_dir("llava")},
            {"name": "pib", "backbone": "llava", "model": tiny_model_dir("llava"), "pib": str(tmp_path / "pib")},
        ],
        "pope": {"questions": str(root / "pope"), "images": str(image_dir), "max_new_tokens": 3},
        "chair": {"annotations": [str(tmp_path / "objects.jsonl")], "images": str(image_dir),
                  "image_pattern": "{image_id}.png", "synonyms": str(tmp_path / "synonyms.txt"), "limit": 4,
                  "max_new_tokens": 6},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", "run", "--config", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["base", "pib"]
    for name in ("base", "pib"):
        result = report["models"][name]
        assert set(result["pope"]) == {"random", "popular", "adversarial", "mean_f1", "identity"}
        described = [json.loads(line) for line in (tmp_path / "eval" / name / "chair" / "descriptions.jsonl").read_text().splitlines()]
        vocab = chair.ChairVocabulary.from_file(tmp_path / "synonyms.txt")
        truth = chair.load_annotations([tmp_path / "objects.jsonl"], vocab).objects
        expected = chair.evaluate([(d["question_id"], d["text"]) for d in described], truth, vocab).to_dict(per_caption=False)
        assert {k: v for k, v in result["chair"].items() if k != "identity"} == expected
        assert result["chair"]["captions"] == 4
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| base |" in markdown and "| pib |" in markdown and "POPE adversarial F1" in markdown
    assert (tmp_path / "eval" / "pope.png").stat().st_size > 1000 and (tmp_path / "eval" / "chair.png").is_file()
