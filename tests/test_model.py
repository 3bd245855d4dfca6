"""PIBModel forward and generation, for every installed backbone (tiny random models)."""

import pytest
import torch
from PIL import Image

from conftest import tiny_backbones
from mllm_pib.checkpoint import load_model
from mllm_pib.model import PIBModel

QUESTIONS = ["Is there a cat in the image?", "Describe this image in detail."]


def images():
    return [Image.new("RGB", (40, 52), (200, 30, 30)), Image.new("RGB", (64, 48), (20, 90, 220))]


def set_gates(model, value=0.7):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(value)
            elif param.dim() > 1:
                param.mul_(8.0)  # a strong block, so a wrong cache would change tokens


@pytest.fixture(params=tiny_backbones())
def model(request, tiny_model_dir):
    return load_model(tiny_model_dir(request.param), backbone=request.param, pib=None)


def reference_greedy(model, image, question, steps):
    """Greedy decoding written out independently: the base model, full recomputation."""
    bb = model.backbone
    ids = torch.tensor([bb.prompt_ids(question)])
    vision = bb.encode_vision(**bb.preprocess([image], [question]))
    image_mask = ids == bb.image_token_id
    out = []
    for _ in range(steps):
        mask = torch.ones_like(ids)
        hidden = bb.lm_forward(bb.embed(ids), vision, mask, image_mask=image_mask).hidden
        token = int(bb.lm_head(hidden)[0, -1].argmax())
        out.append(token)
        if token in bb.stop_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        image_mask = torch.cat([image_mask, torch.tensor([[False]])], 1)
    return out


def strip(row, model):
    stops = model.backbone.stop_token_ids
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return row[:end]


@torch.no_grad()
def test_identity_pib_generation_equals_base_model(model):
    for image, question in zip(images(), QUESTIONS):
        batch = model.prompt_batch([image], [question])
        tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"], max_new_tokens=8)
        assert strip(tokens[0].tolist(), model) == reference_greedy(model, image, question, 8)


@torch.no_grad()
@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention"])
def test_trained_pib_cached_equals_uncached_and_batched_equals_single(model, interaction):
    model = PIBModel(model.backbone, pib_config={"interaction": interaction, "num_heads": 4, "intermediate_size": 64})
    set_gates(model)
    batch = model.prompt_batch(images(), QUESTIONS)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    cached = model.generate(*args, max_new_tokens=8)
    uncached = model.generate(*args, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    base = model.generate(*args, max_new_tokens=8, bypass_pib=True)
    assert not torch.equal(cached, base), "the block should change the tokens"
    for row, (image, question) in enumerate(zip(images(), QUESTIONS)):
        single = model.prompt_batch([image], [question])
        alone = model.generate(single["input_ids"], single["attention_mask"], single["vision_inputs"], max_new_tokens=8)
        assert strip(alone[0].tolist(), model) == strip(cached[row].tolist(), model)


@torch.no_grad()
def test_beam_search_cached_equals_uncached(model):
    set_gates(model)
    batch = model.prompt_batch(images(), QUESTIONS)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    cached = model.generate(*args, max_new_tokens=6, num_beams=3)
    uncached = model.generate(*args, max_new_tokens=6, num_beams=3, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_stop_callback_ends_rows(model):
    batch = model.prompt_batch(images(), QUESTIONS)
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"],
                            max_new_tokens=8, stop=lambda row: len(row) >= 3)
    assert tokens.shape[1] == 3


@torch.no_grad()
def test_score_answers_equals_full_logits(model):
    set_gates(model)
    bb = model.backbone
    prompt, answer = bb.prompt_ids(QUESTIONS[0]), bb.answer_ids("Yes, there is a cat.")
    ids = torch.tensor([prompt + answer])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt):] = torch.tensor(answer)
    inputs = bb.preprocess(images()[:1], QUESTIONS[:1])
    vision = bb.encode_vision(**inputs)
    hidden = model.backbone_hidden(ids, mask, vision)
    from mllm_pib.objectives import sequence_logps

    for policy in (True, False):
        logits = model(ids, mask, inputs, bypass_pib=not policy)
        expected = sequence_logps(logits, labels)
        scores = model.score_answers(hidden, vision, labels, mask, policy=policy)
        assert torch.allclose(scores.logps, expected, atol=1e-4)
        assert int(scores.counts) == len(answer)
