"""MiniGPT-4 token for token: prompt, answer and stop ids and generation against the original's
algorithms (``minigpt4_reference``), with LLaMA-style (SentencePiece, byte fallback) tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import minigpt4_reference as original
from mllm_pib.model import PIBModel
from mllm_pib.tokenizer import train_llama_tokenizer
from mllm_pib_minigpt4.backbone import MiniGPT4Backbone
from mllm_pib_minigpt4.processing import minigpt4_image_processor
from mllm_pib_minigpt4.tiny import tiny_model

VARIANTS = ("v1", "llama2")
QUESTIONS = (
    "Describe this image in detail.",
    "Is there a cat in the image?",
    "What is in the picture?\nAnswer the question using a single word or phrase.",
    "  Is there a   dog next to the bench? ",
)
ANSWERS = ("Yes, there is.", "No", "The image shows a red circle and a blue square.", "There is a dog.\n")
PIB = {"num_heads": 4, "intermediate_size": 64}


def make_backbone(variant: str, legacy: bool, seed: int = 0) -> MiniGPT4Backbone:
    tokenizer = train_llama_tokenizer(legacy=legacy, pad_token=None, extra_special_tokens=["<ImageHere>"])
    model = tiny_model(variant, seed, tokenizer)
    return MiniGPT4Backbone(model, tokenizer, minigpt4_image_processor(model.config.vision_config.image_size))


@pytest.fixture(scope="module")
def backbones():
    return {(variant, legacy): make_backbone(variant, legacy) for variant in VARIANTS for legacy in (False, True)}


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_ids_are_minigpt4_segments(backbones, variant, legacy):
    backbone = backbones[variant, legacy]
    for question in QUESTIONS:
        before, after = original.prompt_segments(backbone.tokenizer, variant, question)
        expected = before + [backbone.image_token_id] * backbone.num_image_tokens + after
        assert backbone.prompt_ids(question) == expected, question
    assert before[0] == backbone.tokenizer.bos_token_id and after[0] != backbone.tokenizer.bos_token_id


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_answer_ids_are_the_training_target(backbones, variant, legacy):
    backbone = backbones[variant, legacy]
    tokenizer = backbone.tokenizer
    for answer in ANSWERS:
        assert backbone.answer_ids(answer) == original.answer_ids(tokenizer, variant, answer), answer
    ids = backbone.answer_ids(ANSWERS[0])
    if variant == "v1":  # "###" glued to "is." is "##" "#", and </s> is not scored
        assert ids[-2:] == tokenizer.convert_tokens_to_ids(["##", "#"])
        assert tokenizer.eos_token_id not in ids
    else:
        assert ids[-1] == tokenizer.eos_token_id


def test_placeholder_typed_in_a_question_is_refused(backbones):
    """The original splits the prompt there too, and stops at its image-count assert."""
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        backbones["v1", False].prompt_ids("Is there a <ImageHere> cat?")


def test_stop_sequences(backbones):
    v1, llama2 = backbones["v1", False], backbones["llama2", False]
    eos = v1.tokenizer.eos_token_id
    assert v1.stop_sequences[0] == [eos]
    for stop in original.vicuna_stops(v1.tokenizer):
        assert stop in v1.stop_sequences
    assert llama2.stop_sequences == [[eos]]


def compare_generation(backbone, variant, num_beams, max_new_tokens=8):
    """The identity-PIB model's tokens and text against ``MiniGPTBase.generate`` (rows cut at
    the first stop: ``</s>``, and for Vicuna the demo's ``###`` stop words)."""
    model = PIBModel(backbone, pib_config=PIB)
    questions = list(QUESTIONS[1:3])
    batch = model.prompt_batch(images(2), questions)
    assert (batch["attention_mask"] == 0).any(), "the prompts must differ in length"
    with torch.no_grad():
        ours = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"],
                              max_new_tokens=max_new_tokens, num_beams=num_beams)
        theirs = original.generate(backbone.model, backbone.tokenizer, variant,
                                   batch["vision_inputs"]["pixel_values"], questions,
                                   max_new_tokens=max_new_tokens, num_beams=num_beams)
    stops = [[backbone.tokenizer.eos_token_id]]
    if variant == "v1":
        stops += original.vicuna_stops(backbone.tokenizer)
    expected = [original.cut_at_stop(row, stops) for row in theirs]
    assert [original.cut_at_stop(row, stops) for row in ours.tolist()] == expected
    texts = [model.decode(row) for row in ours.tolist()]
    assert texts == [original.answer_text(backbone.tokenizer, variant, row) for row in theirs]
    return expected


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_equals_minigpt4_generate(backbones, variant, num_beams):
    rows = compare_generation(backbones[variant, False], variant, num_beams)
    assert all(len(row) > 1 for row in rows)


def swap_head_rows(backbone, a: int, b: int) -> None:
    """The model now predicts ``b`` wherever it predicted ``a`` (and the reverse)."""
    with torch.no_grad():
        weight = backbone.model.language_model.lm_head.weight
        weight[[a, b]] = weight[[b, a]]


def test_vicuna_generation_stops_at_hashes():
    """Both forms of ``###`` end a row of a batch, where the original's generate goes on and its
    answer is cut at ``###``: the head is rewired so that one row says ``▁###`` and the other
    ``##`` ``#`` after a few tokens."""
    backbone = make_backbone("v1", legacy=False, seed=1)
    tokenizer = backbone.tokenizer
    pixels = backbone.preprocess(images(2), list(QUESTIONS[1:3]))["pixel_values"]

    def greedy():
        with torch.no_grad():
            return original.generate(backbone.model, tokenizer, "v1", pixels, list(QUESTIONS[1:3]), max_new_tokens=5)

    spaced, (glued, last) = original.vicuna_stops(tokenizer)
    swap_head_rows(backbone, greedy()[0][2], spaced[0])
    swap_head_rows(backbone, greedy()[1][3], glued)
    swap_head_rows(backbone, greedy()[1][4], last)
    rows = compare_generation(backbone, "v1", num_beams=1)
    assert rows[0][-1:] == spaced and rows[1][-2:] == [glued, last]
    assert len(rows[0]) == 3 and len(rows[1]) == 5
