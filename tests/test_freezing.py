import math

import pytest
import torch

from mllm_pib.config import LossConfig
from mllm_pib.errors import UserError
from mllm_pib.freezing import FreezePolicy
from mllm_pib.model import PIBModel
from mllm_pib.training.preference import PreferenceStep
from toy_backbone import ToyBackbone, toy_batch


def toy_model(**kw):
    return PIBModel(ToyBackbone(**kw), pib_config={"num_heads": 4, "intermediate_size": 32})


def counts(model):
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.parts().items()}


@pytest.mark.parametrize("preset,trained", [("stage1", {"pib"}), ("stage2", {"pib", "lm_head"}), ("projector", {"pib", "projector"})])
def test_presets_set_requires_grad_and_report(preset, trained):
    model = toy_model()
    rows = FreezePolicy.preset(preset).apply(model)
    totals = counts(model)
    for row in rows:
        assert row.total == totals[row.part]
        assert row.trainable == (row.total if row.part in trained else 0)
    for part, module in model.parts().items():
        assert all(p.requires_grad == (part in trained) for p in module.parameters())
    assert "trainable" in str(rows[0])


def test_unknown_part_is_refused_naming_the_parts():
    model = toy_model()
    with pytest.raises(UserError) as err:
        FreezePolicy(parts={"pib": "train", "qformer": "train"}).apply(model)
    assert "qformer" in str(err.value) and "toy" in str(err.value)
    assert all(p in str(err.value) for p in ("vision", "projector", "llm", "lm_head"))
    with pytest.raises(UserError, match="unknown freeze preset"):
        FreezePolicy.preset("stage3")
    with pytest.raises(UserError, match="llm only"):
        FreezePolicy(parts={"projector": "lora"}).apply(model)


def test_stage2_unties_a_shared_head_and_keeps_the_reference():
    model = toy_model(tie=True)
    embeddings = model.backbone.llm.embed_tokens.weight.clone()
    FreezePolicy.preset("stage2").apply(model)
    assert model.backbone.head.weight is not model.backbone.llm.embed_tokens.weight
    step = PreferenceStep(model, LossConfig(beta=0.5))
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = toy_batch(model.backbone)
    for _ in range(3):
        loss, _ = step(batch)
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert torch.equal(model.backbone.llm.embed_tokens.weight, embeddings)
    assert torch.equal(model.ref_lm_head.weight, embeddings)
    assert not torch.equal(model.backbone.head.weight, embeddings)


def test_projector_policy_reference_uses_initial_projector():
    model = toy_model()
    policy = FreezePolicy.preset("projector")
    policy.apply(model)
    step = PreferenceStep(model, LossConfig(beta=0.5))
    batch = toy_batch(model.backbone)
    loss, _ = step(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    before = model.reference_logps(batch).logps
    with torch.no_grad():
        model.backbone.projector.weight.add_(0.3)  # as if trained
    loss, metrics = step(batch)
    # the reference still sees the initial projector, so policy and reference now differ
    assert abs(metrics["rewards/margins"].item()) > 1e-4
    assert torch.equal(model.reference_logps(batch).logps, before)


def test_reference_without_a_copy_of_trained_weights_is_refused():
    model = toy_model()
    FreezePolicy.preset("stage1").apply(model)
    model.backbone.projector.requires_grad_(True)  # trains, but no copy of its initial weights
    with pytest.raises(RuntimeError, match=r"projector.weight.*keep_reference\(\)"):
        model.reference_logps(toy_batch(model.backbone))
    model.keep_reference()
    assert model.reference_logps(toy_batch(model.backbone)).logps.shape == (4,)


def test_policy_flags():
    assert not FreezePolicy.preset("stage2").trains_before_pib
    assert FreezePolicy.preset("projector").trains_before_pib
    assert FreezePolicy(parts={"pib": "train", "llm": "lora"}).uses_lora
