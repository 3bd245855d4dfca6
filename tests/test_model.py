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
    ids = torch.tensor([bb.prompt_ids(question, image)])
    vision = bb.encode_vision(**bb.preprocess([image], [question]))
    image_mask = ids == bb.image_token_id
    out = []
    for _ in range(steps):
        mask = torch.ones_like(ids)
        hidden = bb.lm_forward(bb.embed(ids), vision, mask, image_mask=image_mask).hidden
        token = int(bb.lm_head(hidden)[0, -1].argmax())
        out.append(token)
        if ends_with_stop(out, bb.stop_sequences):
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        image_mask = torch.cat([image_mask, torch.tensor([[False]])], 1)
    return out


def ends_with_stop(tokens, stops):
    return any(len(tokens) >= len(s) and tokens[-len(s):] == s for s in stops)


def strip(row, model):
    end = next((i + 1 for i in range(len(row)) if ends_with_stop(row[: i + 1], model.backbone.stop_sequences)), len(row))
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
    prompt, answer = bb.prompt_ids(QUESTIONS[0], images()[0]), bb.answer_ids("Yes, there is a cat.")
    ids = torch.tensor([prompt + answer])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt):] = torch.tensor(answer)
    inputs = bb.preprocess(images()[:1], QUESTIONS[:1])
    vision = bb.encode_vision(**inputs)
    hidden = model.backbone_hidden(ids, mask, vision)
    from mllm_pib.objectives import sequence_logps

    expected = sequence_logps(model(ids, mask, inputs), labels)
    scores = model.score_answers(hidden, vision, labels, mask)
    assert torch.allclose(scores.logps, expected, atol=1e-4)
    assert int(scores.counts) == len(answer)
    # the reference of a one-pair batch (the answer as chosen and rejected): the base model's
    batch = {"vision_inputs": inputs, "prompt_ids": torch.tensor([prompt]), "prompt_mask": torch.ones(1, len(prompt), dtype=torch.long),
             "answer_ids": torch.tensor([answer, answer]), "answer_mask": torch.ones(2, len(answer), dtype=torch.long), "pair_ids": ["p"]}
    base = sequence_logps(model(ids, mask, inputs, bypass_pib=True), labels)
    assert torch.allclose(model.reference_logps(batch).logps, base.repeat(2), atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)


# ------------------------------------------------------------------ multi-token stop sequences


class FullForward:
    """Next-token log-probs of one image and question after given new tokens, from a full
    forward over the whole sequence (no cache, no decoding loop)."""

    def __init__(self, model, image, question):
        self.model, bb = model, model.backbone
        self.prompt = bb.prompt_ids(question, image)
        self.vision = bb.encode_vision(**bb.preprocess([image], [question]))

    def __call__(self, rows: list[list[int]]) -> torch.Tensor:
        model = self.model
        ids = torch.tensor([self.prompt + row for row in rows])
        mask = torch.ones_like(ids)
        vision = self.vision.repeat_interleave(len(rows))
        hidden = model.pib(model.backbone_hidden(ids, mask, vision), vision.pib, vision.pib_mask, text_mask=mask)
        return torch.log_softmax(model.backbone.lm_head(hidden[:, -1]).float(), -1)


def greedy_until(model, image, question, steps, stops):
    logps, out = FullForward(model, image, question), []
    for _ in range(steps):
        out.append(int(logps([out])[0].argmax()))
        if ends_with_stop(out, stops):
            break
    return out


def beam_until(model, image, question, beams, steps, stops):
    """Beam search written out plainly: candidates ranked by summed log-prob; a candidate that
    ends in a stop (or at the length limit) is finished if it ranks among the first ``beams``,
    scored by log-prob / length; stop once no running beam can beat the worst finished one."""
    logps, running, finished = FullForward(model, image, question), [(0.0, [])], []
    for t in range(steps):
        candidates = []
        for (score, tokens), row in zip(running, logps([tokens for _, tokens in running])):
            top = row.topk(beams * (len(stops) + 2))
            candidates += [(score + float(v), tokens + [int(i)]) for v, i in zip(top.values, top.indices)]
        candidates.sort(key=lambda c: -c[0])
        running = []
        for rank, (score, tokens) in enumerate(candidates):
            if ends_with_stop(tokens, stops) or t + 1 == steps:
                if rank < beams:
                    finished.append((score / (t + 1), tokens))
            else:
                running.append((score, tokens))
            if len(running) == beams:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        if not running or (len(finished) == beams and running[0][0] / (t + 1) <= finished[-1][0]):
            break
    return finished[0][1]


@pytest.fixture
def with_stops(monkeypatch):
    """``with_stops(backbone, sequences)`` makes ``sequences`` the backbone's stop sequences."""
    def patch(backbone, sequences):
        monkeypatch.setattr(type(backbone), "stop_sequences", property(lambda self: sequences))
    return patch


@torch.no_grad()
def test_multi_token_stops_end_greedy_rows(model, with_stops):
    set_gates(model, 0.3)
    pairs = list(zip(images(), QUESTIONS))
    with_stops(model.backbone, [[-1]])
    free = [greedy_until(model, image, question, 6, []) for image, question in pairs]
    stops = [free[0][2:4], free[1][1:4]]  # 2 and 3 tokens from unstopped continuations
    with_stops(model.backbone, stops)
    expected = [greedy_until(model, image, question, 8, stops) for image, question in pairs]
    assert all(ends_with_stop(row, stops) and len(row) < 8 for row in expected)
    batch = model.prompt_batch(images(), QUESTIONS)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    for use_cache in (True, False):
        tokens = model.generate(*args, max_new_tokens=8, use_cache=use_cache).tolist()
        for row, want in zip(tokens, expected):
            assert row[: len(want)] == want
            assert set(row[len(want):]) <= {model.backbone.pad_token_id}
            # the text stops before the stop sequence
            start = len(want) - next(len(s) for s in stops if want[-len(s):] == s)
            assert model.decode(row) == model.backbone.tokenizer.decode(want[:start], skip_special_tokens=True).strip()


@torch.no_grad()
def test_multi_token_stops_end_beams(model, with_stops):
    set_gates(model, 0.3)
    pairs = list(zip(images(), QUESTIONS))
    with_stops(model.backbone, [[-1]])
    free = [beam_until(model, image, question, 3, 6, []) for image, question in pairs]
    stops = [free[0][0:2], free[1][1:3]]  # early, so that a finished beam can win
    with_stops(model.backbone, stops)
    expected = [beam_until(model, image, question, 3, 6, stops) for image, question in pairs]
    assert any(ends_with_stop(row, stops) and len(row) < 6 for row in expected)
    batch = model.prompt_batch(images(), QUESTIONS)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    for use_cache in (True, False):
        tokens = model.generate(*args, max_new_tokens=6, num_beams=3, use_cache=use_cache).tolist()
        for row, want in zip(tokens, expected):
            assert row[: len(want)] == want
            assert set(row[len(want):]) <= {model.backbone.pad_token_id}
