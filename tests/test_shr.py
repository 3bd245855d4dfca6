"""SHR: sentence splitting, the judge prompt, the reply parser, metrics, and a full run against
a local chat-completions server (malformed replies, a count mismatch, HTTP 429, a timeout,
the reply cache, the API key)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mllm_pib.cli import main
from mllm_pib.evaluation import shr
from mllm_pib.evaluation.judge import JudgeClient, JudgeConfig, JudgeError

# ---------------------------------------------------------------- pure pieces


def test_split_sentences_drops_repeats_and_substrings():
    text = "A dog runs fast. A cat sleeps.  A dog runs fast. A dog runs. . Grass is green.\nThe end"
    assert shr.split_sentences(text) == ["A dog runs fast", "A cat sleeps", "Grass is green", "The end"]
    assert shr.number_sentences(["A b", "C d"]) == "1. A b\n2. C d\n"
    assert shr.split_sentences("...") == []


def test_format_regions_normalises_boxes():
    regions = [
        {"x": 10, "y": 20, "width": 30, "height": 40, "phrase": "a dog"},
        {"x": 0, "y": 0, "width": 100, "height": 200, "phrase": ""},  # no phrase: left out
        {"x": 1, "y": 3, "width": 32, "height": 65, "phrase": "a ball"},
    ]
    text = shr.format_regions(regions, 100, 200)
    # 10/100, 20/200, 40/100, 60/200 ; 1/100, 3/200=0.015, 33/100, 68/200
    assert text == "[0.1, 0.1, 0.4, 0.3]: a dog\n[0.01, 0.01, 0.33, 0.34]: a ball\n"


def test_judge_prompt_holds_regions_facts_and_numbered_sentences():
    prompt = shr.build_judge_prompt(
        "[0.1, 0.1, 0.4, 0.3]: a dog\n", ["There is one dog.", "It is brown."], ["A dog", "A cat"]
    )
    assert "[0.1, 0.1, 0.4, 0.3]: a dog\n" in prompt
    assert "There is one dog.\nIt is brown.\n" in prompt
    assert prompt.endswith("1. A dog\n2. A cat\n")
    assert "Judgement:\n1. hallucination or correct or cannot judge: <reason>" in prompt


def test_parse_judgement():
    sentences = ["A dog", "A cat", "It is sunny"]
    reply = (
        "Sure.\n**Judgement:**\n1. Correct: region 1 shows a dog.\n\n2) hallucination: no cat\n3. cannot judge: weather"
    )
    verdict = shr.parse_judgement(7, reply, sentences)
    assert verdict.status == "labelled"
    assert [(s.sentence, s.label, s.reason) for s in verdict.sentences] == [
        ("A dog", "correct", "region 1 shows a dog."),
        ("A cat", "hallucination", "no cat"),
        ("It is sunny", "cannot judge", "weather"),
    ]
    unparseable = shr.parse_judgement(7, "Judgement:\n1. correct: x\n2. probably wrong: y\n3 cannot judge", sentences)
    assert [s.label for s in unparseable.sentences] == ["correct", None, "cannot judge"]
    assert unparseable.unparseable == 1
    assert shr.parse_judgement(7, "Judgement:\n1. correct: x\n2. correct: y", sentences).status == "count_mismatch"
    assert (
        shr.parse_judgement(7, "Judgement:\n1. correct\n3. correct\n2. correct", sentences).status == "count_mismatch"
    )
    assert shr.parse_judgement(7, "1. correct\n2. correct\n3. correct", sentences).status == "no_judgement"
    assert (
        shr.parse_judgement(7, "Judgement: 1. correct: a\n2. correct: b\n3. correct: c", sentences).status == "labelled"
    )


def test_metrics_by_hand():
    J, S = shr.ImageJudgement, shr.SentenceJudgement
    images = [
        J(1, "labelled", [S("a b c", "hallucination", ""), S("d e", "correct", ""), S("f", "cannot judge", "")]),
        J(2, "labelled", [S("g h i j", "hallucination", ""), S("k", None, None)]),
        J(3, "count_mismatch", [S("l m", None, None)]),
    ]
    m = shr.shr_metrics(images)
    assert m["shr"] == 2 / 4 * 100
    assert m["hal_words_ratio"] == 7 / 10 * 100
    assert m["sentences_per_image"] == 6 / 3 and m["words_per_image"] == 13 / 3
    assert m["hal_sentences_per_image"] == 2 / 3 and m["hal_words_per_image"] == 7 / 3
    assert m["unlabelled_images"] == {"count_mismatch": 1} and m["unparseable_sentences"] == 1
    assert m["label_counts"] == {"hallucination": 2, "correct": 1, "cannot judge": 1}


# ---------------------------------------------------------------- a local judge


class FakeJudge:
    """A chat-completions server judging from the prompt's regions: a sentence naming a region's
    noun is correct, one about the atmosphere cannot be judged, the rest are hallucinations.
    Marker words in a description trigger misbehaviour: RATE (one HTTP 429 first), SLOW (the
    first reply comes too late), MALFORMED (an unknown label), MISMATCH (a line missing)."""

    def __init__(self, status: int | None = None):
        self.requests: list[dict] = []
        self.headers: list[str | None] = []
        self.status = status
        self.seen: Counter = Counter()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                judge.headers.append(self.headers.get("Authorization"))
                code, payload, extra = judge.respond(self.path, body)
                try:
                    self.send_response(code)
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps(payload).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, path: str, body: dict) -> tuple[int, dict, dict]:
        assert path == "/v1/chat/completions"
        prompt = body["messages"][0]["content"]
        self.seen[prompt] += 1
        if self.status is not None:
            return self.status, {"error": "scripted"}, {}
        if "RATE" in prompt and self.seen[prompt] == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        if "SLOW" in prompt and self.seen[prompt] == 1:
            time.sleep(1.0)
        return 200, {"choices": [{"message": {"role": "assistant", "content": self.judge(prompt)}}]}, {}

    @staticmethod
    def judge(prompt: str) -> str:
        nouns = {m.group(1).split()[-1] for m in re.finditer(r"^\[[^\]]*\]: (.+)$", prompt, re.M)}
        comments = prompt.split("Comments to judge")[1]
        lines = ["Here is my judgement.", "Judgement:"]
        for number, sentence in re.findall(r"^(\d+)\. (.+)$", comments, re.M):
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
    shr_dir, vg_dir = tmp_path / "shr", tmp_path / "VG"
    shr_dir.mkdir()
    vg_dir.mkdir()
    (shr_dir / "val_images_final.json").write_text(json.dumps([{"image_id": i} for i in REGIONS]))
    (shr_dir / "shr_factual_part1.jsonl").write_text(json.dumps({"1": ["The dog is brown."]}) + "\n")
    (shr_dir / "shr_factual_part2.jsonl").write_text(json.dumps({"2": ["The horse is white.", "It stands."]}) + "\n")
    (vg_dir / "image_data.json").write_text(
        json.dumps(
            [
                {"image_id": i, "width": w, "height": h, "url": f"https://x/VG_100K/{i}.jpg"}
                for i, (w, h, _) in REGIONS.items()
            ]
        )
    )
    (vg_dir / "region_descriptions.json").write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "regions": [
                        {"region_id": 10 * i + j, "image_id": i, "x": x, "y": y, "width": rw, "height": rh, "phrase": p}
                        for j, (x, y, rw, rh, p) in enumerate(regions)
                    ],
                }
                for i, (_, _, regions) in REGIONS.items()
            ]
        )
    )
    return shr_dir, vg_dir


def client(url: str, cache: Path | None, **overrides) -> JudgeClient:
    config = dict(
        url=url, model="judge-1", timeout_s=0.4, max_retries=2, backoff_s=0.01, concurrency=3, cache_path=cache
    )
    return JudgeClient(JudgeConfig(**{**config, **overrides}))


def test_run_shr_against_local_judge(tmp_path, fake_judge):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    cache = tmp_path / "out" / "judge_cache.jsonl"
    metrics = shr.run_shr(DESCRIPTIONS, shr_dir, vg_dir, client(fake_judge.url, cache), tmp_path / "out")

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
    # hallucination (4); image 3 correct (4) / unparseable (3); image 4 count mismatch (4, 4);
    # image 5 correct (5); image 6 nothing
    assert metrics["label_counts"] == {"hallucination": 2, "correct": 4, "cannot judge": 1}
    assert metrics["shr"] == 2 / 7 * 100
    assert metrics["hal_words_ratio"] == 10 / 39 * 100
    assert metrics["images"] == 6 and metrics["described_images"] == 6 and metrics["val_images"] == 7
    assert metrics["sentences_per_image"] == 10 / 6 and metrics["words_per_image"] == 50 / 6
    assert metrics["hal_sentences_per_image"] == 2 / 6 and metrics["hal_words_per_image"] == 10 / 6
    assert metrics["unlabelled_images"] == {"count_mismatch": 1} and metrics["unparseable_sentences"] == 1

    lines = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").open()]
    assert [r["image_id"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["status"] for r in lines] == ["labelled"] * 3 + ["count_mismatch"] + ["labelled"] * 2
    assert [s["label"] for s in lines[2]["sentences"]] == ["correct", None]
    assert lines[5]["reply"] is None and lines[5]["sentences"] == []
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics

    # a rerun asks nothing: every judgment comes from the cache
    again = shr.run_shr(DESCRIPTIONS, shr_dir, vg_dir, client(fake_judge.url, cache), tmp_path / "out")
    assert again == metrics and len(fake_judge.requests) == 7


def test_cli_with_api_key(tmp_path, fake_judge, monkeypatch, capsys):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"1": DESCRIPTIONS["1"], "3": DESCRIPTIONS["3"]}))
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    argv = [
        "eval",
        "shr",
        "judge",
        "--descriptions",
        descriptions,
        "--shr-dir",
        shr_dir,
        "--vg-dir",
        vg_dir,
        "--out",
        tmp_path / "out",
        "--judge-url",
        fake_judge.url,
        "--judge-model",
        "m",
        "--api-key-env",
        "TEST_JUDGE_KEY",
        "--json",
    ]
    assert main(list(map(str, argv))) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["label_counts"] == {"hallucination": 1, "correct": 2, "cannot judge": 1}
    assert metrics["shr"] == 1 / 4 * 100 and metrics["described_images"] == 2
    assert fake_judge.headers == ["Bearer sk-secret-123"] * 2
    for path in (tmp_path / "out").iterdir():
        assert "sk-secret-123" not in path.read_text()
    monkeypatch.delenv("TEST_JUDGE_KEY")
    assert main(list(map(str, argv))) == 2
    assert "TEST_JUDGE_KEY is not set" in capsys.readouterr().err


def test_descriptions_of_unknown_images_are_refused(tmp_path, fake_judge):
    shr_dir, vg_dir = shr_inputs(tmp_path)
    with pytest.raises(Exception, match=r"1 described images are not SHR validation images \(e.g. \[99\]\)"):
        shr.run_shr({99: "A dog."}, shr_dir, vg_dir, client(fake_judge.url, None), tmp_path / "out")
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
    judge = client(fake_judge.url, None, timeout_s=0.2, max_retries=0)
    with pytest.raises(JudgeError, match="timed out"):
        judge.complete("SLOW prompt")


def test_cache_survives_a_truncated_line_and_dedupes(tmp_path, fake_judge):
    cache = tmp_path / "cache.jsonl"
    first = client(fake_judge.url, cache)
    prompts = ["Comments to judge:\n1. a b\n", "Comments to judge:\n1. c d\n", "Comments to judge:\n1. a b\n"]
    replies = first.complete_many(prompts)
    assert replies[0] == replies[2] and len(fake_judge.requests) == 2
    with cache.open("a") as handle:
        handle.write('{"key": "abc", "rep')  # a crash mid-append
    second = client(fake_judge.url, cache)
    assert second.complete_many(prompts) == replies and len(fake_judge.requests) == 2
    assert client(fake_judge.url, cache, model="judge-2").complete(prompts[0]) == replies[0]
    assert len(fake_judge.requests) == 3  # another model is another judgment
