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
    if not backbone.packs_pairs:  # (gemma3) each answer row runs whole either way
        assert shared.hidden.shape == full.hidden.shape
    elif interaction == "cross_attention":
        # only the last prompt position and the answers are kept
        assert shared.hidden.shape[1] == 1 + batch["answer_ids"].shape[1]


def test_pair_rows_share_their_image_projection(tiny_model_dir, world_data):
    """A preference step aligns and projects each pair's image once for both answers, with the
    log-probs and gradients of giving each row its own copy of the image (fp32)."""
    from mllm_pib.config import LossConfig
    from mllm_pib.freezing import FreezePolicy
    from mllm_pib.training.preference import PreferenceStep

    backbone = get_backbone("llava").load(tiny_model_dir("llava"))
    torch.manual_seed(0)
    model = PIBModel(backbone, pib_config={"num_heads": 4, "intermediate_size": 64})
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.8)
    policy = FreezePolicy.preset("stage1")
    policy.apply(model)
    batch = pair_batch(backbone, world_data)
    seen = []
    model.pib.align.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    loss, _ = PreferenceStep(model, LossConfig())(batch)
    assert seen == [len(batch["pair_ids"])]  # one image per pair, not one per answer row

    with torch.no_grad():
        vision = backbone.encode_vision(**batch["vision_inputs"])
        rows = model.pair_hidden(batch, vision)
    weights = torch.randn(rows.hidden.shape[0])
    grads = []
    for row_vision in (rows.vision(vision), vision.map(lambda t: t[rows.rows])):  # shared, then per row
        model.zero_grad()
        scores = model.score_answers(rows.hidden, row_vision, rows.labels, rows.text_mask)
        (scores.logps * weights).sum().backward()
        grads.append((scores.logps.detach(), {n: p.grad.clone() for n, p in model.pib.named_parameters()}))
    (shared_logps, shared_grads), (row_logps, row_grads) = grads
    assert torch.allclose(shared_logps, row_logps, atol=1e-4)
    for name, grad in shared_grads.items():
        assert torch.allclose(grad, row_grads[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_pairs_equal_whole_sequences_under_both_attentions(attention, tiny_model_dir, world_data):
    """Both attentions transformers gives a prepared mask to as it is: the packed pass's answer
    rows equal the whole sequences, and an answer never sees the other answer."""
    backbone = get_backbone("llava").load(tiny_model_dir("llava"))
    backbone.model.set_attn_implementation(attention)
    assert backbone.decoder.config._attn_implementation == attention and backbone.packs_pairs
    model = PIBModel(backbone, pib_config={"num_heads": 4, "intermediate_size": 64})
    batch = pair_batch(backbone, world_data)
    with torch.no_grad():
        vision = backbone.encode_vision(**batch["vision_inputs"])
        packed = model.pair_hidden(batch, vision, shared_prefix=True)
        full = model.pair_hidden(batch, vision, shared_prefix=False)
        scored = lambda rows: [rows.hidden[r, (rows.labels[r, 1:] != -100).nonzero().squeeze(1)]  # noqa: E731
                               for r in range(rows.hidden.shape[0])]
        for a, b in zip(scored(packed), scored(full)):
            assert torch.allclose(a, b, atol=1e-4)
        # other chosen answers leave the rejected rows unchanged
        n = len(batch["pair_ids"])
        swapped = dict(batch, answer_ids=batch["answer_ids"].clone())
        swapped["answer_ids"][:n] = torch.where(batch["answer_mask"][:n] == 1, 7, batch["answer_ids"][:n])
        again = model.pair_hidden(swapped, vision, shared_prefix=True)
        assert torch.allclose(again.hidden[n:], packed.hidden[n:], atol=1e-5)
        assert not torch.allclose(again.hidden[:n, 2:], packed.hidden[:n, 2:], atol=1e-3)
