"""Evaluation folders record what produced them: a rerun continues only the same evaluation,
anything else is refused with the differing fields, --overwrite starts afresh (deleting only what
the evaluation wrote), and a folder no evaluation wrote is never used."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from mllm_pib import __version__
from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.evaluation import pope
from mllm_pib.outputs import MARKER
from test_eval_runner import pope_world  # noqa: F401  (fixture)

ANSWERS = "answers_coco_pope_random.jsonl"


def eval_pope(llava, world, out: Path, *extra: str) -> list[str]:
    root, image_dir = world
    return ["eval", "pope", "--backbone", "llava", "--model", llava, "--questions", str(root / "pope" / "coco_pope_random.json"),
            "--images", str(image_dir), "--out", str(out), "--max-new-tokens", "4", "--json", *extra]


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bars


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_another_models_answers_are_refused_not_scored(llava, pib, pope_world, tmp_path, capsys):
    """The reported bug: the PIB model's evaluation into the base model's folder generated nothing
    and printed the base model's scores."""
    out = tmp_path / "out"
    assert main(eval_pope(llava, pope_world, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(eval_pope(llava, pope_world, out, "--pib", pib)) == 2
    error = last_error(capsys)
    assert error.startswith(f"error: {out}: holds a POPE evaluation of something else (model.pib_fingerprint: identity → ")
    assert "--overwrite" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # --overwrite: the PIB model's own answers, equal to those of a fresh folder
    assert main(eval_pope(llava, pope_world, out, "--pib", pib, "--overwrite")) == 0
    assert main(eval_pope(llava, pope_world, tmp_path / "fresh", "--pib", pib)) == 0
    assert (out / ANSWERS).read_text() == (tmp_path / "fresh" / ANSWERS).read_text()
    assert (out / ANSWERS).read_bytes() != before[ANSWERS]


def test_other_questions_or_settings_are_refused_naming_the_field(llava, pope_world, tmp_path, capsys):
    root, image_dir = pope_world
    out = tmp_path / "out"
    assert main(eval_pope(llava, pope_world, out)) == 0
    capsys.readouterr()
    assert main([*eval_pope(llava, pope_world, out), "--max-new-tokens", "5"]) == 2
    assert "(generation.max_new_tokens: 4 → 5)" in last_error(capsys)
    assert main([*eval_pope(llava, pope_world, out), "--style", "llava"]) == 2
    assert "(generation.style: hadpo → llava)" in last_error(capsys)

    # the same file name with other questions (one label flipped)
    other = tmp_path / "other" / "coco_pope_random.json"
    other.parent.mkdir()
    records = [json.loads(line) for line in (root / "pope" / "coco_pope_random.json").read_text().splitlines()]
    records[0]["label"] = "no" if records[0]["label"] == "yes" else "yes"
    other.write_text("".join(json.dumps(r) + "\n" for r in records))
    command = eval_pope(llava, pope_world, out)
    command[command.index("--questions") + 1] = str(other)
    assert main(command) == 2
    old, new = sha256(root / "pope" / "coco_pope_random.json"), sha256(other)
    assert f"(inputs.questions.coco_pope_random.json: {old} → {new})" in last_error(capsys)


def test_the_same_evaluation_continues(llava, pope_world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(eval_pope(llava, pope_world, out)) == 0
    reference = (out / ANSWERS).read_text().splitlines()
    # an interrupted run: the last answers missing, one kept answer marked
    kept = json.loads(reference[0])
    kept["text"] = "No, kept from the first run."
    (out / ANSWERS).write_text(json.dumps(kept) + "\n" + "\n".join(reference[1:4]) + "\n")
    capsys.readouterr()
    assert main([*eval_pope(llava, pope_world, out), "--batch-size", "3"]) == 0  # batching is not identity
    report = json.loads(capsys.readouterr().out)
    lines = (out / ANSWERS).read_text().splitlines()
    assert json.loads(lines[0])["text"] == "No, kept from the first run." and lines[1:] == reference[1:]
    assert report["random"]["total"] == len(reference)


def test_score_file_and_marker_carry_the_identity(llava, pib, pope_world, tmp_path):
    root, _ = pope_world
    out = tmp_path / "out"
    assert main(eval_pope(llava, pope_world, out, "--pib", pib)) == 0
    scores = json.loads((out / "pope.json").read_text())
    marker = json.loads((out / MARKER).read_text())
    identity = scores["identity"]
    assert marker["identity"] == identity and marker["written_by"] == "mllm-pib eval pope"
    model = load_model(llava, backbone="llava", pib=pib)
    assert identity["model"]["base_fingerprint"] == model.backbone.identity()["fingerprint"]
    assert identity["model"]["base_fingerprint"] == json.loads(Path(pib, "pib_checkpoint.json").read_text())["base_model"]["fingerprint"]
    weights = {k: v for k, v in model.pib.state_dict().items()}
    assert identity["model"]["pib_fingerprint"] not in ("identity", None) and any(v.any() for k, v in weights.items() if k.endswith("gate"))
    assert identity["model"] | {"pib_fingerprint": None, "base_fingerprint": None} == {
        "backbone": "llava", "feature": model.backbone.feature, "dtype": "float32",
        "pib_fingerprint": None, "base_fingerprint": None,
    }
    assert identity["inputs"] == {"questions": {"coco_pope_random.json": sha256(root / "pope" / "coco_pope_random.json")}}
    assert identity["generation"] == {"max_new_tokens": 4, "num_beams": 1, "stop_at_sentence_end": True, "style": "hadpo"}
    assert identity["mllm_pib_version"] == __version__
    questions = pope.load_questions(root / "pope" / "coco_pope_random.json")
    assert scores["random"] == pope.score(questions, pope.read_answers(out / ANSWERS))["random"].to_dict()


def test_a_folder_no_evaluation_wrote_is_refused_and_left_alone(llava, pope_world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = json.dumps({"question_id": 1, "text": "Yes."}) + "\n"
    (out / ANSWERS).write_text(stale)  # answers of an older version or of another tool
    capsys.readouterr()
    for flags in ([], ["--overwrite"]):
        assert main(eval_pope(llava, pope_world, out, *flags)) == 2
        assert "not empty and was not written by `mllm-pib eval pope`" in last_error(capsys)
    assert [p.name for p in out.iterdir()] == [ANSWERS] and (out / ANSWERS).read_text() == stale


def test_overwrite_deletes_only_what_the_evaluation_wrote(llava, pib, pope_world, tmp_path):
    out = tmp_path / "out"
    assert main(eval_pope(llava, pope_world, out)) == 0
    (out / "notes.txt").write_text("mine")
    assert main(eval_pope(llava, pope_world, out, "--pib", pib, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, ANSWERS, "pope.json", "notes.txt"])


def test_judging_given_descriptions_records_the_judge(tmp_path, capsys):
    from test_shr import DESCRIPTIONS, HADPO_PROMPT, FakeJudge, shr_inputs

    from mllm_pib.evaluation import shr

    shr_dir, vg_dir = shr_inputs(tmp_path)
    (tmp_path / "descriptions.json").write_text(json.dumps({"1": DESCRIPTIONS["1"]}))
    judge = FakeJudge()
    try:
        command = ["eval", "shr", "judge", "--descriptions", str(tmp_path / "descriptions.json"), "--shr-dir",
                   str(shr_dir), "--vg-dir", str(vg_dir), "--out", str(tmp_path / "out"), "--judge-url", judge.url,
                   "--judge-model", "m", "--json"]
        assert main(command) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert main(command) == 0  # the same judging again: continued, nothing asked twice
        assert json.loads(capsys.readouterr().out) == metrics and len(judge.requests) == 1
        # every setting that decides the verdicts is part of the identity
        for flags, change in (
            (["--judge-model", "other"], "(judge.model: m → other)"),
            (["--judge-option", "temperature=0"], "(judge.request.temperature: 0.7 → 0.0)"),
            (["--judge-reasks", "0"], "(judge.reasks: 5 → 0)"),
            (["--judge-parser", "lenient"], "(judge.parser: hadpo → lenient)"),
            (["--max-prompt-chars", "0"], "(judge.max_prompt_chars: 15000 → 0)"),
            (["--judge-prompt", str(HADPO_PROMPT)], f"(judge.prompt_sha256: {sha256(shr.BUILTIN_PROMPT)} → "
                                                    f"{sha256(HADPO_PROMPT)})"),
        ):
            assert main([*command, *flags]) == 2
            assert change in last_error(capsys), flags
        # transport settings do not change verdicts: the same judging
        assert main([*command, "--judge-timeout", "30", "--judge-retries", "1", "--judge-concurrency", "2"]) == 0
        assert json.loads(capsys.readouterr().out) == metrics and len(judge.requests) == 1
    finally:
        judge.close()
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == metrics and metrics["identity"]["judge"] == {
        "url": judge.url + "/chat/completions", "model": "m",
        "request": {"temperature": 0.7, "top_p": 1.0, "n": 1, "max_tokens": 800, "stream": False, "stop": ["###"],
                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {"50256": -100}},
        "reasks": 5, "prompt_sha256": sha256(shr.BUILTIN_PROMPT), "parser": "hadpo", "max_prompt_chars": 15000,
    }
    assert metrics["identity"]["inputs"]["descriptions"] == {"descriptions.json": sha256(tmp_path / "descriptions.json")}


def test_judge_reads_the_descriptions_eval_shr_writes(tmp_path, capsys):
    """``eval shr --model`` writes descriptions.jsonl; ``eval shr judge`` takes it as it is and
    judges exactly what a JSON object of the same descriptions gives."""
    from test_shr import DESCRIPTIONS, FakeJudge, shr_inputs

    from mllm_pib.evaluation.pope import AnswerWriter

    shr_dir, vg_dir = shr_inputs(tmp_path)
    texts = {int(k): v for k, v in DESCRIPTIONS.items() if "SLOW" not in v}
    (tmp_path / "descriptions.json").write_text(json.dumps({str(k): v for k, v in texts.items()}))
    with AnswerWriter(tmp_path / "descriptions.jsonl") as writer:  # the writer of eval shr --model
        for image_id, text in texts.items():
            writer.write(image_id, "Describe this image in detail.", text)
    judge = FakeJudge()
    try:
        results = {}
        for name in ("descriptions.json", "descriptions.jsonl"):
            assert main(["eval", "shr", "judge", "--descriptions", str(tmp_path / name), "--shr-dir", str(shr_dir),
                         "--vg-dir", str(vg_dir), "--out", str(tmp_path / f"out-{name}"), "--judge-url", judge.url,
                         "--json"]) == 0
            results[name] = json.loads(capsys.readouterr().out)
    finally:
        judge.close()
    judged = [json.loads(line) for line in (tmp_path / "out-descriptions.jsonl" / "judgements.jsonl").open()]
    assert {r["image_id"]: r["description"] for r in judged} == texts
    strip = lambda m: {k: v for k, v in m.items() if k != "identity"}  # noqa: E731
    assert strip(results["descriptions.json"]) == strip(results["descriptions.jsonl"])
    assert results["descriptions.jsonl"]["described_images"] == len(texts) == 5

    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_id": 1, "prompt": "p", "text": 3}) + "\n")
    assert main(["eval", "shr", "judge", "--descriptions", str(tmp_path / "bad.jsonl"), "--shr-dir", str(shr_dir),
                 "--vg-dir", str(vg_dir), "--out", str(tmp_path / "bad"), "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert last_error(capsys) == f"error: {tmp_path / 'bad.jsonl'} record 1: field 'text': the description must be text, got 3"
    assert not (tmp_path / "bad").exists()


def test_eval_run_refuses_another_model_under_the_same_name(llava, pib, pope_world, tmp_path, capsys):
    root, image_dir = pope_world
    config = {
        "out": str(tmp_path / "eval"),
        "models": [{"name": "m", "backbone": "llava", "model": llava}],
        "pope": {"questions": str(root / "pope" / "coco_pope_random.json"), "images": str(image_dir), "max_new_tokens": 3},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    command = ["eval", "run", "--config", str(tmp_path / "eval.yaml"), "--json"]
    assert main(command) == 0
    first = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert first["models"]["m"]["pope"]["identity"]["model"]["pib_fingerprint"] == "identity"
    config["models"][0]["pib"] = pib
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(command) == 2
    assert f"{tmp_path / 'eval' / 'm' / 'pope'}: holds a POPE evaluation of something else" in last_error(capsys)
    assert main([*command, "--overwrite"]) == 0
    second = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert second["models"]["m"]["pope"]["identity"]["model"]["pib_fingerprint"] not in ("identity", None)


def test_pope_build_refuses_other_splits_in_its_folder(tmp_path, capsys):
    from mllm_pib.demo.world import World, export_dataset

    paths = export_dataset(World(3).sample(8), tmp_path / "world", seed=3)
    command = ["eval", "pope", "build", "--annotations", str(paths.objects), "--images", "3", "--out", str(tmp_path / "splits")]
    assert main(command) == 0
    assert main(command) == 0  # the same build again
    capsys.readouterr()
    assert main([*command, "--seed", "1"]) == 2
    assert "(generation.seed: 0 → 1)" in last_error(capsys)
    assert main([*command, "--sample-num", "2"]) == 2
    assert "(generation.sample_num: 3 → 2)" in last_error(capsys)
    assert main([*command, "--seed", "1", "--overwrite"]) == 0
