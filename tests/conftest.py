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
