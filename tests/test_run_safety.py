"""Training runs a user can trust: nothing trained on an empty data set, Ctrl-C says how to go on,
files readable as the umask allows, a bounded number of checkpoints."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllm_pib.checkpoint import save_checkpoint
from mllm_pib.cli import main
from mllm_pib.config import SAVE_TOTAL_LIMIT
from mllm_pib.freezing import FreezePolicy
from mllm_pib.io import atomic_write_text
from mllm_pib.model import PIBModel
from mllm_pib.training.trainer import checkpoint_problem, sorted_checkpoints
from test_training import write_config
from toy_backbone import ToyBackbone


@pytest.fixture(scope="module")
def data(hadpo_dir) -> dict:
    return {"images": str(hadpo_dir / "VG" / "VG_100K"), "lines": (hadpo_dir / "preferences.jsonl").read_text().splitlines()}


def generic(tmp_path, llava, hadpo_dir, data, lines: list[str], **changes) -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
    source = {"format": "generic", "path": str(tmp_path / "pairs.jsonl"), "images": data["images"]}
    return write_config(tmp_path, "llava", llava, hadpo_dir, data=[source], **changes)


# ---------------------------------------------------------------------------- empty data


def bad_image(line: str) -> str:
    record = json.loads(line)
    return json.dumps({**record, "image": "missing.png"})


@pytest.mark.parametrize("case, expected", [
    ("empty file", "0 pairs read, skipped: none; fix the data"),
    ("every record bad", "4 pairs read, skipped: 4 bad image; fix the data"),
    ("max_length too small", "4 pairs read, skipped: 4 over-long; raise max_length (now 8) or fix the data"),
])
def test_nothing_left_to_train_on_is_one_line_and_leaves_no_folder(case, expected, tmp_path, llava, hadpo_dir, data,
                                                                   capsys):
    lines = {"empty file": [], "every record bad": [bad_image(line) for line in data["lines"][:4]],
             "max_length too small": data["lines"][:4]}[case]
    config = generic(tmp_path, llava, hadpo_dir, data, lines, max_length=8 if "max_length" in case else 512)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "num_samples" not in err
    line = err[err.index("error: "):].strip()
    assert line == f"error: no training pairs left: generic {tmp_path / 'pairs.jsonl'}: {expected}"
    assert not (tmp_path / "out").exists()


def test_records_left_out_by_design_are_named(tmp_path, llava, hadpo_dir, capsys):
    records = json.loads((hadpo_dir / "hadpo" / "pope_data.json").read_text())
    (tmp_path / "pope.json").write_text(json.dumps([{**r, "correct": True} for r in records]))
    source = {"format": "pope", "path": str(tmp_path / "pope.json"), "images": str(hadpo_dir / "VG")}
    config = write_config(tmp_path, "llava", llava, hadpo_dir, data=[source])
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert f"pope {tmp_path / 'pope.json'}: 0 pairs read, skipped: {len(records)} marked correct" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_one_line_with_the_step_checkpoint_and_resume_command(tmp_path, llava, hadpo_dir):
    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--set", "training.max_steps=200", "--set", "training.save_steps=2",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "mllm_pib.cli", *argv], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while checkpoint_problem(out / "checkpoint-2") is not None:
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    printed, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar's last state
    # the trainer prints one loss line per step (logging_steps=1): the step reached, counted independently
    logged = len(re.findall(r"'loss': ", printed))
    checkpoint = [c for c in sorted_checkpoints(out) if checkpoint_problem(c) is None][-1]
    match = re.search(r"interrupted: training stopped at step (\d+) of 200; the last complete checkpoint is (\S+); "
                      r"resume with: (.*)$", last)
    assert match, last
    step = int(match[1])
    assert logged <= step <= logged + 1  # the signal may land between a step and its log line
    assert match[2] == str(checkpoint) and int(checkpoint.name.split("-")[1]) <= step
    assert match[3] == shlex.join(["mllm-pib", *argv, "--resume"])

    # the printed command continues the run (to a nearer end, to stay quick)
    command = shlex.split(match[3])
    end = int(checkpoint.name.split("-")[1]) + 1
    resumed = subprocess.run([sys.executable, "-m", "mllm_pib.cli", *command[1:], "--set", f"training.max_steps={end}"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing from {checkpoint}" in resumed.stderr
    assert [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h][-1] == end


# ---------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    """Set the process umask for a test, then put the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         ids=["umask-022", "umask-002"])
def test_written_files_follow_the_umask(mask, file_mode, dir_mode, umask, tmp_path):
    umask(mask)
    atomic_write_text(tmp_path / "report" / "report.md", "text")
    model = PIBModel(ToyBackbone(), pib_config={"num_heads": 4, "intermediate_size": 32})
    save_checkpoint(tmp_path / "checkpoint", model, FreezePolicy.preset("stage1"))  # safetensors writes 0600
    assert main(["tiny-model", "--backbone", "llava", "--out", str(tmp_path / "tiny")]) == 0  # a staged folder
    for folder in ("report", "checkpoint", "tiny"):
        assert modes(tmp_path / folder) <= {("file", file_mode), ("dir", dir_mode)}, folder
        assert ("file", file_mode) in modes(tmp_path / folder)


def test_a_training_run_is_readable_by_others_and_keeps_the_last_checkpoints(umask, tmp_path, llava, hadpo_dir):
    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--set", "training.max_steps=6", "--set", "training.save_steps=1",
                 "--out", str(out)]) == 0
    assert modes(out) == {("file", 0o644), ("dir", 0o755)}
    # the newest SAVE_TOTAL_LIMIT checkpoints and the final PIB
    assert [c.name for c in sorted_checkpoints(out)] == [f"checkpoint-{s}" for s in range(7 - SAVE_TOTAL_LIMIT, 7)]
    assert all(checkpoint_problem(c) is None for c in sorted_checkpoints(out))
    assert (out / "model.safetensors").is_file() and (out / "pib_checkpoint.json").is_file()


def test_save_total_limit_null_keeps_every_checkpoint(tmp_path, llava, hadpo_dir):
    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    assert main(["train", "--config", str(config), "--set", "training.max_steps=4", "--set", "training.save_steps=1",
                 "--set", "training.save_total_limit=null", "--out", str(tmp_path / "run")]) == 0
    assert len(sorted_checkpoints(tmp_path / "run")) == 4
