"""``--backbone`` may be left out when ``--model`` has a ``config.json`` whose ``model_type`` one
backbone registers (``BackboneSpec.model_types``): commands, training configs and evaluation
configs pick it; no config.json, an unregistered or a doubly claimed model_type is a one-line
error; a named backbone always wins."""

from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent

import pytest
import yaml
from PIL import Image

from mllm_pib.cli import main
from mllm_pib.config import load_config
from mllm_pib.errors import UserError
from mllm_pib.evaluation.report import EvalRunConfig, check_inputs
from mllm_pib.plugins import reset_registry, resolve_backbone

PROMPT = "Is there a cat in the image?"

# a second plugin: one backbone also claiming llava's model type, one claiming none; both load llava
TWIN_PLUGIN = '''
from mllm_pib import BackboneSpec, hookimpl
from mllm_pib.plugins import get_backbone

LOADED = []


def load(model_path, **options):
    LOADED.append(model_path)
    return get_backbone("llava").spec.load(model_path, **options)


@hookimpl
def mllm_pib_register_backbones():
    options = {"feature": "as llava's"}
    return [
        BackboneSpec(name="llava_twin", description="claims llava too", load=load, options=options,
                     model_types=("llava",)),
        BackboneSpec(name="llava_other", description="claims nothing", load=load, options=options),
    ]
'''


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


def generate(model: str, image: str, *extra: str) -> int:
    return main(["generate", "--model", model, "--image", image, "--prompt", PROMPT, "--max-new-tokens", "4",
                 "--json", *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_generate_detects_the_backbone(llava, image_path, capsys):
    assert json.loads((Path(llava) / "config.json").read_text())["model_type"] == "llava"
    assert generate(llava, image_path) == 0
    detected = capsys.readouterr().out
    assert generate(llava, image_path, "--backbone", "llava") == 0
    assert json.loads(detected) == json.loads(capsys.readouterr().out)


def test_no_config_json_asks_for_the_backbone(tmp_path, image_path, capsys):
    assert generate(str(tmp_path), image_path) == 2
    line = error_line(capsys)
    assert f"{tmp_path}: no config.json to detect the backbone from" in line and "--backbone NAME" in line


def test_unregistered_model_type_lists_the_registered_ones(tmp_path, image_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert generate(str(tmp_path), image_path) == 2
    line = error_line(capsys)
    assert f"{tmp_path / 'config.json'}: model_type 'bert' is registered by no backbone" in line
    for registered in ("llava (llava)", "llava_llama (llava)", "instructblip (instructblip)", "minigpt4 (minigpt4)"):
        assert registered in line
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert generate(str(tmp_path), image_path) == 2
    assert "config.json: no model_type" in error_line(capsys)


@pytest.fixture
def twin(tmp_path_factory, monkeypatch):
    """The twin plugin installed (a distribution on the path), with a fresh registry."""
    site = tmp_path_factory.mktemp("site")
    (site / "pibtest_twin.py").write_text(dedent(TWIN_PLUGIN))
    info = site / "pibtest_twin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pibtest-twin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mllm_pib]\npibtest_twin = pibtest_twin\n")
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    import pibtest_twin

    yield pibtest_twin
    reset_registry()


def test_model_type_claimed_twice_asks_to_choose_and_a_named_backbone_wins(twin, llava, image_path, capsys):
    assert generate(llava, image_path) == 2
    line = error_line(capsys)
    assert "model_type 'llava' is claimed by backbones 'llava' (distribution 'mllm-pib-llava'" in line
    assert "and 'llava_twin' (distribution 'pibtest-twin' 1.0" in line and "choose one with --backbone NAME" in line
    # the user's word wins, even over a backbone that claims no model type at all
    assert generate(llava, image_path, "--backbone", "llava_other") == 0
    assert twin.LOADED == [llava]
    assert resolve_backbone(llava, "llava_other") == "llava_other"


def test_train_config_may_leave_out_the_backbone(tmp_path, tiny_model_dir):
    model = tiny_model_dir("instructblip")
    config = {"model": model, "data": [{"format": "desc", "path": "desc.json"}]}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path).backbone == "instructblip"
    path.write_text(yaml.safe_dump({**config, "backbone": "llava"}))
    assert load_config(path).backbone == "llava"  # named: kept, even if the model says otherwise
    path.write_text(yaml.safe_dump({**config, "model": str(tmp_path / "nowhere")}))
    with pytest.raises(UserError, match=rf"^{path}: {tmp_path / 'nowhere'}: no config.json .*backbone: NAME"):
        load_config(path)
    path.write_text(yaml.safe_dump({**config, "model": None}))
    with pytest.raises(UserError, match=rf"^{path}: no model path to detect the backbone from"):
        load_config(path)


def test_eval_config_entries_may_leave_out_the_backbone(tmp_path, llava):
    config = EvalRunConfig(out=str(tmp_path / "out"), models=[{"name": "base", "model": llava}])
    check_inputs(config)  # the entry's backbone comes from the model
    config = EvalRunConfig(out=str(tmp_path / "out"), models=[{"name": "base", "model": str(tmp_path)}])
    with pytest.raises(UserError, match="no config.json to detect the backbone from"):
        check_inputs(config)


def test_backbones_lists_model_types(capsys):
    assert main(["backbones", "--json"]) == 0
    types = {entry["name"]: entry["model_types"] for entry in json.loads(capsys.readouterr().out)["backbones"]}
    assert types["llava"] == ["llava", "llava_llama"] and types["instructblip"] == ["instructblip"]
    assert types["minigpt4"] == ["minigpt4"]
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("llava "))
    assert lines[row + 1] == "    model types: llava, llava_llama"
