"""SHR against HA-DPO's original evaluation code, re-implemented independently below from
``ha_dpo/shr_eval/shr_utils.py`` (``get_model_cap``, ``get_desc``, ``seg_cap``,
``post_process_no_revise``, ``get_metric``), ``gpt_utils.py`` (request settings) and
``models/llava-v1_5/shr_eval.py`` (factual text, the 15,000-character rule, asking again without
``Judgement``): the request body byte for byte with HA-DPO's prompt file, its settings, the
parser on many replies, the metrics; and a full run against a local chat-completions server
(malformed replies, a count mismatch, HTTP 429, a timeout, the reply cache, the API key)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from judge_server import ChatServer, chat_reply

from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.evaluation import shr
from mllm_pib.evaluation.judge import JudgeClient, JudgeConfig, JudgeError
from mllm_pib.evaluation.report import markdown

HADPO_PROMPT = Path(__file__).parent / "data" / "shr" / "hadpo_gpt_judge_prompt.txt"
HADPO_TEMPLATE = HADPO_PROMPT.open(encoding="utf-8", newline="").read()
HADPO_SETTINGS = {  # gpt_utils.py: decoding_args and get_gpt_response's logit_bias, model gpt-4
    "model": "gpt-4",
    "max_tokens": 800,
    "temperature": 0.7,
    "top_p": 1.0,
    "n": 1,
    "stream": False,
    "stop": ["###"],
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {"50256": -100},
}
HADPO_LABELS = ["hallucination", "correct", "cannot judge"]


# ------------------------------------------ HA-DPO's shr_eval, re-implemented for comparison


def hadpo_model_cap(message: str) -> str:
    """get_model_cap: the numbered sentences of the judge prompt."""
    numbered, seen, number = "", [], 1
    for piece in message.split("."):
        sentence = piece.strip()
        if sentence in seen:
            continue
        if len(sentence) > 0 and len([s for s in seen if sentence in s]) > 0:
            continue
        if sentence:
            numbered += str(number) + ". " + sentence + "\n"
            seen.append(sentence)
            number += 1
    return numbered


def hadpo_desc(image: dict, regions: list[dict]) -> str:
    """get_desc: one '[x1, y1, x2, y2]: phrase' line per region with a phrase."""
    text = ""
    for region in regions:
        corners = (
            region["x"] / image["width"],
            region["y"] / image["height"],
            (region["x"] + region["width"]) / image["width"],
            (region["y"] + region["height"]) / image["height"],
        )
        position = [float("%.2f" % corner) for corner in corners]
        if region["phrase"]:
            text += "%s: %s\n" % (position, region["phrase"])
    return text


def hadpo_prompt(image: dict, regions: list[dict], facts: list[str] | None, description: str) -> str:
    factual = "".join(fact + "\n" for fact in facts or [])
    return HADPO_TEMPLATE.format(hadpo_desc(image, regions), factual, hadpo_model_cap(description))


def hadpo_seg_cap(message: str) -> list[str]:
    kept = []
    for piece in message.split("."):
        sentence = piece.strip()
        if sentence in kept or any(sentence in s for s in kept):
            continue
        if sentence:
            kept.append(sentence + ".")
    return kept


def hadpo_post_process(judge: str, response: str) -> list[dict]:
    """post_process_no_revise (IndexError without a 'Judgement:' line, as the original)."""
    segments = hadpo_seg_cap(response)
    lines = list(filter(len, judge.split("\n")))
    start = [i for i, line in enumerate(lines) if "Judgement:" in line][0]
    texts = []
    for line in lines[start + 1 :]:
        words = line.split(" ")
        text = " ".join(words[1:]).strip()
        if text:
            texts.append(text)
    classes = [text.split(":")[0].lower() for text in texts]
    if len(segments) != len(texts):
        return [{"model_response": s, "judgement": None, "classification": None} for s in segments]
    return [{"model_response": s, "judgement": t, "classification": c} for s, t, c in zip(segments, texts, classes)]


def hadpo_get_metric(judgement: dict) -> dict:
    n = len(judgement)
    sents = [j for image in judgement.values() for j in image["judgement"]]
    valid = [j for j in sents if j["classification"] in HADPO_LABELS]
    hal = [j for j in valid if j["classification"] == "hallucination"]

    def words(group):
        return sum(len(j["model_response"].split(" ")) for j in group)

    metrics = {
        "num_images": n,
        "sents_per_image": round(len(sents) / n, 3),
        "words_per_image": round(words(sents) / n, 3),
        "hal_sents_per_image": round(len(hal) / n, 3),
        "hal_words_per_image": round(words(hal) / n, 3),
        "hal_sents_ratio": round(len(hal) / len(valid), 3),
        "hal_words_ratio": round(words(hal) / words(valid), 3),
    }
    metrics["mean_hal_ratio"] = round(metrics["hal_sents_ratio"], 3)
    return metrics


# ---------------------------------------------------------------- inputs on disk


def write_shr_inputs(tmp_path: Path, images: dict[int, tuple[int, int, list[dict]]], facts: dict[int, list[str]]):
    """SHR + VG files in HA-DPO's layout; ``images``: id -> (width, height, regions)."""
    shr_dir, vg_dir = tmp_path / "shr", tmp_path / "VG"
    shr_dir.mkdir(exist_ok=True)
    vg_dir.mkdir(exist_ok=True)
    (shr_dir / "val_images_final.json").write_text(json.dumps([{"image_id": i} for i in images]))
    items = list(facts.items())
    (shr_dir / "shr_factual_part1.jsonl").write_text("".join(json.dumps({str(k): v}) + "\n" for k, v in items[::2]))
    (shr_dir / "shr_factual_part2.jsonl").write_text("".join(json.dumps({str(k): v}) + "\n" for k, v in items[1::2]))
    meta = [{"image_id": i, "width": w, "height": h, "url": f"https://x/VG_100K/{i}.jpg"} for i, (w, h, _) in images.items()]
    (vg_dir / "image_data.json").write_text(json.dumps(meta))
    records = [{"regions": regions, "id": i} for i, (_, _, regions) in images.items()]
    (vg_dir / "region_descriptions.json").write_text(json.dumps(records, ensure_ascii=False))
    return shr_dir, vg_dir


REGION_IDS = itertools.count(1)


def region(image_id: int, x, y, w, h, phrase: str) -> dict:
    """A VG region record, keys in the published file's order."""
    return {"region_id": next(REGION_IDS), "width": w, "height": h, "image_id": image_id, "phrase": phrase,
            "y": y, "x": x}


def client(url: str, cache: Path | None = None, **overrides) -> JudgeClient:
    config = dict(url=url, timeout_s=0.4, max_retries=2, backoff_s=0.01, concurrency=3, cache_path=cache)
    return JudgeClient(JudgeConfig(**{**config, **overrides}))


def numbered_in(prompt: str) -> list[tuple[str, str]]:
    """The numbered sentences at the end of a prompt (built-in or HA-DPO's)."""
    found = []
    for line in reversed(prompt.rstrip("\n").split("\n")):
        match = re.match(r"^(\d+)\. (.*)$", line)
        if not match:
            break
        found.append(match.groups())
    return found[::-1]


def all_correct(path: str, body: dict):
    sentences = numbered_in(body["messages"][0]["content"])
    return 200, chat_reply("Judgement:\n" + "".join(f"{n}. correct: fine\n" for n, _ in sentences)), {}


@pytest.fixture
def servers():
    made = []

    def make(respond):
        made.append(ChatServer(respond))
        return made[-1]

    yield make
    for server in made:
        server.close()


# ---------------------------------------------------------------- fidelity with HA-DPO

TRICKY = {
    # 0.005 -> 0.01, 0.125 -> 0.12 (binary halves round to even), 1/3 -> 0.33, a float box
    11: (1000, 800, [region(11, 5, 100, 120, 200, "a brown dog "), region(11, 0, 0, 1000, 800, ""),
                     region(11, 125, 300, 250, 500, "café table"), region(11, 333.5, 10, 0.5, 1, "tiny {x}")]),
    12: (333, 500, [region(12, 111, 125, 111, 250, "naïve art on the wall"), region(12, 0, 0, 333, 500, "whole")]),
    13: (640, 480, [region(13, 10, 20, 30, 40, "a cat")]),
}
TRICKY_FACTS = {11: ["There is a dog.", "The table is from a café."], 12: ["A painting hangs."]}
TRICKY_DESCRIPTIONS = {
    "11": "A brown dog sits under a café table. A brown dog sits. The dog looks happy.  \n"
    "It wears a red collar... A brown dog sits under a café table. Mr. Smith owns it",
    "12": "The image shows naïve art.\nA painting hangs on the wall. Colours are bright",
    "13": "A cat.  A  cat  sleeps on a mat. . .",
}


def test_request_is_hadpo_prompt_byte_for_byte_with_hadpo_settings(tmp_path, servers):
    shr_dir, vg_dir = write_shr_inputs(tmp_path, TRICKY, TRICKY_FACTS)
    server = servers(all_correct)
    options = shr.ShrOptions(judge_prompt=HADPO_PROMPT)
    metrics = shr.run_shr(TRICKY_DESCRIPTIONS, shr_dir, vg_dir, client(server.url), tmp_path / "out", options)

    expected = {
        hadpo_prompt({"width": w, "height": h}, regions, TRICKY_FACTS.get(i), TRICKY_DESCRIPTIONS[str(i)])
        for i, (w, h, regions) in TRICKY.items()
    }
    assert "[0.01, 0.12, 0.12, 0.38]: a brown dog \n" in "".join(expected)  # the rounding cases are there
    assert {body["messages"][0]["content"] for body in server.requests} == expected
    for body in server.requests:
        assert body["messages"] == [{"role": "user", "content": body["messages"][0]["content"]}]
        assert {k: v for k, v in body.items() if k != "messages"} == HADPO_SETTINGS
    assert metrics["judge"]["prompt"] == {
        "path": str(HADPO_PROMPT), "sha256": hashlib.sha256(HADPO_PROMPT.read_bytes()).hexdigest(), "hadpo": True,
    }
    assert metrics["judge"]["model"] == "gpt-4" and metrics["judge"]["parser"] == "hadpo"
    assert metrics["judge"]["max_prompt_chars"] == 15000
    assert metrics["shr"] == 0.0 and metrics["hadpo"]["hal_sents_ratio"] == 0.0


def test_prompts_over_15000_characters_are_skipped_and_counted(tmp_path, servers):
    image = {"width": 100, "height": 100}
    description = "A dog runs. A cat sleeps."
    base = [region(21, 1, 2, 3, 4, "a dog")]
    short = len(hadpo_prompt(image, base + [region(21, 0, 0, 1, 1, "x")], None, description))
    pad = 15000 - short + 1  # one region with a phrase of 1 + pad characters: exactly 15,000
    images = {
        21: (100, 100, base + [region(21, 0, 0, 1, 1, "x" * pad)]),
        22: (100, 100, base + [region(22, 0, 0, 1, 1, "x" * (pad + 1))]),
        23: (100, 100, base),
    }
    lengths = [len(hadpo_prompt(image, regions, None, description)) for _, _, regions in images.values()]
    assert lengths[:2] == [15000, 15001]
    shr_dir, vg_dir = write_shr_inputs(tmp_path, images, {})
    descriptions = {i: description for i in images}
    server = servers(all_correct)
    options = shr.ShrOptions(judge_prompt=HADPO_PROMPT)
    metrics = shr.run_shr(descriptions, shr_dir, vg_dir, client(server.url), tmp_path / "out", options)
    assert len(server.requests) == 2 and all(len(b["messages"][0]["content"]) <= 15000 for b in server.requests)
    assert metrics["unlabelled_images"] == {"no_judgement": 0, "count_mismatch": 0, "prompt_too_long": 1}
    assert metrics["unlabelled_sentences"]["prompt_too_long"] == 2
    assert metrics["images"] == 2 and metrics["hadpo"]["num_images"] == 2  # as HA-DPO: not judged at all
    assert metrics["label_counts"]["correct"] == 4 and metrics["described_images"] == 3
    statuses = [json.loads(line)["status"] for line in (tmp_path / "out" / "judgements.jsonl").open()]
    assert statuses == ["labelled", "prompt_too_long", "labelled"]

    unlimited = shr.ShrOptions(judge_prompt=HADPO_PROMPT, max_prompt_chars=0)
    metrics = shr.run_shr(descriptions, shr_dir, vg_dir, client(server.url), tmp_path / "out2", unlimited)
    assert len(server.requests) == 5 and metrics["unlabelled_images"]["prompt_too_long"] == 0


def test_reply_without_judgement_is_asked_again_and_never_cached(tmp_path, servers):
    asked: Counter = Counter()
    stubborn = "never"

    def respond(path, body):
        prompt = body["messages"][0]["content"]
        asked[prompt] += 1
        n = len(numbered_in(prompt))
        lines = "".join(f"{i}. correct: ok\n" for i in range(1, n + 1))
        if stubborn in prompt or asked[prompt] <= 2:  # "Judgement" without its colon is not a judgement
            return 200, chat_reply(("Judgement\n" if asked[prompt] % 2 else "Sure:\n") + lines), {}
        return 200, chat_reply("Judgement:\n" + lines), {}

    images = {31: (10, 10, [region(31, 1, 1, 2, 2, "a dog")]), 32: (10, 10, [region(32, 1, 1, 2, 2, "a cat")])}
    shr_dir, vg_dir = write_shr_inputs(tmp_path, images, {})
    descriptions = {31: "A dog. It runs.", 32: f"A cat {stubborn} sleeps. It purrs. It is grey."}
    server = servers(respond)
    cache = tmp_path / "out" / "judge_cache.jsonl"
    options = shr.ShrOptions(judge_prompt=HADPO_PROMPT)
    metrics = shr.run_shr(descriptions, shr_dir, vg_dir, client(server.url, cache, reasks=2), tmp_path / "out", options)
    assert sorted(asked.values()) == [3, 3]  # image 31 answered at the third ask; image 32 gave up after 3
    assert metrics["label_counts"]["correct"] == 2
    assert metrics["unlabelled_images"]["no_judgement"] == 1 and metrics["unlabelled_sentences"]["no_judgement"] == 3
    cached = [json.loads(line) for line in cache.open()]
    assert len(cached) == 1 and cached[0]["reply"].startswith("Judgement:\n")

    again = shr.run_shr(descriptions, shr_dir, vg_dir, client(server.url, cache, reasks=2), tmp_path / "out", options)
    assert sorted(asked.values()) == [3, 6]  # the cached judgement is reused; the missing one is asked again
    assert again["unlabelled_images"] == metrics["unlabelled_images"]


HAND_REPLIES = [
    "Judgement:\n1. correct: fine\n2. hallucination: no cat\n3. cannot judge: mood",
    "Sure.\n\nJudgement:\n1. Correct: fine\n\n2. Hallucination: no cat\n3. Cannot judge: mood\n",
    "**Judgement:**\n1. **correct**: fine\n2. hallucination : spaced\n3. cannot judge - no colon",
    "Judgement: 1. correct: on the header line\n2. correct: b\n3. correct: c",
    "Judgement:\n1.correct: glued number\n2. correct: b\n3. correct: c",
    "Judgement:\n 1. correct: indented\n2. correct: b\n3. correct: c",
    "Judgement:\n1. correct: a\n2. correct: b",
    "Judgement:\n1. correct: a\n2. correct: b\n3. correct: c\n4. correct: d",
    "Judgement:\n3. hallucination: numbers are not checked\n1. correct: b\n2. correct: c",
    "Judgement:\n1. correct: a\n   \n2. correct: b\n3. correct: c",
    "Judgement:\nJudgement:\n1. correct: a\n2. correct: b",
    "judgement:\n1. correct: a\n2. correct: b\n3. correct: c\nJudgement:\n1. hallucination: later header",
    "Judgement:\n1. correct\n2. hallucination\n3. cannot judge",
    "Judgement:\n1. hallucination (the cat): x\n2. incorrect: y\n3. CANNOT JUDGE: z",
    "Judgement:\r\n1. correct: windows\r\n2. correct: b\r\n3. correct: c\r\n",
]


@pytest.mark.parametrize("reply", HAND_REPLIES)
def test_hadpo_parser_reads_replies_as_post_process_no_revise(reply):
    compare_with_hadpo("A dog runs. A cat sleeps. The mood is calm.", reply)


def test_reply_without_a_judgement_line_is_no_judgement():
    verdict = shr.parse_hadpo(1, "Judgement\n1. correct: a", ["A dog"])
    assert verdict.status == "no_judgement" and [s.label for s in verdict.sentences] == [None]
    with pytest.raises(IndexError):  # the original crashes there; it only re-asks without "Judgement"
        hadpo_post_process("Judgement\n1. correct: a", "A dog.")


FRAGMENTS = ["A dog runs", "a dog", "The  sky is blue", "It is\nsunny", "", " ", "Two cats sleep", "A dog runs fast"]
LINE_PIECES = st.sampled_from(["1.", "2.", "3)", "4", "", "-", "10.", "1.correct:"])
LABEL_PIECES = st.sampled_from(["correct", "Correct", "CORRECT", "hallucination", "Hallucination", "cannot judge",
                                "Cannot judge", "**correct**", "correct ", " hallucination", "maybe", "",
                                "hallucination (the cat)", "incorrect", "cannot  judge"])
REASONS = st.text(alphabet=st.sampled_from(list("ab :.*é\t")), max_size=10)
LINES = st.one_of(
    st.builds(lambda n, label, sep, reason: f"{n} {label}{sep}{reason}", LINE_PIECES, LABEL_PIECES,
              st.sampled_from([": ", ":", " : ", " - ", ""]), REASONS),
    st.sampled_from(["", " ", "  ", "**Judgement:**", "Judgement: 1. correct: x", "judgement:", "Here you go.",
                     " 1. correct: indented", "Judgement"]),
)
REPLIES = st.builds(
    lambda before, header, after: "\n".join([*before, *(["Judgement:"] if header else []), *after]),
    st.lists(LINES, max_size=2), st.booleans(), st.lists(LINES, max_size=7),
)
DESCRIPTIONS = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map(". ".join)


@settings(max_examples=400, deadline=None)
@given(description=DESCRIPTIONS, reply=REPLIES)
def test_hadpo_parser_on_generated_replies(description, reply):
    compare_with_hadpo(description, reply)


def compare_with_hadpo(description: str, reply: str) -> shr.ImageJudgement:
    sentences = shr.split_sentences(description)
    assert [s + "." for s in sentences] == hadpo_seg_cap(description)
    verdict = shr.parse_hadpo(7, reply, sentences)
    if "Judgement:" not in reply:
        assert verdict.status == "no_judgement"
        return verdict
    original = hadpo_post_process(reply, description)
    assert [s.sentence + "." for s in verdict.sentences] == [o["model_response"] for o in original]
    if original:  # (without sentences the original's output cannot tell a mismatch)
        assert verdict.status == ("count_mismatch" if original[0]["judgement"] is None else "labelled")
    assert [s.judgement for s in verdict.sentences] == [o["judgement"] for o in original]
    labels = [o["classification"] if o["classification"] in HADPO_LABELS else None for o in original]
    assert [s.label for s in verdict.sentences] == labels
    return verdict


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(DESCRIPTIONS, REPLIES), min_size=1, max_size=6))
def test_hadpo_metrics_equal_get_metric(cases):
    cases = [(d, r) for d, r in cases if "Judgement:" in r]  # HA-DPO asks until it has one
    verdicts = [shr.parse_hadpo(i, r, shr.split_sentences(d)) for i, (d, r) in enumerate(cases)]
    ours = shr.shr_metrics(verdicts)
    judgement = {i: {"judgement": hadpo_post_process(r, d)} for i, (d, r) in enumerate(cases)}
    try:
        expected = hadpo_get_metric(judgement)
    except ZeroDivisionError:  # the original divides by zero: no image, or nothing labelled
        assert ours["hadpo"]["hal_sents_ratio"] is None and ours["shr"] is None
        return
    assert ours["hadpo"] == expected
    assert round(ours["shr"] / 100, 3) == expected["hal_sents_ratio"]


def test_hadpo_metric_values_by_hand():
    J, S = shr.ImageJudgement, shr.SentenceJudgement
    images = [
        J(1, "labelled", [S("a  b c", "hallucination", ""), S("d e", "correct", ""), S("f", "cannot judge", "")]),
        J(2, "labelled", [S("g h i j", "hallucination", ""), S("k", None, "maybe: x")]),
        J(3, "count_mismatch", [S("l m", None, None)]),
        J(4, "prompt_too_long", [S("n o p", None, None)]),
    ]
    m = shr.shr_metrics(images)
    # HA-DPO: 3 images; 7 sentences; words split on " ": "a  b c" has 4
    assert m["hadpo"] == {
        "num_images": 3, "sents_per_image": round(6 / 3, 3), "words_per_image": round(14 / 3, 3),
        "hal_sents_per_image": round(2 / 3, 3), "hal_words_per_image": round(8 / 3, 3),
        "hal_sents_ratio": 0.5, "hal_words_ratio": round(8 / 11, 3), "mean_hal_ratio": 0.5,
    }
    # ours: whitespace words ("a  b c" has 3), unrounded percentages, every unlabelled sentence counted
    assert m["shr"] == 50.0 and m["shr_words"] == 70.0
    assert m["images"] == 3 and m["sentences_per_image"] == 2.0 and m["words_per_image"] == 13 / 3
    assert m["hal_sentences_per_image"] == 2 / 3 and m["hal_words_per_image"] == 7 / 3
    assert m["label_counts"] == {"hallucination": 2, "correct": 1, "cannot judge": 1} and m["labelled_sentences"] == 4
    assert m["unlabelled_images"] == {"no_judgement": 0, "count_mismatch": 1, "prompt_too_long": 1}
    assert m["unlabelled_sentences"] == {"unknown_label": 1, "no_judgement": 0, "count_mismatch": 1, "prompt_too_long": 1}
    empty = shr.shr_metrics([J(1, "count_mismatch", [S("a", None, None)])])
    assert empty["shr"] is None and empty["hadpo"]["hal_sents_ratio"] is None and empty["hadpo"]["sents_per_image"] == 1


# ---------------------------------------------------------------- pure pieces


def test_split_sentences_drops_repeats_and_substrings():
    text = "A dog runs fast. A cat sleeps.  A dog runs fast. A dog runs. . Grass is green.\nThe end"
    assert shr.split_sentences(text) == ["A dog runs fast", "A cat sleeps", "Grass is green", "The end"]
    assert shr.number_sentences(["A b", "C d"]) == "1. A b\n2. C d\n"
    assert shr.split_sentences("...") == []


def test_format_regions_normalises_boxes_and_names_bad_fields():
    regions = [
        {"x": 10, "y": 20, "width": 30, "height": 40, "phrase": "a dog"},
        {"x": 0, "y": 0, "width": 100, "height": 200, "phrase": ""},  # no phrase: left out
        {"x": 1, "y": 3, "width": 32, "height": 65, "phrase": "a ball"},
    ]
    assert shr.format_regions(regions, 100, 200) == "[0.1, 0.1, 0.4, 0.3]: a dog\n[0.01, 0.01, 0.33, 0.34]: a ball\n"
    with pytest.raises(UserError, match=r"^f.json record 3 \(image 9\) region 1: field 'width' must be a number, got '3'$"):
        shr.format_regions([regions[0], {**regions[2], "width": "3"}], 100, 200, "f.json record 3 (image 9)")
    with pytest.raises(UserError, match=r"region 0: field 'phrase' must be text, got 5"):
        shr.format_regions([{**regions[0], "phrase": 5}], 100, 200)
    with pytest.raises(UserError, match=r"width and height must be positive numbers, got 0x200"):
        shr.format_regions(regions, 0, 200)


@pytest.mark.parametrize(
    "text, message",
    [
        ("Regions {}\nFacts {}\n", r"needs exactly three plain \{\} fields .*found \['\{\}', '\{\}'\]"),
        ("{regions} {facts} {sentences}", r"needs .*found \['\{regions\}', '\{facts\}', '\{sentences\}'\]"),
        ("{} {} {:>5}", "needs exactly three plain"),
        ("{} {} {} {", "not a format template"),
    ],
)
def test_bad_prompt_templates_are_refused(tmp_path, text, message):
    path = tmp_path / "prompt.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"judge prompt {re.escape(str(path))}: {message}"):
        shr.ShrOptions(judge_prompt=path)
    path.write_bytes(b"\xff{} {} {}")
    with pytest.raises(UserError, match="not UTF-8 text"):
        shr.JudgePrompt.load(path)
    assert shr.JudgePrompt.load(None).record()["hadpo"] is False


def test_lenient_parser():
    sentences = ["A dog", "A cat", "It is sunny"]
    reply = "Sure.\n**Judgement:**\n1. **Correct**: region 1 shows a dog.\n\n2) hallucination: no cat\n3. cannot judge: weather"
    verdict = shr.parse_lenient(7, reply, sentences)
    assert verdict.status == "labelled"
    assert [(s.label, s.judgement) for s in verdict.sentences] == [
        ("correct", "**Correct**: region 1 shows a dog."), ("hallucination", "hallucination: no cat"),
        ("cannot judge", "cannot judge: weather"),
    ]
    assert shr.parse_hadpo(7, reply, sentences).status == "labelled"
    assert [s.label for s in shr.parse_hadpo(7, reply, sentences).sentences] == [None, "hallucination", "cannot judge"]
    unknown = shr.parse_lenient(7, "Judgement:\n1. correct: x\n2. probably wrong: y\n3 cannot judge", sentences)
    assert [s.label for s in unknown.sentences] == ["correct", None, "cannot judge"]
    assert shr.parse_lenient(7, "Judgement:\n1. correct\n3. correct\n2. correct", sentences).status == "count_mismatch"
    assert shr.parse_lenient(7, "judgment: 1. correct: a\n2. correct: b\n3. correct: c", sentences).status == "labelled"
    assert shr.parse_lenient(7, "1. correct\n2. correct\n3. correct", sentences).status == "no_judgement"


# ---------------------------------------------------------------- a local judge


class FakeJudge(ChatServer):
    """A chat-completions server judging from the prompt's regions: a sentence naming a region's
    noun is correct, one about the atmosphere cannot be judged, the rest are hallucinations.
    Marker words in a description trigger misbehaviour: RATE (one HTTP 429 first), SLOW (the
    first reply comes too late), MALFORMED (an unknown label), MISMATCH (a line missing)."""

    def __init__(self, status: int | None = None):
        self.status = status
        self.seen: Counter = Counter()
        super().__init__(self.answer)

    def answer(self, path: str, body: dict):
        assert path == "/v1/chat/completions"
        prompt = body["messages"][0]["content"]
        self.seen[prompt] += 1
        if self.status is not None:
            return self.status, {"error": "scripted"}, {}
        if "RATE" in prompt and self.seen[prompt] == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        if "SLOW" in prompt and self.seen[prompt] == 1:
            time.sleep(1.0)
        return 200, chat_reply(self.judge(prompt)), {}

    @staticmethod
    def judge(prompt: str) -> str:
        nouns = {m.group(1).split()[-1] for m in re.finditer(r"^\[[^\]]*\]: (.+)$", prompt, re.M)}
        lines = ["Here is my judgement.", "Judgement:"]
        for number, sentence in numbered_in(prompt):
            if "MISMATCH" in sentence:
                continue
            if "MALFORMED" in sentence:
                label = "maybe"
            elif "atmosphere" in sentence:
                label = "cannot judge"
            elif nouns & set(sentence.split()):
                label = "correct"
            else:
                label = "hallucination"
            lines.append(f"{number}. {label}: because")
        return "\n".join(lines)


@pytest.fixture
def fake_judge():
    server = FakeJudge()
    yield server
    server.close()


REGIONS = {
    1: (640, 480, [(0, 0, 320, 240, "a brown dog"), (320, 240, 320, 240, "a red ball"), (0, 0, 10, 10, "")]),
    2: (100, 100, [(10, 10, 50, 50, "a white horse")]),
    3: (100, 100, [(0, 0, 100, 100, "a tall tree")]),
    4: (100, 100, [(5, 5, 20, 20, "a blue car")]),
    5: (100, 100, [(5, 5, 20, 20, "a green bus")]),
    6: (100, 100, [(5, 5, 20, 20, "a lamp")]),
    7: (100, 100, [(5, 5, 20, 20, "a chair")]),
}
DESCRIPTIONS = {
    "1": "A brown dog plays with a red ball. A cat sleeps on the sofa. The atmosphere is calm. "
    "A brown dog plays with a red ball.",
    "2": "A white horse RATE stands in a field. Two people ride bikes.",
    "3": "A tall tree grows. MALFORMED birds sing.",
    "4": "A blue car parks. MISMATCH a man walks.",
    5: "A green bus SLOW waits.",
    6: "...",
}


def shr_inputs(tmp_path: Path) -> tuple[Path, Path]:
    images = {i: (w, h, [region(i, *r) for r in regions]) for i, (w, h, regions) in REGIONS.items()}
    return write_shr_inputs(tmp_path, images, {1: ["The dog is brown."], 2: ["The horse is white.", "It stands."]})


def test_run_shr_against_local_judge(tmp_path, fake_judge):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    cache = tmp_path / "out" / "judge_cache.jsonl"
    metrics = shr.run_shr(DESCRIPTIONS, shr_dir, vg_dir, client(fake_judge.url, cache, model="judge-1"), tmp_path / "out")

    # 5 images asked (image 6 has no sentence), plus one retry after the 429 and one after the timeout
    assert len(fake_judge.requests) == 7
    assert all(r["model"] == "judge-1" and r["temperature"] == 0.7 for r in fake_judge.requests)
    prompt_1 = next(
        r["messages"][0]["content"] for r in fake_judge.requests if "brown dog plays" in r["messages"][0]["content"]
    )
    assert "[0.0, 0.0, 0.5, 0.5]: a brown dog\n[0.5, 0.5, 1.0, 1.0]: a red ball\n" in prompt_1
    assert "The dog is brown.\n" in prompt_1
    assert prompt_1.endswith(
        "1. A brown dog plays with a red ball\n2. A cat sleeps on the sofa\n3. The atmosphere is calm\n"
    )

    # by hand: image 1 correct/hallucination/cannot judge (8, 6, 4 words); image 2 correct (8) /
    # hallucination (4); image 3 correct (4) / unknown label (3); image 4 count mismatch (4, 4);
    # image 5 correct (5); image 6 nothing
    assert metrics["label_counts"] == {"hallucination": 2, "correct": 4, "cannot judge": 1}
    assert metrics["shr"] == 2 / 7 * 100
    assert metrics["shr_words"] == 10 / 39 * 100
    assert metrics["images"] == 6 and metrics["described_images"] == 6 and metrics["val_images"] == 7
    assert metrics["sentences_per_image"] == 10 / 6 and metrics["words_per_image"] == 50 / 6
    assert metrics["hal_sentences_per_image"] == 2 / 6 and metrics["hal_words_per_image"] == 10 / 6
    assert metrics["unlabelled_images"] == {"no_judgement": 0, "count_mismatch": 1, "prompt_too_long": 0}
    assert metrics["unlabelled_sentences"] == {"unknown_label": 1, "no_judgement": 0, "count_mismatch": 2,
                                               "prompt_too_long": 0}
    assert metrics["hadpo"]["hal_sents_ratio"] == round(2 / 7, 3) and metrics["hadpo"]["num_images"] == 6
    assert metrics["judge"]["prompt"]["path"] == "built-in" and metrics["judge"]["prompt"]["hadpo"] is False
    assert metrics["judge"]["url"] == fake_judge.url + "/chat/completions"

    lines = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").open()]
    assert [r["image_id"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["status"] for r in lines] == ["labelled"] * 3 + ["count_mismatch"] + ["labelled"] * 2
    assert [s["label"] for s in lines[2]["sentences"]] == ["correct", None]
    assert lines[2]["sentences"][1]["judgement"] == "maybe: because"
    assert lines[5]["reply"] is None and lines[5]["sentences"] == []
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    report = markdown({"models": {"base": {"shr": metrics}}})
    assert "| base | 28.57 |" in report
    assert "- base SHR not labelled: 1 images (no judgement 0, count mismatch 1, prompt too long 0); 3 sentences" in report
    assert "- base SHR judge: judge-1, prompt built-in (sha256 3ce06a4d9a4c, not HA-DPO's prompt" in report
    assert "- base SHR HA-DPO metrics: num_images 6, sents_per_image 1.667, " in report

    # a rerun asks nothing: every judgment comes from the cache
    again = shr.run_shr(DESCRIPTIONS, shr_dir, vg_dir, client(fake_judge.url, cache, model="judge-1"), tmp_path / "out")
    assert again == metrics and len(fake_judge.requests) == 7


def test_cli_with_api_key_and_hadpo_prompt(tmp_path, fake_judge, monkeypatch, capsys):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"1": DESCRIPTIONS["1"], "3": DESCRIPTIONS["3"]}))
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    argv = [
        "eval", "shr", "judge", "--descriptions", descriptions, "--shr-dir", shr_dir, "--vg-dir", vg_dir,
        "--out", tmp_path / "out", "--judge-url", fake_judge.url, "--api-key-env", "TEST_JUDGE_KEY",
        "--judge-prompt", HADPO_PROMPT, "--judge-option", "logit_bias=null", "--judge-option", "max_tokens=1000",
    ]
    assert main(list(map(str, argv))) == 0
    out = capsys.readouterr().out
    assert f"prompt {HADPO_PROMPT} (sha256 00550be1a5a9, HA-DPO's prompt), hadpo parser" in out
    assert "not labelled: 0 images (no judgement 0, count mismatch 0, prompt too long 0); 1 sentences " \
           "(unknown label 1, no judgement 0, count mismatch 0, prompt too long 0)" in out
    assert "HA-DPO metrics: num_images 2, sents_per_image 2.5, " in out and "mean_hal_ratio 0.25" in out
    assert fake_judge.headers == ["Bearer sk-secret-123"] * 2
    assert all(HADPO_TEMPLATE[:60] in r["messages"][0]["content"] for r in fake_judge.requests)
    assert all("logit_bias" not in r and r["max_tokens"] == 1000 and r["model"] == "gpt-4" for r in fake_judge.requests)
    for path in (tmp_path / "out").iterdir():
        assert "sk-secret-123" not in path.read_text()
    assert main(list(map(str, [*argv, "--json"]))) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["label_counts"] == {"hallucination": 1, "correct": 2, "cannot judge": 1}
    assert metrics["shr"] == 1 / 4 * 100 and metrics["described_images"] == 2
    assert len(fake_judge.requests) == 2  # the second run came from the cache
    monkeypatch.delenv("TEST_JUDGE_KEY")
    assert main(list(map(str, argv))) == 2
    assert "TEST_JUDGE_KEY is not set" in capsys.readouterr().err
    assert main(list(map(str, [*argv[:-4], "--judge-option", "temperature"]))) == 2
    assert "--judge-option temperature: expected KEY=JSON" in capsys.readouterr().err


def test_descriptions_of_unknown_images_are_refused(tmp_path, fake_judge):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    with pytest.raises(Exception, match=r"1 described images are not SHR validation images \(e.g. \[99\]\)"):
        shr.run_shr({99: "A dog."}, shr_dir, vg_dir, client(fake_judge.url), tmp_path / "out")
    assert fake_judge.requests == []


@pytest.mark.parametrize("status, requests", [(503, 3), (400, 1)])
def test_judge_gives_up(status, requests, tmp_path):
    server = FakeJudge(status=status)
    try:
        with pytest.raises(JudgeError, match=f"HTTP {status}"):
            client(server.url, tmp_path / "cache.jsonl").complete("Judgement please")
        assert len(server.requests) == requests  # 5xx retried (2 retries), 4xx not
    finally:
        server.close()
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""


def test_judge_timeout_exhausts_retries(tmp_path, fake_judge):
    judge = client(fake_judge.url, timeout_s=0.2, max_retries=0)
    with pytest.raises(JudgeError, match="no complete reply within 0.2s"):
        judge.complete("SLOW prompt")


def test_cache_survives_a_truncated_line_and_dedupes(tmp_path, fake_judge):
    cache = tmp_path / "cache.jsonl"
    first = client(fake_judge.url, cache)
    prompts = ["Comments:\n1. a b\n", "Comments:\n1. c d\n", "Comments:\n1. a b\n"]
    replies = first.complete_many(prompts)
    assert replies[0] == replies[2] and len(fake_judge.requests) == 2
    with cache.open("a") as handle:
        handle.write('{"key": "abc", "rep')  # a crash mid-append
    second = client(fake_judge.url, cache)
    assert second.complete_many(prompts) == replies and len(fake_judge.requests) == 2
    assert client(fake_judge.url, cache, model="judge-2").complete(prompts[0]) == replies[0]
    assert len(fake_judge.requests) == 3  # another model is another judgment
