"""Model-driven POPE: batched generation, resume after a crash, torchrun sharding."""

import json
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
    splits = pope.build_splits(pope.load_object_images(paths.objects), num_images=2, seed=0)
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
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["random", "popular", "adversarial", "mean_f1"]
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
