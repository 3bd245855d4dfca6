"""The benchmark scripts' machinery that a CPU can exercise: the GPU command's refusal without a
GPU, its argument handling, time limits and checks, and the turn-taking of the TRL comparison."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu  # noqa: E402
import vs_trl  # noqa: E402


def run_script(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_command_fails_fast_without_a_gpu(tmp_path):
    proc = run_script("gpu.py", "--out", str(tmp_path / "results"))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "CPU-only build" in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""  # one line, no traceback
    assert not (tmp_path / "results").exists()  # nothing written


def test_gpu_command_refuses_unknown_parts():
    proc = run_script("gpu.py", "--parts", "checks,train")
    assert proc.returncode == 2 and "unknown train" in proc.stderr and "dpo_step" in proc.stderr
    assert gpu.parse_args(["--parts", "vs_trl, checks"]).parts == ["vs_trl", "checks"]


def test_gpu_parts_fit_ten_minutes_and_are_stopped_at_their_limit(monkeypatch):
    assert sum(gpu.LIMITS.values()) <= 570
    # a part that outlives its limit, with a child process of its own, is stopped whole
    marker = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    monkeypatch.setattr(gpu, "part_command", lambda part: [sys.executable, "-c", marker])
    start = time.monotonic()
    record = gpu.run_part("dpo_step", limit=2)
    assert "stopped after its limit of 2 s" in record["error"] and time.monotonic() - start < 10
    leftover = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True).stdout.split()
    assert leftover == []


def test_gpu_part_results_are_read_from_the_last_line(monkeypatch):
    monkeypatch.setattr(gpu, "part_command", lambda part: [sys.executable, "-c", "print('progress'); print('{\"speedup\": 3.5}')"])
    assert gpu.run_part("dpo_step", limit=30)["result"] == {"speedup": 3.5}
    monkeypatch.setattr(gpu, "part_command", lambda part: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert gpu.run_part("vs_trl", limit=30)["error"] == "exit status 3"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and steadily on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_checks_pass_on_the_cpu(tmp_path, one_thread):
    """The checks the GPU command runs, on the CPU: they hold for the code as it is."""
    step = gpu.check_training_step(tmp_path, "cpu")
    assert step["passed"], step
    assert step["block_dtype"] == "torch.float32" and step["packed_vs_whole_max_relative_logp_diff"] < 1e-3
    generation = gpu.check_generation(tmp_path, "cpu", "float32")
    assert generation == {"beams_1_identical": True, "beams_3_identical": True, "block_changes_tokens": True,
                          "passed": True}


def test_benchmarks_refuse_a_gpu_they_cannot_use():
    proc = run_script("vs_trl.py", "--device", "cuda:1")
    assert proc.returncode == 2 and "CUDA_VISIBLE_DEVICES" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_script("dpo_step.py", "--device", "cuda")
        assert proc.returncode == 1 and "torch sees no CUDA device" in proc.stderr


def test_relay_runs_one_step_at_a_time_in_rotating_order():
    """Trainers in threads take turns: never two steps at once, the order rotating each round,
    and the last step's turn kept until its trainer has wound up."""
    names = ["a", "b", "c"]
    relay = vs_trl.Relay(names, rounds=3, device="cpu")
    running, log, overlap = set(), [], []

    def trainer(name):
        callback = relay.callback(name)
        callback.on_train_begin(None, None, None)
        state = type("State", (), {"max_steps": 3, "global_step": 0})()
        for _ in range(3):
            running.add(name)
            overlap.append(len(running) > 1)
            log.append(name)
            time.sleep(0.01)
            running.discard(name)
            state.global_step += 1
            callback.on_step_end(None, state, None)
        running.add(name)  # winding up: still holds the turn
        overlap.append(len(running) > 1)
        time.sleep(0.01)
        running.discard(name)
        callback.on_train_end(None, state, None)

    threads = [threading.Thread(target=trainer, args=(name,)) for name in reversed(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert not any(overlap)
    assert all(len(relay.times[name]) == 3 and all(wall >= 0.01 for wall, _ in relay.times[name]) for name in names)


def test_relay_releases_every_trainer_when_one_fails():
    relay = vs_trl.Relay(["a", "b"], rounds=2, device="cpu")
    errors = []

    def waiting():
        try:
            relay.wait("b")
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=waiting)
    thread.start()
    relay.fail(ValueError("trainer a broke"))
    thread.join(timeout=10)
    assert not thread.is_alive() and "another trainer failed" in str(errors[0])


@pytest.mark.parametrize("legacy", [True, False])
def test_whole_prompt_tokenisation_matches_llava_only_with_a_legacy_tokenizer(legacy):
    """`vs_trl.py` writes its model with a legacy Llama tokenizer: TRL's collator runs the whole
    prompt text through the processor, mllm-pib tokenises it in pieces around the image as LLaVA
    does, and only a legacy tokenizer gives both the same ids (else the benchmark refuses to run)."""
    from PIL import Image

    from mllm_pib.backbone import tokenize_around_image
    from mllm_pib_llava.backbone import LLAVA_V1
    from mllm_pib_llava.tiny import IMAGE_TOKEN, tiny_processor

    processor = tiny_processor(["Describe the image. A red circle next to a blue square."], 48, 8, legacy=legacy)
    tokenizer = processor.tokenizer
    text = LLAVA_V1.prompt_text("Describe the image.", IMAGE_TOKEN)
    whole = processor(text=tokenizer.bos_token + text, images=Image.new("RGB", (48, 48)), add_special_tokens=False)
    pieces = tokenize_around_image(tokenizer, text, IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 36)
    assert (whole["input_ids"][0] == pieces) == legacy
    assert abs(len(whole["input_ids"][0]) - len(pieces)) == (0 if legacy else 1)  # the "▁" after the image
