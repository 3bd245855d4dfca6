"""The frozen-feature cache and the sweep built on it."""

import json

import pytest
import yaml

from mllm_pib.cli import main
from mllm_pib.config import load_config
from mllm_pib.errors import UserError
from mllm_pib.training.feature_cache import build_cache
from mllm_pib.training.run import train
from test_training import write_config


def losses(out):
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture
def config_path(tmp_path, tiny_model_dir, hadpo_dir):
    return write_config(tmp_path, "llava", tiny_model_dir("llava"), hadpo_dir)


@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention"])
def test_training_from_the_cache_follows_the_same_losses(config_path, tmp_path, interaction):
    sets = [f"pib.interaction={interaction}", "training.max_steps=6"]
    plain = train(load_config(config_path, sets), output_dir=str(tmp_path / "plain"))
    build_cache(load_config(config_path, sets), tmp_path / "cache", dtype="float32", batch_size=3, shard_size=5)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == -(-manifest["pairs"] // 5) and manifest["positions"] == (
        "answers" if interaction == "cross_attention" else "all")
    cached = train(load_config(config_path, [*sets, f"feature_cache={tmp_path / 'cache'}"]), output_dir=str(tmp_path / "cached"))
    assert losses(plain) == pytest.approx(losses(cached), abs=1e-4)
    assert len(losses(plain)) == 6


def test_half_precision_cache_stays_close(config_path, tmp_path):
    sets = ["training.max_steps=4"]
    plain = train(load_config(config_path, sets), output_dir=str(tmp_path / "plain"))
    build_cache(load_config(config_path, sets), tmp_path / "cache16", dtype="float16")
    cached = train(load_config(config_path, [*sets, f"feature_cache={tmp_path / 'cache16'}"]), output_dir=str(tmp_path / "c16"))
    assert losses(plain) == pytest.approx(losses(cached), abs=1e-2)


def test_stale_or_mismatched_caches_are_refused(config_path, tmp_path, hadpo_dir, tiny_model_dir):
    build_cache(load_config(config_path), tmp_path / "cache", dtype="float32")
    with pytest.raises(UserError, match="base_model"):
        train(load_config(config_path, [f"feature_cache={tmp_path / 'cache'}", "backbone_options.feature=projector"]))
    with pytest.raises(UserError, match="positions"):
        train(load_config(config_path, [f"feature_cache={tmp_path / 'cache'}", "pib.interaction=self_attention"]))
    lora = "freeze={parts: {pib: train, llm: lora}}"
    with pytest.raises(UserError, match="trains parts before the PIB"):
        train(load_config(config_path, [f"feature_cache={tmp_path / 'cache'}", lora]))
    with pytest.raises(UserError, match="not a feature cache"):
        train(load_config(config_path, [f"feature_cache={tmp_path}"]))
    # the data changed after the cache was built
    data = hadpo_dir / "hadpo" / "pope_data.json"
    records = json.loads(data.read_text())
    copy = tmp_path / "pope_data.json"
    copy.write_text(json.dumps(records[:-1]))
    raw = yaml.safe_load(config_path.read_text())
    raw["data"][1]["path"] = str(copy)
    config_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="data"):
        train(load_config(config_path, [f"feature_cache={tmp_path / 'cache'}"]))


def test_cache_command_and_sweep_from_one_cache(config_path, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--config", str(config_path), "--grid", "learning_rate=1e-3,2e-2", "--grid", "loss.beta=0.5",
                 "--set", "training.max_steps=3", "--out", str(out), "--parallel", "2", "--json"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in results] == ["learning_rate=0.001_beta=0.5", "learning_rate=0.02_beta=0.5"]
    assert all(r["returncode"] == 0 for r in results)
    assert (out / "feature-cache" / "manifest.json").is_file()
    for r in results:
        config = json.loads((out / r["run"] / "train_config.json").read_text())
        assert config["feature_cache"] == str(out / "feature-cache")
        assert config["training"]["learning_rate"] == r["training.learning_rate"]
        assert r["loss"] == losses(out / r["run"])[-1]
    assert results[0]["loss"] != results[1]["loss"]
    assert "| run |" in (out / "results.md").read_text()
    assert main(["cache", "--config", str(config_path), "--out", str(tmp_path / "c"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["dtype"] == "bfloat16"


def test_cache_of_images_with_different_token_counts_follows_the_same_losses(tmp_path, tiny_model_dir, hadpo_dir):
    """llava_onevision: every image gives its own number of tile features (padded per batch,
    masked); the cache stores each image's valid ones and re-pads per cached batch."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(hadpo_dir, data)
    sizes = [(48, 48), (90, 20), (30, 70)]  # different tile grids, so different token counts
    for i, path in enumerate(sorted((data / "VG").rglob("*.png"))):
        Image.open(path).resize(sizes[i % 3]).save(path)
    config_path = write_config(tmp_path, "llava_onevision", tiny_model_dir("llava_onevision"), data)
    sets = ["training.max_steps=3"]
    plain = train(load_config(config_path, sets), output_dir=str(tmp_path / "plain"))
    build_cache(load_config(config_path, sets), tmp_path / "cache", dtype="float32", batch_size=3)
    cached = train(load_config(config_path, [*sets, f"feature_cache={tmp_path / 'cache'}"]), output_dir=str(tmp_path / "cached"))
    assert losses(plain) == pytest.approx(losses(cached), abs=1e-4)
    assert len(losses(plain)) == 3
