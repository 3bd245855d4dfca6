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


def test_lora_reference_reuses_the_images_and_disables_the_adapters(tiny_model_dir, hadpo_dir):
    """With LoRA on the LLM only, the images are encoded once per step (the adapters cannot change
    them) and the reference is the model without adapters: its answer log-probs equal those of a
    freshly loaded model scoring the whole sequences."""
    from mllm_pib.data.dataset import PreferenceCollator, PreferenceDataset
    from mllm_pib.data.images import ImageResolver
    from mllm_pib.data.records import BadRecordBudget, read_desc_data
    from mllm_pib.freezing import LoraSettings
    from mllm_pib.objectives import IGNORE_INDEX, sequence_logps
    from mllm_pib.plugins import get_backbone

    load = lambda: get_backbone("llava").load(tiny_model_dir("llava"))  # noqa: E731
    model = PIBModel(load(), pib_config={"num_heads": 4, "intermediate_size": 32})
    policy = FreezePolicy(parts={"pib": "train", "llm": "lora"}, lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    policy.apply(model)
    with torch.no_grad():  # as if trained: the adapters now change the policy
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    budget = BadRecordBudget(0)
    pairs = list(read_desc_data(hadpo_dir / "hadpo/desc_data.json", ImageResolver(hadpo_dir / "VG"), budget))[:2]
    dataset = PreferenceDataset(pairs, model.backbone, budget, max_length=512)
    batch = PreferenceCollator(model.backbone)([dataset[i] for i in range(len(dataset))])
    encodings = []
    encode = model.backbone.encode_vision
    model.backbone.encode_vision = lambda **inputs: encodings.append(1) or encode(**inputs)
    beta = 0.5
    _, metrics = PreferenceStep(model, LossConfig(beta=beta))(batch)
    assert len(encodings) == 1
    reference_chosen = metrics["logps/chosen"] - metrics["rewards/chosen"] / beta

    fresh = PIBModel(load(), pib_config={"num_heads": 4, "intermediate_size": 32})
    n = len(batch["pair_ids"])
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"][:n]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["answer_mask"][:n]], 1)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : batch["prompt_ids"].shape[1]] = IGNORE_INDEX
    with torch.no_grad():
        expected = sequence_logps(fresh(ids, mask, batch["vision_inputs"], bypass_pib=True), labels).mean()
        adapted = sequence_logps(model(ids, mask, batch["vision_inputs"]), labels).mean()  # identity block
    assert reference_chosen.item() == pytest.approx(expected.item(), abs=1e-3)
    assert abs(adapted.item() - expected.item()) > 1e-2  # the adapters do change the model
