"""Under a launcher, work done once for all processes is done by rank 0 alone: the bootstrap of
a self-contained run (tiny model, synthetic data), the run's JSON files, the POPE report and the
status messages. ``mllm-pib train`` runs in 2 processes (torchrun, gloo); every file each
process moves into place is recorded through Python's audit hook on ``os.replace``."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from test_distributed import REPO, launcher_env

# Loaded at start-up by every process (through PYTHONPATH): appends "<RANK> <destination>" for
# each os.rename/os.replace, the atomic writes' last step.
RECORDER = """
import os, sys
if os.environ.get("WRITE_LOG"):
    _fd = os.open(os.environ["WRITE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _rank = os.environ.get("RANK", "-")
    def _record(event, args):
        if event == "os.rename":
            os.write(_fd, f"{_rank} {os.fsdecode(args[1])}\\n".encode())
    sys.addaudithook(_record)
"""


def self_contained_config(tmp: Path) -> Path:
    questions = tmp / "coco_pope_random.json"  # images of the synthetic world, named by id
    rows = [{"question_id": i, "image": f"{i // 2}.png", "text": f"Is there a {'circle' if i % 2 else 'star'}?",
             "label": "yes" if i % 2 else "no"} for i in range(4)]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "backbone": "llava",
        "model": str(tmp / "model"),
        "bootstrap": {"tiny_model": True, "synthetic_scenes": 6, "data_dir": str(tmp / "data")},
        "data": [{"format": "desc", "path": str(tmp / "data/hadpo/desc_data.json"), "images": str(tmp / "data/VG")}],
        "pib": {"num_heads": 4, "intermediate_size": 32},
        "max_length": 256,
        "pope": {"questions": str(questions), "images": str(tmp / "data/VG/VG_100K"), "batch_size": 2, "max_new_tokens": 3},
        "training": {"output_dir": str(tmp / "run"), "per_device_train_batch_size": 2, "max_steps": 2,
                     "save_steps": 1000, "logging_steps": 1, "seed": 0, "use_cpu": True},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_processes_do_the_shared_work_once(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORDER)
    log = tmp_path / "writes.log"
    env = {**launcher_env(), "PYTHONPATH": str(tmp_path / "site"), "WRITE_LOG": str(log)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mllm_pib.cli", "train", "--config", str(self_contained_config(tmp_path))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    writes = Counter(tuple(line.split(" ", 1)) for line in log.read_text().splitlines())
    run = tmp_path / "run"
    for target in (tmp_path / "model", tmp_path / "data/hadpo/desc_data.json", tmp_path / "data/VG/VG_100K/0.png",
                   run / "log_history.json", run / "train_config.json", run / "model.safetensors",
                   run / "pope" / "pope.json"):
        by = {rank: n for (rank, dest), n in writes.items() if dest == str(target)}
        assert by == {"0": 1}, f"{target}: {by}"
    assert json.loads((run / "pope" / "pope.json").read_text())["random"]

    for message in ("bootstrap: writing a tiny random llava model", "bootstrap: exporting 6 synthetic scenes",
                    "preference pairs;", "saved the PIB checkpoint to"):
        assert result.stderr.count(message) == 1, message
    assert result.stderr.count("pib ") == 1  # the freeze policy's table, once
