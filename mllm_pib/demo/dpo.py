"""Stage 1 of the recipe on the demo: DPO of the PIB over the frozen base model, through the
same config file and ``train()`` as ``mllm-pib train``.

The config is written next to the run (``train.yaml``), so the step can be repeated by hand
with ``mllm-pib train --config <run>/train.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mllm_pib.demo.config import DemoConfig
from mllm_pib.demo.data import SeedData
from mllm_pib.io import atomic_write_text

MAX_LENGTH = 256  # image tokens + template + the longest description, with room to spare


def train_config(config: DemoConfig, model_path: Path, data: SeedData, seed: int, output_dir: Path) -> dict:
    """The ``mllm-pib train`` config (as a YAML mapping) of one seed."""
    pref = config.preference
    paths = data.preference
    files = {"pope": paths.pope_data, "desc": paths.desc_data}
    return {
        "backbone": config.pretrain.backbone,
        "model": str(model_path),
        "data": [{"format": name, "path": str(files[name]), "images": str(paths.vg_root)} for name in pref.sources],
        "pib": dict(pref.pib),
        "freeze": "stage1",
        "loss": {"type": "sigmoid", "beta": pref.beta},
        "max_length": MAX_LENGTH,
        "training": {
            "output_dir": str(output_dir),
            "per_device_train_batch_size": pref.batch_size,
            "max_steps": pref.steps,
            "learning_rate": pref.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": pref.warmup_steps,
            "logging_steps": pref.logging_steps,
            "save_strategy": "no",
            "seed": seed,
            "data_seed": seed,
            "report_to": "none",
            "use_cpu": True,
        },
    }


def train_pib(config: DemoConfig, model_path: Path, data: SeedData, seed: int, run_dir: str | Path) -> Path:
    """Write ``run_dir/train.yaml`` and train the PIB into ``run_dir/pib``; returns the checkpoint."""
    from mllm_pib.config import load_config
    from mllm_pib.training.run import train

    run_dir = Path(run_dir)
    path = run_dir / "train.yaml"
    mapping = train_config(config, model_path, data, seed, run_dir / "pib")
    atomic_write_text(path, yaml.safe_dump(mapping, sort_keys=False))
    return train(load_config(path))
