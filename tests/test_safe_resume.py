"""Resuming never runs code from a checkpoint: a pickle planted in any state file is refused
(its payload, which would create a file, never runs) with one line naming the file, under plain
``Trainer`` resume and under DeepSpeed (1 CPU process, gloo); a legitimate DeepSpeed resume
still ends with the uninterrupted run's weights, bit for bit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_pib.cli import main
from mllm_pib.torch_files import UnsafePickleError, load_torch_file
from test_distributed import REPO, launcher_env
from test_training import write_config

TESTS = Path(__file__).resolve().parent


class Payload:
    """Unpickled without restriction, this creates the file ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Replace a state file with a valid ``torch.save`` file whose pickle carries the payload."""
    torch.save({"state": Payload(marker)}, path)


def resume_args(config, out, steps) -> list[str]:
    return ["train", "--config", str(config), "--set", f"training.max_steps={steps}", "--set", "training.save_steps=1",
            "--set", "training.lr_scheduler_type=cosine", "--output-dir", str(out)]


def test_a_payload_pickle_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafePickleError) as caught:
        load_torch_file(tmp_path / "evil.pt")
    message = str(caught.value)
    assert not marker.exists()
    assert message.startswith(f"{tmp_path / 'evil.pt'}: refused to unpickle") and "io.open" in message
    assert "\n" not in message
    # the same payload unpickled without restriction does run: the check above can fail
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_the_deepspeed_allow_list_rebuilds_its_classes_and_nothing_more(tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed engines need the `deepspeed` extra")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from mllm_pib.training.safe_resume import deepspeed_state_types

    # the fp16 scaler (dynamic) cannot be trained on CPU: its pickle is made here
    dynamic = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False, dtype=torch.half)
    dynamic.cur_iter = 7
    state = {"loss_scaler": dynamic, "static": LossScaler(scale=4.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"pib.gate": fragment_address(numel=3, start=5)}], "fp32": torch.arange(4.0)}
    torch.save(state, tmp_path / "states.pt")
    with pytest.raises(UnsafePickleError, match="DynamicLossScaler|LossScaler|ZeroStageEnum|fragment_address"):
        load_torch_file(tmp_path / "states.pt")  # torch alone refuses them
    loaded = load_torch_file(tmp_path / "states.pt", allowed=deepspeed_state_types())
    assert type(loaded["loss_scaler"]) is DynamicLossScaler and vars(loaded["loss_scaler"]) == vars(dynamic)
    assert type(loaded["static"]) is LossScaler and loaded["static"].cur_scale == 4.0
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"] == [{"pib.gate": fragment_address(numel=3, start=5)}]
    assert torch.equal(loaded["fp32"], torch.arange(4.0))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, llava, hadpo_dir):
    """A 2-step run with a checkpoint after each step (no DeepSpeed)."""
    tmp = tmp_path_factory.mktemp("plain-resume")
    config = write_config(tmp, "llava", llava, hadpo_dir)
    assert main(resume_args(config, tmp / "run", 2)) == 0
    return config, tmp / "run"


@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_plain_resume_refuses_a_planted_pickle(plain_run, state_file, tmp_path, capsys):
    config, run = plain_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    plant(out / "checkpoint-2" / state_file, tmp_path / "ran")
    assert main([*resume_args(config, out, 3), "--resume"]) == 2
    err = capsys.readouterr().err
    error = err[err.index("error: "):].splitlines()[0]  # a progress bar may share its line
    assert not (tmp_path / "ran").exists()
    assert error.startswith(f"error: {out / 'checkpoint-2' / state_file}: refused to unpickle")
    assert "io.open" in error and error.endswith("start afresh") and "Traceback" not in err
    assert not (out / "checkpoint-3").exists()


# Runs in a fresh process: DeepSpeed joins a process group (of one) that outlives a command.
# Each case copies the uninterrupted run up to its first checkpoint, damages it, and resumes.
DRIVER = """
import json, shutil, sys, torch
from pathlib import Path
from test_safe_resume import plant, resume_args
from mllm_pib.cli import main
config, whole, work, engine = sys.argv[1:5]
whole, work = Path(whole), Path(work)
results = {}
for case in json.loads(sys.argv[5]):
    out = work / case.replace("/", "_").replace("*", "x")
    later = lambda folder, names: [n for n in names if Path(folder) == whole and n in ("checkpoint-2", "checkpoint-3", "model.safetensors")]
    shutil.copytree(whole, out, ignore=later)
    if case == "latest":
        (out / "checkpoint-1" / "latest").write_text("../../elsewhere/global_step1")
    elif case != "none":
        plant(next((out / "checkpoint-1").glob(case)), work / "ran")
    code = main([*resume_args(config, out, 3), "--set", "training.deepspeed=" + engine, "--resume"])
    results[case] = {"code": code, "out": str(out)}
print("RESULTS " + json.dumps(results))
"""


# the classes each engine pickled into its state files, besides torch's (listed from the files)
STORED = {
    "zero2": {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
              "deepspeed.utils.tensor_fragment.fragment_address"},
    "zero3": {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler"},
}
FP16_ONLY = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"  # the dynamic scaler of fp16, not on CPU


@pytest.mark.parametrize("zero", list(STORED))
def test_deepspeed_resume_refuses_planted_pickles_and_resumes_bit_for_bit(zero, llava, hadpo_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed engines need the `deepspeed` extra")
    from mllm_pib.training.safe_resume import deepspeed_state_types

    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    engine = str(REPO / "configs" / "deepspeed" / f"{zero}.json")
    env = {**launcher_env(), "PYTHONPATH": str(TESTS)}
    whole = tmp_path / "whole"
    command = [sys.executable, "-m", "mllm_pib.cli", *resume_args(config, whole, 3), "--set", f"training.deepspeed={engine}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    # the allow-list is exactly what the engines store (plus fp16's scaler)
    states = sorted((whole / "checkpoint-1").glob("global_step1/*_states.pt"))
    assert len(states) == 2
    found = {name for path in states for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)}
    assert found == STORED[zero]
    assert {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_state_types()} == {*STORED["zero2"], *STORED["zero3"], FP16_ONLY}

    cases = ["global_step1/*model_states.pt", "global_step1/*optim_states.pt", "latest", "none"]
    driven = subprocess.run([sys.executable, "-c", DRIVER, str(config), str(whole), str(tmp_path), engine, json.dumps(cases)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert driven.returncode == 0, driven.stderr[-3000:]
    results = json.loads(driven.stdout.split("RESULTS ", 1)[1])
    errors = [line[len("error: "):] for line in driven.stderr.splitlines() if line.startswith("error: ")]
    assert not (tmp_path / "ran").exists()  # no payload ran
    assert [results[case]["code"] for case in cases] == [2, 2, 2, 0]
    model_states, optim_states = (next((Path(results[c]["out"]) / "checkpoint-1").glob(c)) for c in cases[:2])
    assert errors[0].startswith(f"{model_states}: refused to unpickle this DeepSpeed state file: it refers to io.open")
    assert errors[1].startswith(f"{optim_states}: refused to unpickle this DeepSpeed state file: it refers to io.open")
    assert errors[2].startswith(f"{Path(results['latest']['out']) / 'checkpoint-1' / 'latest'}: names '../../elsewhere")
    assert len(errors) == 3 and "Traceback" not in driven.stderr

    resumed, uninterrupted = load_file(Path(results["none"]["out"]) / "model.safetensors"), load_file(whole / "model.safetensors")
    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
