"""Every file one command writes and another reads is read as written: each test runs the
producer (the demo's evaluation, the training bootstrap's data export, ``eval pope build``,
``eval pope --model``) and feeds its output, untouched, to the consumer. And ``eval run`` checks
all its inputs before any model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mllm_pib.cli import main
from mllm_pib.demo.world import World, export_dataset
from mllm_pib.evaluation import pope


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    """The data ``mllm-pib train``'s bootstrap writes (the world's export)."""
    return export_dataset(World(11).sample(12, start=900), tmp_path_factory.mktemp("bootstrap"), seed=11)


def test_demo_outputs_feed_eval_chair_and_eval_pope_score(tmp_path, tiny_model_dir, capsys):
    from mllm_pib.demo.config import DemoConfig, EvalConfig, PreferenceConfig
    from mllm_pib.demo.data import prepare_seed_data
    from mllm_pib.demo.evaluate import evaluate_model

    settings = EvalConfig(pope_images=3, chair_images=3, batch_size=32, max_description_tokens=6)
    config = DemoConfig(preference=PreferenceConfig(scenes=2), evaluation=settings)
    data = prepare_seed_data(config, 0, tmp_path / "data", progress=False)
    result = evaluate_model(tiny_model_dir("llava"), "llava", None, data, settings, tmp_path / "eval")

    code, out, err = run_cli(capsys, "eval", "chair", "--captions", tmp_path / "eval" / "chair" / "descriptions.jsonl",
                             "--annotations", data.chair_annotations, "--synonyms", data.chair_synonyms, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {k: report[k] for k in result["chair"] if k != "identity"} == {k: v for k, v in result["chair"].items()
                                                                       if k != "identity"}
    assert report["captions"] == 3
    for split in pope.SPLITS:
        code, out, err = run_cli(capsys, "eval", "pope", "score", "--json",
                                 "--answers", tmp_path / "eval" / "pope" / f"answers_coco_pope_{split}.jsonl",
                                 "--questions", data.pope_dir / f"coco_pope_{split}.json")
        assert code == 0, err
        assert json.loads(out)[split] == result["pope"][split]


def test_bootstrap_objects_feed_pope_build_then_pope_with_a_model_then_score(bootstrap, tmp_path, tiny_model_dir, capsys):
    code, _, err = run_cli(capsys, "eval", "pope", "build", "--annotations", bootstrap.objects, "--images", 2,
                           "--seed", 3, "--out", tmp_path / "pope")
    assert code == 0, err
    # the whole folder, as the README runs it: the build's own ownership marker is not a question file
    code, out, err = run_cli(capsys, "eval", "pope", "--backbone", "llava", "--model", tiny_model_dir("llava"),
                             "--questions", tmp_path / "pope", "--images", bootstrap.image_dir, "--out", tmp_path / "eval",
                             "--max-new-tokens", 3, "--json")
    assert code == 0, err
    answered = json.loads(out)
    splits = ("random", "popular", "adversarial")
    pairs = [("--questions", tmp_path / "pope" / f"coco_pope_{split}.json",
              "--answers", tmp_path / "eval" / f"answers_coco_pope_{split}.jsonl") for split in splits]
    code, out, err = run_cli(capsys, "eval", "pope", "score", "--json", *[arg for pair in pairs for arg in pair])
    assert code == 0, err
    assert json.loads(out) == {k: v for k, v in answered.items() if k != "identity"}
    assert [answered[split]["total"] for split in splits] == [12, 12, 12]


def test_bootstrap_objects_and_descriptions_feed_eval_chair(bootstrap, tmp_path, tiny_model_dir, capsys):
    from mllm_pib.checkpoint import load_model
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.evaluation.suite import describe_images

    records = [json.loads(line) for line in bootstrap.objects.open()]
    images = {int(Path(r["image"]).stem): bootstrap.image_dir / r["image"] for r in records[:4]}
    model = load_model(tiny_model_dir("llava"), backbone="llava")
    texts = describe_images(model, images, tmp_path / "descriptions.jsonl", settings=GenerationSettings(max_new_tokens=5))
    code, out, err = run_cli(capsys, "eval", "chair", "--captions", tmp_path / "descriptions.jsonl",
                             "--annotations", bootstrap.objects, "--synonyms", bootstrap.synonyms, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(c["image_id"], c["caption"]) for c in report["per_caption"]] == sorted(texts.items())
    truth = {int(Path(r["image"]).stem): sorted(set(r["objects"])) for r in records}
    assert [c["ground_truth"] for c in report["per_caption"]] == [truth[i] for i in sorted(texts)]
    assert report["matcher"] == "builtin"


def eval_run_config(tmp_path: Path, bootstrap, tiny_model: str, chair_annotations: Path | None = None, **more) -> Path:
    """An eval run config with POPE, CHAIR over ``chair_annotations`` (if given) and ``more`` sections."""
    pope_dir = tmp_path / "pope"
    pope.write_splits(pope.build_splits(pope.load_object_images(bootstrap.objects), 2, 3), pope_dir)
    config = {
        "out": str(tmp_path / "eval"),
        "models": [{"name": "base", "backbone": "llava", "model": tiny_model}],
        "pope": {"questions": str(pope_dir), "images": str(bootstrap.image_dir), "max_new_tokens": 3},
        **more,
    }
    if chair_annotations is not None:
        config["chair"] = {"annotations": [str(chair_annotations)], "images": str(bootstrap.image_dir),
                           "synonyms": str(bootstrap.synonyms), "limit": 2, "max_new_tokens": 4}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_eval_run_chair_on_the_bootstrap_objects(bootstrap, tmp_path, tiny_model_dir):
    config = eval_run_config(tmp_path, bootstrap, tiny_model_dir("llava"), bootstrap.objects)
    assert main(["eval", "run", "--config", str(config)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["base"]
    assert report["chair"]["captions"] == 2 and report["chair"]["matcher"] == "builtin"
    first = sorted(int(Path(json.loads(line)["image"]).stem) for line in bootstrap.objects.open())[:2]
    described = (tmp_path / "eval" / "base" / "chair" / "descriptions.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in described] == first


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image_id": "seven", "objects": ["circle"]}, "record 2 'image_id': expected an integer image id"),
        ({"image_id": 7, "objects": ["spaceship"]}, "record 2: object 'spaceship' is not a COCO object"),
        ({"image": "999999.png", "objects": ["circle"]}, "1 images not found"),
        ({"image_id": 5, "objects": ["circle"]}, "image id 5: the annotations name no image file"),
    ],
)
def test_eval_run_refuses_a_bad_chair_input_before_pope_starts(bootstrap, tmp_path, tiny_model_dir, capsys, record, message):
    first = json.loads(bootstrap.objects.read_text().splitlines()[0])
    bad = tmp_path / "chair_objects.jsonl"
    bad.write_text(json.dumps({"image": first["image"], "objects": first["objects"]}) + "\n" + json.dumps(record) + "\n")
    config = eval_run_config(tmp_path, bootstrap, tiny_model_dir("llava"), bad)
    code, _, err = run_cli(capsys, "eval", "run", "--config", config)
    assert code == 2 and message in err
    assert not (tmp_path / "eval").exists()  # no model ran: POPE wrote nothing


def shr_run_config(tmp_path: Path, bootstrap, tiny_model: str, **judge) -> tuple[Path, Path, Path]:
    """An eval run config with POPE and SHR (over a real-looking SHR folder and VG images)."""
    from PIL import Image
    from test_shr import REGIONS, shr_inputs

    shr_dir, vg_dir = shr_inputs(tmp_path)
    (vg_dir / "VG_100K").mkdir()
    for i in REGIONS:
        Image.new("RGB", (8, 8), (30 * i, 100, 50)).save(vg_dir / "VG_100K" / f"{i}.jpg")
    shr = {"shr_dir": str(shr_dir), "vg_dir": str(vg_dir), "max_new_tokens": 4, "num_beams": 1,
           "judge": {"url": "http://127.0.0.1:9/v1", **judge}}
    return eval_run_config(tmp_path, bootstrap, tiny_model, shr=shr), shr_dir, vg_dir


def _drop_regions(shr_dir: Path, vg_dir: Path) -> str:
    (vg_dir / "region_descriptions.json").unlink()
    return f"{vg_dir / 'region_descriptions.json'}: SHR input file not found"


def _drop_an_image(shr_dir: Path, vg_dir: Path) -> str:
    (vg_dir / "VG_100K" / "3.jpg").unlink()
    return f"SHR images in {vg_dir}: 1 images not found, e.g. ['{vg_dir / 'VG_100K' / '3.jpg'}']"


def _no_facts(shr_dir: Path, vg_dir: Path) -> str:
    for path in shr_dir.glob("shr_factual_part*.jsonl"):
        path.unlink()
    return f"{shr_dir}: no shr_factual_part*.jsonl files"


def _image_outside(shr_dir: Path, vg_dir: Path) -> str:
    index = json.loads((vg_dir / "image_data.json").read_text())
    index[1]["url"] = "https://x/VG_100K/../../secret.jpg"
    (vg_dir / "image_data.json").write_text(json.dumps(index))
    return "'../secret.jpg' leads to "


def _no_val_file(shr_dir: Path, vg_dir: Path) -> str:
    (shr_dir / "val_images_final.json").unlink()
    return f"{shr_dir / 'val_images_final.json'}: SHR input file not found"


@pytest.mark.parametrize("breaks", [_drop_regions, _drop_an_image, _no_facts, _image_outside, _no_val_file])
def test_eval_run_refuses_a_bad_shr_input_before_any_model(bootstrap, tmp_path, tiny_model_dir, capsys, breaks):
    config, shr_dir, vg_dir = shr_run_config(tmp_path, bootstrap, tiny_model_dir("llava"))
    message = breaks(shr_dir, vg_dir)
    code, _, err = run_cli(capsys, "eval", "run", "--config", config)
    assert code == 2 and message in err, err
    assert not (tmp_path / "eval").exists()  # no model ran: POPE wrote nothing


@pytest.mark.parametrize("judge, message", [
    ({"api_key_env": "MLLM_PIB_TEST_NO_SUCH_KEY"}, "the judge API key variable MLLM_PIB_TEST_NO_SUCH_KEY is not set"),
    ({}, "judge prompt {missing}: cannot read"),
])
def test_eval_run_refuses_a_bad_judge_setting_before_any_model(bootstrap, tmp_path, tiny_model_dir, capsys, monkeypatch,
                                                                judge, message):
    monkeypatch.delenv("MLLM_PIB_TEST_NO_SUCH_KEY", raising=False)
    config, _, _ = shr_run_config(tmp_path, bootstrap, tiny_model_dir("llava"), **judge)
    missing = tmp_path / "no_prompt.txt"
    extra = [] if judge else ["--set", f"shr.judge_prompt={missing}"]
    code, _, err = run_cli(capsys, "eval", "run", "--config", config, *extra)
    assert code == 2 and message.format(missing=missing) in err, err
    assert not (tmp_path / "eval").exists()
