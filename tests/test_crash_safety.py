"""Crash safety of training: kill -9 and resume, half-written checkpoints, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_pib.checkpoint import save_checkpoint
from mllm_pib.cli import main
from mllm_pib.config import load_config
from mllm_pib.freezing import FreezePolicy
from mllm_pib.model import PIBModel
from mllm_pib.outputs import claim
from mllm_pib.training.run import TRAIN_OUTPUT
from mllm_pib.training.trainer import checkpoint_problem, sorted_checkpoints
from test_training import write_config
from toy_backbone import ToyBackbone

REPO = Path(__file__).resolve().parents[1]
# 12 steps, a checkpoint every 3, a schedule that changes every step: resuming must restore the
# weights, the optimizer, the scheduler, the RNG and the position in the data
RUN = ["--set", "training.max_steps=12", "--set", "training.save_steps=3", "--set", "training.lr_scheduler_type=cosine"]


@pytest.fixture(scope="module")
def config(tmp_path_factory, llava, hadpo_dir):
    return write_config(tmp_path_factory.mktemp("crash"), "llava", llava, hadpo_dir)


def cli(config, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mllm_pib.cli", "train", "--config", str(config), *RUN, "--output-dir", str(out), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run


def test_kill_9_then_resume_reaches_the_uninterrupted_weights_bit_for_bit(config, tmp_path):
    subprocess.run(cli(config, tmp_path / "whole"), env=env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    run = subprocess.Popen(cli(config, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while checkpoint_problem(out / "checkpoint-6") is not None:  # the second checkpoint is complete
        assert run.poll() is None, "the run ended before it could be killed; make it longer"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-12").exists()

    # as if the kill had landed while checkpoint-6 was being written: its trainer state is cut short
    state = out / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:200])
    resumed = subprocess.run(cli(config, out, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing from {out / 'checkpoint-3'}" in resumed.stderr
    assert f"{out / 'checkpoint-6'} is incomplete (trainer_state.json is unreadable" in resumed.stderr

    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(whole) == sorted(again)
    for name in whole:
        assert torch.equal(whole[name], again[name]), name
    losses = lambda path: [h["loss"] for h in json.loads((path / "log_history.json").read_text()) if "loss" in h]  # noqa: E731
    assert losses(out)[-9:] == losses(tmp_path / "whole")[-9:]  # steps 4-12, after the resume
    # the newest three (training.save_total_limit's default)
    assert [c.name for c in sorted_checkpoints(out)] == ["checkpoint-6", "checkpoint-9", "checkpoint-12"]


def toy_checkpoint(path: Path, step: int) -> Path:
    model = PIBModel(ToyBackbone(), pib_config={"num_heads": 4, "intermediate_size": 32})
    policy = FreezePolicy.preset("stage1")
    policy.apply(model)
    save_checkpoint(path / f"checkpoint-{step}", model, policy)
    (path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}, indent=2))
    return path / f"checkpoint-{step}"


def cut(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: cut(c / "trainer_state.json"), "trainer_state.json is unreadable"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2}'), "trainer_state.json is for step 2"),
    (lambda c: (c / "pib_checkpoint.json").unlink(), "pib_checkpoint.json is missing"),
    (lambda c: cut(c / "model.safetensors"), "unreadable safetensors file"),
])
def test_a_partial_checkpoint_is_never_taken_for_a_complete_one(tmp_path, damage, reason):
    good = toy_checkpoint(tmp_path, 3)
    assert checkpoint_problem(good) is None
    damaged = toy_checkpoint(tmp_path, 6)
    damage(damaged)
    assert reason in checkpoint_problem(damaged)
    assert sorted_checkpoints(tmp_path) == [good, damaged]  # by step, not by name


def test_resume_without_a_complete_checkpoint_is_a_clear_error(config, tmp_path, capsys):
    claim(tmp_path, TRAIN_OUTPUT).prepare()  # a folder of an earlier run
    toy = toy_checkpoint(tmp_path, 3)
    (toy / "trainer_state.json").unlink()
    assert main(["train", "--config", str(config), *RUN, "--output-dir", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint to resume from" in err and "checkpoint-3: trainer_state.json is missing" in err
    assert "Traceback" not in err


def run_to_failure(config, out, capsys, *sets) -> str:
    """The error paragraph of a CLI training run that must fail."""
    args = ["train", "--config", str(config), "--output-dir", str(out), "--set", "training.save_steps=1",
            "--set", "training.max_steps=6"]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("error: "):].splitlines()[0]  # a progress bar may precede it on its line


def test_non_finite_loss_stops_naming_the_step_and_pairs_and_keeps_the_last_checkpoint(config, tmp_path, capsys):
    # four pairs in a batch of four: the pairs of the failing step are known independently
    data = Path(load_config(config).data[0].path).parents[1]
    lines = (data / "preferences.jsonl").read_text().splitlines()[:4]
    (tmp_path / "four.jsonl").write_text("\n".join(lines) + "\n")
    source = {"format": "generic", "path": str(tmp_path / "four.jsonl"), "images": str(data / "VG" / "VG_100K")}
    error = run_to_failure(config, tmp_path / "out", capsys, "training.learning_rate=1e30",
                           f"data=[{json.dumps(source)}]")
    step = int(error.split("non-finite loss at step ")[1].split()[0])
    named = error.split("on the pairs ")[1].split(". ")[0].split(", ")
    assert sorted(named) == [f"generic:{i}" for i in range(4)]
    last = tmp_path / "out" / f"checkpoint-{step - 1}"
    assert f"The last good checkpoint, {last}, is intact." in error
    assert checkpoint_problem(last) is None and not (tmp_path / "out" / f"checkpoint-{step}").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no final save after the failure
    assert all(bool(torch.isfinite(t).all()) for t in load_file(last / "model.safetensors").values())


def test_non_finite_weights_are_never_saved(config, tmp_path, capsys):
    # Adam moves every weight by about the learning rate: 1e39 overflows float32 at the first step
    error = run_to_failure(config, tmp_path, capsys, "training.learning_rate=1e39")
    assert error.startswith("error: training stopped: the trained weights became non-finite at step 1 (e.g. pib.")
    assert "checkpoint-1 was not written. No checkpoint had been saved yet." in error
    assert sorted_checkpoints(tmp_path) == []

