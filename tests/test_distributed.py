"""Multi-process training on CPU (gloo): ``mllm-pib train`` under ``torchrun`` (DDP, ZeRO-3) and
under the ``deepspeed`` launcher (ZeRO-2), each with 2 processes x 2 pairs against one process
x 4 pairs — the same global batch, so the same trajectory.

Tolerances: per-step losses within 1e-5 and final PIB weights within 1e-4 (absolute) of the
single process after 5 steps at learning rate 2e-2; the engines differ only in the order of
floating-point sums (gradient all-reduce, batch padding), measured at ~1e-6 and ~2e-5.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mllm_pib.checkpoint import load_checkpoint
from mllm_pib.cli import main
from mllm_pib.plugins import get_backbone
from test_training import write_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
RUN = ["--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=1000", "--set", "training.logging_steps=1"]


def launcher_env() -> dict[str, str]:
    # DeepSpeed compiles its CPU communication op on first use (30-50 s): keep it with the venv
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, train_args: list[str]) -> None:
    """``mllm-pib train`` in 2 processes started by ``launcher`` (torchrun or deepspeed)."""
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "mllm_pib.cli"]
    else:  # --no_local_rank: ranks come from the environment, as with torchrun
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                   "--master_port", str(free_port()), "--no_local_rank", "--module", "mllm_pib.cli"]
    result = subprocess.run([*command, "train", *train_args], cwd=REPO, env=launcher_env(),
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llava, hadpo_dir):
    """One process, 4 pairs per step; returns (config path, output dir, model dir)."""
    tmp = tmp_path_factory.mktemp("distributed")
    config = write_config(tmp, "llava", llava, hadpo_dir)
    assert main(["train", "--config", str(config), *RUN, "--output-dir", str(tmp / "single")]) == 0
    return config, tmp / "single", llava


ENGINES = {
    "ddp-torchrun": ("torchrun", None),
    "zero2-deepspeed": ("deepspeed", "zero2.json"),
    "zero3-torchrun": ("torchrun", "zero3.json"),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_follow_the_single_process_trajectory(engine, reference, tmp_path):
    launcher, ds_config = ENGINES[engine]
    if ds_config:
        pytest.importorskip("deepspeed", reason="the DeepSpeed engines need the `deepspeed` extra")
    config, single, model_dir = reference
    args = ["--config", str(config), *RUN, "--set", "training.per_device_train_batch_size=2",
            "--output-dir", str(tmp_path / engine)]
    if ds_config:
        args += ["--set", f"training.deepspeed={REPO / 'configs/deepspeed' / ds_config}"]
    launch(launcher, args)

    out = tmp_path / engine
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)
    assert len(losses(out)) == STEPS
    ours, theirs = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name  # complete tensors, also when ZeRO-3 sharded them
        torch.testing.assert_close(ours[name], tensor, atol=1e-4, rtol=0, msg=name)
    moved = [name for name, tensor in theirs.items() if "gate" in name and tensor.abs().max() > 0]
    assert moved  # the run trained: the gates left their zero initialisation

    # the checkpoint loads into one process and gives the single-process model's logits
    one = load_checkpoint(out, get_backbone("llava").load(model_dir))
    reference_model = load_checkpoint(single, get_backbone("llava").load(model_dir))
    ids = torch.tensor([one.backbone.prompt_ids("Is there a star?") + one.backbone.answer_ids("No.")])
    pixels = one.backbone.preprocess([Image.new("RGB", (40, 30), (200, 30, 10))])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(one(ids, mask, pixels), reference_model(ids, mask, pixels), atol=1e-4, rtol=0)


def test_zero3_refuses_policies_that_train_upstream_parts(reference, tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed engines need the `deepspeed` extra")
    config = reference[0]
    command = [sys.executable, "-m", "mllm_pib.cli", "train", "--config", str(config), "--set", "freeze=stage2", *RUN,
               "--set", f"training.deepspeed={REPO / 'configs/deepspeed/zero3.json'}", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 2
    error = result.stderr[result.stderr.index("error: "):]
    assert "ZeRO-3" in error and "lm_head" in error and "zero2.json" in error
    assert "Traceback" not in result.stderr and len(error.strip().splitlines()) == 1
