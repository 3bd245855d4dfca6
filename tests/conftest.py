"""Shared fixtures: tiny models of every installed backbone, written once per test session."""

from __future__ import annotations

import pytest

from mllm_pib.plugins import list_backbones


def tiny_backbones() -> list[str]:
    return sorted(b.name for b in list_backbones() if b.spec.write_tiny is not None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of a tiny random model of that backbone."""
    from mllm_pib.plugins import get_backbone

    made: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in made:
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            get_backbone(name).write_tiny(str(out), seed=0)
            made[name] = str(out)
        return made[name]

    return make


def make_pib(model_dir: str, backbone: str, out) -> str:
    """A PIB checkpoint whose gates are open, so that it changes the answers."""
    import torch

    from mllm_pib.checkpoint import load_model, save_checkpoint
    from mllm_pib.freezing import FreezePolicy

    torch.manual_seed(0)
    model = load_model(model_dir, backbone=backbone)
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.5)
    save_checkpoint(out, model, FreezePolicy.preset("stage1"))
    return str(out)


@pytest.fixture(scope="session")
def llava(tiny_model_dir) -> str:
    return tiny_model_dir("llava")


@pytest.fixture(scope="session")
def pib(llava, tmp_path_factory) -> str:
    return make_pib(llava, "llava", tmp_path_factory.mktemp("pib"))


@pytest.fixture(scope="session")
def hadpo_dir(tmp_path_factory):
    """HA-DPO-format data (and VG-style images) of 12 scenes of the synthetic world."""
    from mllm_pib.demo.world import World, export_dataset

    out = tmp_path_factory.mktemp("hadpo")
    export_dataset(World(0).sample(12), out, seed=0)
    return out
