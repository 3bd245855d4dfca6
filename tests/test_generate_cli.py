"""``mllm-pib generate``: answers equal the model's own generation, base = block bypassed,
chat carries the conversation, bad input exits 2 with one clear paragraph."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mllm_pib.chat import Conversation, Turn
from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.commands.generate import COLUMN_GAP, side_by_side
from conftest import make_pib

QUESTION = "Describe this image in detail."
TOKENS = "12"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(llava, pib, image_path):
    """``answer(question, bypass, **kwargs)`` straight from ``PIBModel.generate``."""
    model = load_model(llava, backbone="llava", pib=pib)
    image = Image.open(image_path).convert("RGB")

    def answer(question: str, bypass: bool, max_new_tokens: int = int(TOKENS), **kwargs) -> str:
        return model.generate_text([image], [question], max_new_tokens=max_new_tokens, bypass_pib=bypass, **kwargs)[0]

    answer.model = model
    return answer


def generate(capsys, llava, image_path, *extra: str) -> tuple[int, str, str]:
    code = main(["generate", "--backbone", "llava", "--model", llava, "--image", image_path,
                 "--max-new-tokens", TOKENS, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_pib_answer(capsys, llava, pib, image_path, reference):
    code, out, _ = generate(capsys, llava, image_path, "--pib", pib, "--prompt", QUESTION)
    assert code == 0
    assert out == reference(QUESTION, bypass=False) + "\n"


def test_compare_gives_base_and_pib_answers(capsys, llava, pib, image_path, reference):
    base, pib_answer = reference(QUESTION, bypass=True), reference(QUESTION, bypass=False)
    assert base != pib_answer, "the test PIB must change the answer"
    code, out, _ = generate(capsys, llava, image_path, "--pib", pib, "--prompt", QUESTION, "--compare", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["answers"] == {"base": base, "pib": pib_answer}
    assert record["prompt"] == QUESTION


def test_compare_prints_columns(capsys, monkeypatch, llava, pib, image_path, reference):
    monkeypatch.setenv("COLUMNS", "60")
    code, out, _ = generate(capsys, llava, image_path, "--pib", pib, "--prompt", QUESTION, "--compare")
    assert code == 0
    col = (60 - len(COLUMN_GAP)) // 2
    lines = out.rstrip("\n").split("\n")
    assert lines[0].split() == ["base", "|", "PIB"]
    left = " ".join(line[:col] for line in lines[2:])
    right = " ".join(line[col + len(COLUMN_GAP):] for line in lines[2:])
    assert left.split() == reference(QUESTION, bypass=True).split()
    assert right.split() == reference(QUESTION, bypass=False).split()


def test_side_by_side_wraps_within_width():
    text = "one two three four five six seven\nnew paragraph"
    table = side_by_side([("left", text), ("right", "x")], width=23).split("\n")
    assert table[0] == "left       | right"
    assert all(len(line) <= 23 for line in table)
    left = [line[:10].rstrip() for line in table[2:]]
    assert left == ["one two", "three four", "five six", "seven", "new", "paragraph"]
    assert [line[13:] for line in table[2:]] == ["x", "", "", "", "", ""]


def test_beam_search(capsys, llava, pib, image_path, reference):
    code, out, _ = generate(capsys, llava, image_path, "--pib", pib, "--prompt", QUESTION, "--num-beams", "3", "--json")
    assert code == 0
    assert json.loads(out)["answers"] == {"pib": reference(QUESTION, bypass=False, num_beams=3)}


def test_without_pib_answers_with_the_base_model(capsys, llava, image_path, reference):
    code, out, _ = generate(capsys, llava, image_path, "--prompt", QUESTION, "--json")
    assert code == 0
    assert json.loads(out)["answers"] == {"base": reference(QUESTION, bypass=True)}


def chat(capsys, monkeypatch, llava, pib, image_path, stdin: str, *extra: str) -> tuple[int, list[dict], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code, out, err = generate(capsys, llava, image_path, "--pib", pib, "--chat", "--compare", "--json", *extra)
    return code, [json.loads(line) for line in out.splitlines()], err


def test_chat_carries_the_conversation_until_exit(capsys, monkeypatch, llava, pib, image_path, reference):
    first, second = "What is in the image?", "What colour is it?"
    code, records, _ = chat(capsys, monkeypatch, llava, pib, image_path, f"{first}\n{second}\nexit\nnot asked\n")
    assert code == 0
    assert [r["prompt"] for r in records] == [first, second]
    for variant, bypass in (("base", True), ("pib", False)):
        answer = reference(first, bypass)
        assert records[0]["answers"][variant] == answer  # the first turn is a plain question
        transcript = f"User: {first}\nAssistant: {answer}\nUser: {second}"
        assert records[1]["answers"][variant] == reference(transcript, bypass)


def test_chat_first_turn_from_prompt_and_ends_at_eof(capsys, monkeypatch, llava, pib, image_path, reference):
    code, records, _ = chat(capsys, monkeypatch, llava, pib, image_path, "And then?", "--prompt", QUESTION)
    assert code == 0
    assert [r["prompt"] for r in records] == [QUESTION, "And then?"]
    assert records[0]["answers"]["pib"] == reference(QUESTION, bypass=False)


def test_chat_drops_the_oldest_turns_that_no_longer_fit(capsys, monkeypatch, llava, pib, image_path, reference):
    backbone = reference.model.backbone
    questions = [repeat_to_tokens(backbone.tokenizer, word, 380) for word in ("apple", "table", "house")]
    code, records, _ = chat(capsys, monkeypatch, llava, pib, image_path, "\n".join(questions) + "\n",
                            "--max-new-tokens", "8")
    assert code == 0
    assert [r["dropped_turns"] for r in records] == [{"base": 0, "pib": 0}, {"base": 0, "pib": 0},
                                                     {"base": 1, "pib": 1}]
    for variant, bypass in (("base", True), ("pib", False)):
        turns = [Turn(q.strip(), r["answers"][variant]) for q, r in zip(questions, records)]
        whole = Conversation(turns[:2]).question_text(turns[2].question)
        assert len(backbone.prompt_ids(whole)) + 8 > 1024  # the whole history does not fit
        kept = Conversation(turns[1:2]).question_text(turns[2].question)
        assert len(backbone.prompt_ids(kept)) + 8 <= 1024
        assert records[2]["answers"][variant] == reference(kept, bypass, max_new_tokens=8)


def repeat_to_tokens(tokenizer, word: str, count: int) -> str:
    """``word`` repeated to about ``count`` tokens."""
    per_word = len(tokenizer((word + " ") * 100, add_special_tokens=False).input_ids) / 100
    return (word + " ") * int(count / per_word)


def test_chat_reports_a_bad_turn_and_goes_on(capsys, monkeypatch, llava, pib, image_path, reference):
    code, records, err = chat(capsys, monkeypatch, llava, pib, image_path, f"   \n{QUESTION}\n")
    assert code == 0
    assert "error: the prompt is empty" in err
    assert [r["prompt"] for r in records] == [QUESTION]


@pytest.fixture(scope="module")
def other_backbone_pib(tiny_model_dir, tmp_path_factory) -> str:
    return make_pib(tiny_model_dir("instructblip"), "instructblip", tmp_path_factory.mktemp("ib-pib"))


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bad") / "photo.png"
    path.write_text("this is not an image")
    return str(path)


BAD_INPUTS = {
    "not an image": (["--image", "{not_an_image}", "--prompt", "Hi"], "cannot decode image"),
    "missing image": (["--image", "{missing}", "--prompt", "Hi"], "image file not found"),
    "empty prompt": (["--prompt", "  "], "the prompt is empty"),
    "prompt too long": (["--prompt", "apple " * 1500], "the prompt is too long"),
    "image placeholder in prompt": (["--prompt", "look <image> here"], "the prompt cannot be used"),
    "pib of another backbone": (["--pib", "{other_pib}", "--prompt", "Hi"], "trained for backbone 'instructblip'"),
    "compare without pib": (["--prompt", "Hi", "--compare"], "--compare needs a PIB"),
    "no prompt": ([], "give --prompt TEXT"),
    "zero beams": (["--prompt", "Hi", "--num-beams", "0"], "bad decoding options: --num-beams"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_paragraph(case, capsys, llava, image_path, tmp_path, request):
    args, expected = BAD_INPUTS[case]
    values = {"not_an_image": "", "missing": str(tmp_path / "gone.jpg"), "other_pib": ""}
    if case == "not an image":
        values["not_an_image"] = request.getfixturevalue("not_an_image")
    if case == "pib of another backbone":
        values["other_pib"] = request.getfixturevalue("other_backbone_pib")
    args = [a.format(**values) for a in args]
    # the last --image wins in argparse: the case's own image replaces the good one
    code, out, err = generate(capsys, llava, image_path, *args)
    assert code == 2
    assert out == ""
    message = err[err.index("error: "):]
    assert expected in message
    assert message.count("\n") == 1 and "Traceback" not in err
