"""Images with different numbers of visual tokens in one batch (anyres tiles, dynamic
resolution): padded features with validity masks give what each image gives alone."""

import pytest
import torch

from mllm_pib.backbone import VisionFeatures, place_visual_tokens
from mllm_pib.model import PIBModel
from mllm_pib.training.feature_cache import cached_vision, collate_cached
from toy_backbone import ToyBackbone


class VariableToy(ToyBackbone):
    """The toy backbone with ``counts[b]`` valid patches per image, padded with garbage."""

    pad_token_id = 0
    stop_sequences = [[0]]

    def encode_vision(self, pixel_values, counts):
        vision = super().encode_vision(pixel_values)
        valid = torch.arange(pixel_values.shape[1])[None] < counts[:, None]
        garbage = lambda t: t.masked_fill(~valid[..., None], 1e3)  # noqa: E731  (must never be read)
        return VisionFeatures(pib=garbage(vision.pib), llm=garbage(vision.llm), pib_mask=valid, llm_mask=valid,
                              extra={"counts": counts})


def test_place_visual_tokens_fills_each_row_with_its_own_valid_embeddings():
    llm = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    image_mask = torch.tensor([[False, True, True, False, False], [True, True, False, True, False]])
    hidden = torch.zeros(2, 5, 2)
    out = place_visual_tokens(hidden, VisionFeatures(pib=llm, llm=llm, llm_mask=valid), image_mask)
    expected = hidden.clone()
    expected[0, 1], expected[0, 2] = llm[0, 0], llm[0, 1]  # written out: row 0 has 2 valid embeddings
    expected[1, 0], expected[1, 1], expected[1, 3] = llm[1, 0], llm[1, 1], llm[1, 2]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="row 0 of the input holds 3 image placeholder tokens but its image gives 2"):
        place_visual_tokens(hidden, VisionFeatures(pib=llm, llm=llm, llm_mask=valid), image_mask | (torch.arange(5) == 4))


def test_map_carries_masks_and_extra():
    feats = VisionFeatures(pib=torch.randn(2, 3, 4), llm=torch.randn(2, 5, 6), pib_mask=torch.tensor([[1, 0, 0], [1, 1, 1]]).bool(),
                           llm_mask=torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool(), extra={"grid": torch.tensor([[1, 2, 3], [1, 4, 4]])})
    fanned = feats.repeat_interleave(2).map(lambda t: t.index_select(0, torch.tensor([3, 0])))
    assert torch.equal(fanned.llm_mask, feats.llm_mask[[1, 0]]) and torch.equal(fanned.pib_mask, feats.pib_mask[[1, 0]])
    assert torch.equal(fanned.extra["grid"], torch.tensor([[1, 4, 4], [1, 2, 3]]))


def variable_batch(model, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bb = model.backbone
    pairs = len(counts)
    prompts = [[bb.image_token_id] * c + torch.randint(1, 10, (3,), generator=gen).tolist() for c in counts]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    answers = torch.randint(1, 10, (2 * pairs, 4), generator=gen)
    return {
        "vision_inputs": {"pixel_values": torch.randn(pairs, max(counts), 3, generator=gen), "counts": torch.tensor(counts)},
        "prompt_ids": prompt_ids, "prompt_mask": (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long(),
        "answer_ids": answers, "answer_mask": torch.ones_like(answers), "pair_ids": [f"v:{i}" for i in range(pairs)],
    }


def one_pair(batch, i):
    pairs = batch["prompt_ids"].shape[0]
    count = int(batch["vision_inputs"]["counts"][i])
    keep = batch["prompt_mask"][i] == 1
    return {
        "vision_inputs": {"pixel_values": batch["vision_inputs"]["pixel_values"][i : i + 1, :count], "counts": torch.tensor([count])},
        "prompt_ids": batch["prompt_ids"][i : i + 1, keep], "prompt_mask": batch["prompt_mask"][i : i + 1, keep],
        "answer_ids": batch["answer_ids"][[i, pairs + i]], "answer_mask": batch["answer_mask"][[i, pairs + i]], "pair_ids": ["p"],
    }


def make_model(interaction="cross_attention"):
    model = PIBModel(VariableToy(patches=4), pib_config={"num_heads": 2, "interaction": interaction})
    torch.manual_seed(3)
    with torch.no_grad():  # a block far from the identity, so reading a padded token would show
        for param in model.pib.parameters():
            param.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention"])
def test_padded_images_score_as_each_alone(interaction):
    model = make_model(interaction)
    batch = variable_batch(model, [2, 4])
    policy, _ = model.answer_logps(batch, shared_prefix=False)
    for i in range(2):
        alone, _ = model.answer_logps(one_pair(batch, i), shared_prefix=False)
        assert torch.allclose(policy.logps[[i, 2 + i]], alone.logps, atol=1e-5)


def test_padded_images_generate_as_each_alone():
    model = make_model()
    batch = variable_batch(model, [1, 4], seed=1)
    args = dict(max_new_tokens=5, use_cache=False)  # the toy decoder keeps no cache
    for beams in (1, 2):
        both = model.generate(batch["prompt_ids"], batch["prompt_mask"], batch["vision_inputs"], num_beams=beams, **args)
        for i in range(2):
            pair = one_pair(batch, i)
            alone = model.generate(pair["prompt_ids"], pair["prompt_mask"], pair["vision_inputs"], num_beams=beams, **args)
            assert both[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_cached_features_keep_only_valid_tokens_and_pad_per_batch():
    items = [
        {"hidden": torch.zeros(2, 3, 4), "labels": torch.zeros(2, 3, dtype=torch.long), "text_mask": torch.ones(2, 3),
         "vision": torch.full((n, 5), float(n)), "ref_logps": torch.zeros(2), "counts": torch.ones(2), "pair_id": f"p{n}"}
        for n in (2, 3)
    ]
    vision = cached_vision(collate_cached(items))
    assert vision.pib.shape == (2, 3, 5) and vision.pib_mask.tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(vision.pib[0, :2], torch.full((2, 5), 2.0)) and torch.equal(vision.pib[1], torch.full((3, 5), 3.0))
    assert cached_vision(collate_cached(items[:1])).pib_mask is None
