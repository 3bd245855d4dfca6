"""The contract kit (``mllm_pib.testing``) reports a broken backbone: backbones that each break one
part of the contract are installed as a plugin distribution, the kit runs against them in a
separate pytest, and exactly the checks of the broken part fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

from mllm_pib.plugins import DISABLE_ENV

# Each backbone is the tiny llava one with one fault; the kit must catch it.
PLUGIN = '''
import torch

from mllm_pib import BackboneSpec, hookimpl
from mllm_pib.plugins import get_backbone


def llava_class():
    from mllm_pib_llava.backbone import LlavaBackbone

    return LlavaBackbone


def answer_without_end(cls):
    class Broken(cls):
        def answer_ids(self, answer):
            return super().answer_ids(answer)[:-1]  # the end-of-turn token is not scored

    return Broken


def cache_without_positions(cls):
    class Broken(cls):
        def lm_forward(self, hidden, vision_feats, attention_mask, cache=None, **kwargs):
            if cache is not None and cache.get_seq_length() > 0:  # decoding steps lose their position
                kwargs["position_ids"] = torch.zeros(hidden.shape[:2], dtype=torch.long)
            return super().lm_forward(hidden, vision_feats, attention_mask, cache, **kwargs)

    return Broken


def saves_other_weights(cls):
    class Broken(cls):
        def save_pretrained(self, path):
            weight = self.lm_head.weight
            kept = weight.detach().clone()
            with torch.no_grad():
                weight.add_(1.0)
                try:
                    super().save_pretrained(path)
                finally:
                    weight.copy_(kept)

    return Broken


def spec(name, fault, feature=True):
    def load(model_path, **options):
        backbone = get_backbone("llava").spec.load(model_path, **options)
        backbone.__class__ = type(name, (fault(llava_class()),), {"name": name})
        return backbone

    def write_tiny(out_dir, seed=0, **options):
        get_backbone("llava").spec.write_tiny(out_dir, seed=seed, **options)

    options = {"feature": "clip | projector"} if feature else {}
    return BackboneSpec(name=name, description=f"llava, {fault.__name__}", load=load, options=options,
                        write_tiny=write_tiny)


@hookimpl
def mllm_pib_register_backbones():
    return [
        spec("kitbroken-ids", answer_without_end),
        spec("kitbroken-cache", cache_without_positions),
        spec("kitbroken-save", saves_other_weights),
        spec("kitbroken-nofeature", lambda cls: cls, feature=False),
    ]
'''

TESTS = '''
from mllm_pib.testing import BackboneContractTests


class TestIds(BackboneContractTests):
    backbone_name = "kitbroken-ids"


class TestCache(BackboneContractTests):
    backbone_name = "kitbroken-cache"


class TestSave(BackboneContractTests):
    backbone_name = "kitbroken-save"


class TestNoFeature(BackboneContractTests):
    backbone_name = "kitbroken-nofeature"
'''

# the checks run per broken backbone (a passing control check included) and those that must fail
RUN = {
    "TestIds": ["test_token_ids", "test_vision_features"],
    "TestCache": ["test_cached_generation_equals_uncached[1-cross_attention]"],
    "TestSave": ["test_save_pretrained_round_trip", "test_pib_checkpoint_reloads_and_exports",
                 "test_identity_stable_across_reload"],
    "TestNoFeature": ["test_registration", "test_pib_checkpoint_reloads_and_exports", "test_token_ids"],
}
FAILING = {
    "TestIds": {"test_token_ids"},
    # the tokens of a tiny random model may survive the wrong positions; the step logits do not
    "TestCache": {"test_cached_generation_equals_uncached[1-cross_attention]"},
    "TestSave": {"test_save_pretrained_round_trip", "test_pib_checkpoint_reloads_and_exports"},
    "TestNoFeature": {"test_registration", "test_pib_checkpoint_reloads_and_exports"},
}


def keywords(test_id: str) -> str:
    """A ``-k`` expression for one test id: ``name[1-cross_attention]`` -> ``name and 1-cross_attention``."""
    name, _, params = test_id.rstrip("]").partition("[")
    return f"{name} and {params}" if params else name


def install(site: Path) -> None:
    """The broken backbones as an installed distribution (module + dist-info with its entry point)."""
    (site / "kitbroken.py").write_text(dedent(PLUGIN))
    info = site / "kitbroken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kitbroken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mllm_pib]\nkitbroken = kitbroken\n")


def test_kit_reports_each_broken_part(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(site)
    (tmp_path / "test_broken_contract.py").write_text(dedent(TESTS))
    selection = " or ".join(f"({cls} and {keywords(test)})" for cls, tests in RUN.items() for test in tests)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           DISABLE_ENV: ""}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", selection,
         "test_broken_contract.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    outcomes: dict[str, dict[str, set[str]]] = {"PASSED": {}, "FAILED": {}}
    for outcome, cls, test in re.findall(r"^(PASSED|FAILED) test_broken_contract\.py::(\w+)::(\S+)", result.stdout, re.M):
        outcomes[outcome].setdefault(cls, set()).add(test)
    assert outcomes["FAILED"] == FAILING, result.stdout[-4000:]
    passing = {cls: set(tests) - FAILING[cls] for cls, tests in RUN.items()}
    assert outcomes["PASSED"] == {cls: tests for cls, tests in passing.items() if tests}, result.stdout[-4000:]
