"""Shared prefix: one decoder pass over image + prompt per pair, both answers continued from its
KV cache, equals separate full forwards (fp32, tolerance 1e-4 on log-probs) for every backbone."""

import pytest
import torch

from conftest import tiny_backbones
from mllm_pib.data.dataset import PreferenceCollator, PreferenceDataset
from mllm_pib.data.images import ImageResolver
from mllm_pib.data.records import BadRecordBudget, read_pope_data, read_desc_data
from mllm_pib.demo.world import World, export_dataset
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-world")
    return export_dataset(World(2).sample(6), root, seed=2)


def pair_batch(backbone, paths):
    budget = BadRecordBudget(0)
    images = ImageResolver(paths.vg_root)
    pairs = list(read_desc_data(paths.desc_data, images, budget))[:2] + list(read_pope_data(paths.pope_data, images, budget))[:2]
    dataset = PreferenceDataset(pairs, backbone, budget, max_length=512)
    return PreferenceCollator(backbone)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention"])
@pytest.mark.parametrize("backbone_name", tiny_backbones())
def test_shared_prefix_equals_full_forwards(backbone_name, interaction, tiny_model_dir, world_data):
    backbone = get_backbone(backbone_name).load(tiny_model_dir(backbone_name))
    model = PIBModel(backbone, pib_config={"interaction": interaction, "num_heads": 4, "intermediate_size": 64})
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.8)
    batch = pair_batch(backbone, world_data)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1  # prompts of different lengths: padding exercised
    with torch.no_grad():
        vision = backbone.encode_vision(**batch["vision_inputs"])
        shared = model.pair_hidden(batch, vision, shared_prefix=True)
        full = model.pair_hidden(batch, vision, shared_prefix=False)
        # hidden states at the scored positions agree
        for row in range(shared.hidden.shape[0]):
            s_pos = (shared.labels[row, 1:] != -100).nonzero().squeeze(1)
            f_pos = (full.labels[row, 1:] != -100).nonzero().squeeze(1)
            assert torch.allclose(shared.hidden[row, s_pos], full.hidden[row, f_pos], atol=1e-4)
        policy = [model.score_answers(r.hidden, r.vision(vision), r.labels, r.text_mask) for r in (shared, full)]
        reference = [model.reference_logps(batch, shared_prefix=flag) for flag in (True, False)]
        for a, b in (policy, reference):
            assert torch.equal(a.counts, b.counts)
            assert torch.allclose(a.logps, b.logps, atol=1e-4)
    if interaction == "cross_attention":
        # only the last prompt position and the answers are kept
        assert shared.hidden.shape[1] == 1 + batch["answer_ids"].shape[1]
