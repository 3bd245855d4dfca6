"""The web demo: object marks, the request logic, the ``ui`` command, and the page in a real
headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from conftest import make_pib

from mllm_pib.chat import DecodingOptions
from mllm_pib.checkpoint import load_model
from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.evaluation.chair import ChairVocabulary, singularize
from mllm_pib.evaluation.shr import DESCRIBE_PROMPT
from mllm_pib.ui import ASK, CONFIRMED, DESCRIBE, HALLUCINATED, Demo, ObjectIndex

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
)
TOKENS = 12


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pope_question(question_id: int, image: str, obj: str, label: str) -> dict:
    return {"question_id": question_id, "image": image, "text": f"Is there {obj} in the image?", "label": label}


def marked(segments) -> list[tuple[str, str]]:
    return [(text, label) for text, label in segments if label is not None]


# ---------------------------------------------------------------------------- object marks


def test_annotations_mark_every_unlisted_object(tmp_path):
    path = write_jsonl(tmp_path / "objects.jsonl", [
        {"image": "val/kitchen_1.jpg", "objects": ["cat", "dining table", "wooden spoon", "lamp post"]},
    ])
    index = ObjectIndex.load(annotations=path)
    known = index.lookup("kitchen_1.png")  # matched by name without extension
    text = "Two cats sit by a dining table with a dog, a wooden spoon and a lamp post; no lamp."
    segments = index.mark(text, known)
    assert "".join(t for t, _ in segments) == text
    assert marked(segments) == [
        ("cats", CONFIRMED), ("dining table", CONFIRMED), ("dog", HALLUCINATED),
        ("spoon", CONFIRMED),  # "wooden spoon" is the COCO spoon
        ("lamp post", CONFIRMED),  # an annotated name that is no COCO object
    ]
    assert known.sources == ("object annotations",)
    assert index.lookup("other.png") is None


def test_pope_questions_mark_only_what_they_ask(tmp_path):
    path = write_jsonl(tmp_path / "coco_pope_random.json", [
        pope_question(1, "COCO_val2014_000000000042.jpg", "a dog", "yes"),
        pope_question(2, "COCO_val2014_000000000042.jpg", "a traffic light", "no"),
        pope_question(3, "COCO_val2014_000000000099.jpg", "an apple", "no"),
    ])
    index = ObjectIndex.load(pope_questions=path)
    known = index.lookup("COCO_val2014_000000000042.jpg")
    text = "A dog waits near traffic lights and a car."
    assert marked(index.mark(text, known)) == [("dog", CONFIRMED), ("traffic lights", HALLUCINATED)]  # car: unknown
    assert not known.complete


def test_both_sources_combine(tmp_path):
    annotations = write_jsonl(tmp_path / "objects.jsonl", [{"image": "a.jpg", "objects": ["person"]}])
    pope = write_jsonl(tmp_path / "pope.json", [pope_question(7, "a.jpg", "a bench", "no")])
    known = ObjectIndex.load(annotations, pope).lookup("a.jpg")
    assert known.present == {"person"} and known.absent == {"bench"} and known.complete
    assert known.sources == ("object annotations", "POPE questions")


@pytest.mark.parametrize("text", [
    "A man rides a motorbike past two traffic lights and a hot dog stand.",
    "The toilet seat is up; a seat stands beside the toilet.",
    "Baby elephants and a passenger train near the home plate.",
    "Knives, forks and wine glasses on a dining table.",
])
def test_spans_find_what_chair_finds(text, tmp_path):
    index = ObjectIndex.load(annotations=write_jsonl(tmp_path / "o.jsonl", [{"image": "a.jpg", "objects": ["car"]}]))
    assert [s.object for s in index.spans(text)] == [m.object for m in ChairVocabulary.from_file().mentions(text)]


def test_spans_cover_the_words_as_written(tmp_path):
    index = ObjectIndex.load(annotations=write_jsonl(tmp_path / "o.jsonl", [{"image": "a.jpg", "objects": ["car"]}]))
    text = "A Man rides a motorbike past two traffic lights and a hot dog stand."
    assert [text[s.start:s.end] for s in index.spans(text)] == ["Man", "motorbike", "traffic lights", "hot dog"]


def test_bad_pope_question_names_file_and_id(tmp_path):
    path = write_jsonl(tmp_path / "pope.json", [
        {"question_id": 5, "image": "a.jpg", "text": "What colour is the car?", "label": "no"},
    ])
    with pytest.raises(UserError, match=r"pope\.json question 5: cannot find the object"):
        ObjectIndex.load(pope_questions=path)


def test_bad_annotations_name_the_record(tmp_path):
    records = [{"image": "a.jpg", "objects": ["cat"]}, {"image": "b.jpg", "objects": "cat"}]
    path = write_jsonl(tmp_path / "objects.jsonl", records)
    with pytest.raises(UserError, match=r"objects\.jsonl record 2: field 'objects'"):
        ObjectIndex.load(annotations=path)


# ---------------------------------------------------------------------------- the demo's logic


@pytest.fixture(scope="module")
def model(llava, pib):
    return load_model(llava, backbone="llava", pib=pib)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "kitchen_0001.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(path)
    return path


def expected_answers(model, image_path: Path, question: str) -> dict[str, str]:
    image = Image.open(image_path).convert("RGB")
    return {
        variant: model.generate_text([image], [question], max_new_tokens=TOKENS, bypass_pib=bypass)[0]
        for variant, bypass in (("base", True), ("pib", False))
    }


def text_of(segments) -> str:
    return "".join(text for text, _ in segments)


@pytest.mark.parametrize("mode, prompt, question", [(ASK, "What is this?", "What is this?"),
                                                     (DESCRIBE, "ignored", DESCRIBE_PROMPT)])
def test_demo_answers_are_the_models(mode, prompt, question, model, image_path, tmp_path):
    annotations = write_jsonl(tmp_path / "o.jsonl", [{"image": "kitchen_0001.jpg", "objects": ["cat"]}])
    index = ObjectIndex.load(annotations=annotations)
    response = Demo(model, DecodingOptions(max_new_tokens=TOKENS), index).respond(str(image_path), mode, prompt)
    expected = expected_answers(model, image_path, question)
    assert expected["base"] != expected["pib"], "the test PIB must change the answer"
    assert (text_of(response.base), text_of(response.pib)) == (expected["base"], expected["pib"])
    status = response.status.replace("\\", "")
    assert "object annotations of kitchen_0001.png" in status and "In the image: cat." in status


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad-upload") / "notes.png"
    path.write_text("these are notes, not an image")
    return path


@pytest.mark.parametrize("upload, prompt, message", [
    (None, "What is this?", "upload an image first"),
    ("bad", "What is this?", "cannot decode image notes.png"),
    ("good", "   ", "the prompt is empty"),
    ("good", "apple " * 1500, "the prompt is too long"),
])
def test_demo_bad_input_gives_an_error_status(upload, prompt, message, model, image_path, not_an_image):
    file = {None: None, "bad": str(not_an_image), "good": str(image_path)}[upload]
    response = Demo(model, DecodingOptions(max_new_tokens=TOKENS)).respond(file, ASK, prompt)
    plain = response.status.replace("\\", "")
    assert plain.startswith("**Error:** ") and message in plain
    assert str(not_an_image.parent) not in plain  # the upload's temporary folder is not shown
    assert response.base == [] and response.pib == []


def test_demo_preview(model, image_path, not_an_image):
    demo = Demo(model, DecodingOptions(max_new_tokens=TOKENS))
    image, status = demo.preview(str(image_path))
    assert image.size == (64, 40) and status == ""
    image, status = demo.preview(str(not_an_image))
    assert image is None and "cannot decode image notes" in status.replace("\\", "")


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def other_backbone_pib(tiny_model_dir, tmp_path_factory) -> str:
    return make_pib(tiny_model_dir("instructblip"), "instructblip", tmp_path_factory.mktemp("ib-pib"))


@pytest.mark.parametrize("case, extra, message", [
    ("no pib", [], "the web demo needs a PIB"),
    ("pib of another backbone", ["--pib", "{other}"], "trained for backbone 'instructblip'"),
    ("bad port", ["--pib", "{pib}", "--port", "0"], "--port must be between 1 and 65535"),
    ("bad annotations", ["--pib", "{pib}", "--annotations", "{missing}"], "gone.jsonl"),
])
def test_ui_command_refuses_bad_setup(case, extra, message, capsys, llava, pib, tmp_path, request):
    other = request.getfixturevalue("other_backbone_pib") if case == "pib of another backbone" else ""
    extra = [a.format(other=other, pib=pib, missing=tmp_path / "gone.jsonl") for a in extra]
    assert main(["ui", "--backbone", "llava", "--model", llava, *extra]) == 2
    err = capsys.readouterr().err
    error = err[err.index("error: "):]  # after any progress bars of the fixtures
    assert message in error and error.count("\n") == 1


def test_ui_command_reports_a_taken_port(capsys, llava, pib):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--backbone", "llava", "--model", llava, "--pib", pib, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot serve on 127.0.0.1:{port}: the port is taken" in err


# ---------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's Chromium and chromedriver, installed when missing; skips only where they cannot be."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium cannot be installed: no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    output = ""
    for command in (install, ["apt-get", "update", "-q"], install):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        if command is install and done.returncode == 0 and CHROMIUM.exists() and CHROMEDRIVER.exists():
            return
    pytest.skip(f"Chromium cannot be installed with apt-get: {output.strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], log: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Run ``mllm-pib ui`` and wait until the page answers."""
    port = free_port()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "mllm_pib.cli", "ui", *args, "--port", str(port)],
                                   stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the ui server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                if page.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"the ui server did not answer within {timeout} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def browser(chromium, tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def upload(driver, path: Path) -> None:
    clear = driver.find_elements(By.CSS_SELECTOR, "#image-file button[aria-label='Clear']")
    if clear:
        clear[0].click()
    field = WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#image-file input[type=file]"))[0]
    field.send_keys(str(path))


def set_prompt(driver, text: str) -> None:
    area = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        area, text)


def wait_for_status(driver, text: str) -> None:
    WebDriverWait(driver, 60).until(lambda d: text in d.find_element(By.ID, "status").text,
                                    message=f"status never showed {text!r}")


def shown_answer(driver, elem_id: str) -> list[tuple[str, str | None]]:
    """The answer's segments as displayed, labelled through the legend's colours."""
    legend = {b.value_of_css_property("background-color"): b.text
              for b in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} .legend-item")}
    segments = []
    for token in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} .textfield .token"):
        text = token.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
        highlighted = "highlighted" in token.get_attribute("class").split()
        segments.append((text, legend[token.value_of_css_property("background-color")] if highlighted else None))
    return segments


def normalised(word: str) -> str:
    return singularize(word.lower())


def test_page_compares_answers_marks_objects_and_survives_bad_input(browser, model, llava, pib, image_path,
                                                                    not_an_image, tmp_path):
    expected = expected_answers(model, image_path, DESCRIBE_PROMPT)
    words = [w for w in re.findall(r"[A-Za-z]{3,}", expected["pib"]) if normalised(w) != "cat"]
    assert words, f"the PIB answer {expected['pib']!r} must hold a word to mark"
    # Another image lists the word as an object, so it is an object word; this image's complete
    # annotations lack it, so the page must mark it as not in the image.
    annotations = write_jsonl(tmp_path / "objects.jsonl", [
        {"image": "train/kitchen_0001.jpg", "objects": ["cat"]},
        {"image": "other_0002.jpg", "objects": [words[0]]},
    ])
    log = tmp_path / "server.log"
    process, url = start_server(["--backbone", "llava", "--model", llava, "--pib", pib, "--annotations", annotations,
                                 "--max-new-tokens", str(TOKENS)], log)
    try:
        browser.get(url)
        upload(browser, image_path)
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        browser.find_element(By.ID, "submit").click()
        wait_for_status(browser, "the prompt is empty")
        set_prompt(browser, "apple " * 1500)
        browser.find_element(By.ID, "submit").click()
        wait_for_status(browser, "the prompt is too long")
        upload(browser, not_an_image)
        wait_for_status(browser, "cannot decode image notes.png")

        upload(browser, image_path)  # the server is still serving after all that
        browser.find_element(By.XPATH, f"//*[@id='mode']//label[contains(., '{DESCRIBE}')]").click()
        browser.find_element(By.ID, "submit").click()
        wait_for_status(browser, "object annotations of kitchen_0001.png")
        base, pib_answer = shown_answer(browser, "answer-base"), shown_answer(browser, "answer-pib")
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "ui.png"
        browser.save_screenshot(str(shot))
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "test-artifacts" / "ui.png")
    finally:
        stop(process)
    assert "".join(t for t, _ in base) == expected["base"]
    assert "".join(t for t, _ in pib_answer) == expected["pib"]
    target = normalised(words[0])
    answer_words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", expected["pib"], re.IGNORECASE | re.ASCII)
    wanted = [w for w in answer_words if normalised(w) == target]
    assert marked(pib_answer) == [(w, HALLUCINATED) for w in wanted]
    assert "Running on local URL:  http://127.0.0.1:" in log.read_text()  # loopback by default
