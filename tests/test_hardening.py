"""Bad input at every entry point: each gets one clear paragraph (exit code 2) or a counted skip,
never a traceback and never a partial output; and property-based tests (hypothesis) of the POPE
scorer, the preference data readers and the config loader."""

import io
import json
import random
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mllm_pib.cli import main
from mllm_pib.config import TrainConfig, load_config
from mllm_pib.data.images import ImageResolver
from mllm_pib.data.records import BadRecordBudget, read_desc_data, read_generic
from mllm_pib.errors import UserError
from mllm_pib.evaluation.pope import PopeQuestion, answer_is_yes, score
from test_training import write_config

PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expecting a clear refusal: exit code 2 and one paragraph, no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    paragraph = err[err.index("error: "):].strip()
    assert "\n\n" not in paragraph
    return paragraph


# ---------------------------------------------------------------------------- bad files


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def noise_png(size: int = 48) -> bytes:
    rng = random.Random(0)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Good images in every mode, and bad ones of every kind."""
    root = tmp_path_factory.mktemp("images")
    for mode, suffix in (("RGB", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"),
                         ("CMYK", "tiff"), ("I;16", "tiff")):
        Image.new(mode, (24, 16)).save(root / f"{mode.replace(';', '')}.{suffix}")
    (root / "png_named.jpg").write_bytes(noise_png())  # wrong extension: the content decides
    (root / "text.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "cut.png").write_bytes(noise_png()[:400])
    (root / "bomb.png").write_bytes(png_header(40000, 40000))
    return root


GOOD_IMAGES = ["RGB.png", "L.png", "LA.png", "P.png", "RGBA.png", "CMYK.tiff", "I16.tiff", "png_named.jpg"]
BAD_IMAGES = {
    "text.png": "cannot identify image file",
    "empty.jpg": "cannot identify image file",
    "cut.png": "cannot decode image",
    "bomb.png": "decompression bomb",
    "missing.png": "image file not found",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_generate_refuses_a_bad_image_in_one_paragraph(name, images, llava, capsys):
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", llava, "--image",
                      str(images / name), "--prompt", "What is it?", "--max-new-tokens", "2")
    assert str(images / name) in error and BAD_IMAGES[name] in error


def test_generate_takes_a_png_named_jpg(images, llava, capsys):
    assert main(["generate", "--backbone", "llava", "--model", llava, "--image", str(images / "png_named.jpg"),
                 "--prompt", "What is it?", "--max-new-tokens", "2", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["prompt"] == "What is it?" and len(reply["answers"]) == 1


def mixed_records(images: Path) -> tuple[list[str], dict[str, int]]:
    """JSON lines of good records (every image mode, unicode) and bad ones, and the expected
    count of each skip reason."""
    def record(image="RGB.png", **fields) -> str:
        return json.dumps({"image": image, "prompt": "What is here?", "chosen": "A square.",
                           "rejected": "A star.", **fields}, ensure_ascii=False)

    good = [record(name) for name in GOOD_IMAGES] + [
        record(prompt="Что здесь? 这是什么？ ما هذا؟ 🐱\u2028 second line"),
        record(chosen="Un carré — «oui» 🟥", rejected="\u200b星"),
    ]
    bad = {
        "malformed JSON": ['{"image": "RGB.png", "prompt": '],
        "wrong type": [record(prompt=5), record(chosen=["a"]), record(image=True), "[1, 2]", '"text"'],
        "missing field": [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}), record(rejected=None)],
        "empty answer": [record(chosen=""), record(rejected="   ")],
        "empty prompt": [record(prompt="")],
        "bad image": [record(name) for name in BAD_IMAGES],
    }
    lines = good + [line for group in bad.values() for line in group]
    random.Random(0).shuffle(lines)
    return lines, {reason: len(group) for reason, group in bad.items()}


def generic_config(tmp_path, llava, hadpo_dir, images, lines) -> Path:
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return write_config(tmp_path, "llava", llava, hadpo_dir, data=[
        {"format": "generic", "path": str(tmp_path / "mixed.jsonl"), "images": str(images)}])


def test_training_counts_every_bad_record_and_trains_on_the_rest(tmp_path, llava, hadpo_dir, images, capsys):
    lines, expected = mixed_records(images)
    config = generic_config(tmp_path, llava, hadpo_dir, images, lines)
    assert main(["train", "--config", str(config), "--set", "max_bad_records=100", "--set", "training.max_steps=1",
                 "--set", "training.save_steps=100", "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    kept = len(GOOD_IMAGES) + 2
    assert f"data: {kept} preference pairs" in err
    summary = err[err.rindex("data: ") + len("data: "):].splitlines()[0]
    counts = dict((reason, int(n)) for n, reason in
                  (part.split(" ", 1) for part in summary.split("(", 1)[1].rstrip(")").split(", ")))
    assert counts == expected
    assert summary.startswith(f"{sum(expected.values())} records skipped")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_training_past_the_bad_record_budget_stops_before_writing(tmp_path, llava, hadpo_dir, images, capsys):
    lines, expected = mixed_records(images)
    config = generic_config(tmp_path, llava, hadpo_dir, images, lines)
    error = cli_error(capsys, "train", "--config", str(config), "--set", "max_bad_records=3",
                      "--output-dir", str(tmp_path / "out"))
    assert "4 bad records, more than max_bad_records=3" in error and str(tmp_path / "mixed.jsonl") in error
    assert "raise max_bad_records" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- bad configs

CONFIG_ERRORS = [
    (["--set", "pib.num_head=4"], "pib.num_head: unknown key; valid keys here:"),
    (["--set", "loss.beta=high"], "loss.beta: Input should be a valid number"),
    (["--set", "max_length=0"], "max_length: Input should be greater than 0"),
    (["--set", "data=7"], "data: Input should be a valid list"),
    (["--set", "training.max_steps=many"], "training.max_steps: expected a number, got 'many'"),
    (["--set", "training.use_cpu=3"], "training.use_cpu: expected true or false, got 3"),
    (["--set", "training.learning_rat=0.1"], "did you mean learning_rate"),
    (["--set", "feature_cache=cache", "--set", "freeze=projector"], "feature_cache: Value error, the cache holds frozen"),
    (["--set", "feature_cache=cache", "--set", "freeze={parts: {pib: train, llm: lora}}"], "drop feature_cache"),
    (["--set", "pib.num_heads=3"], "pib: hidden_size 64 is not divisible by num_heads 3 (backbone 'llava')"),
    (["--set", "freeze={parts: {vision: lora}}"], "'lora' applies to the llm only, not to 'vision'"),
    (["--set", "freeze={parts: {wings: train}}"], "the freeze policy names wings"),
    (["--set", "backbone=nowhere"], "unknown backbone 'nowhere'"),
    (["--set", "training.deepspeed=missing.json"], "existing deepspeed config"),
    (["--set", "novalue"], "expected key=value"),
]


@pytest.mark.parametrize("args, message", CONFIG_ERRORS, ids=[" ".join(a[1::2]) for a, _ in CONFIG_ERRORS])
def test_bad_config_is_one_paragraph(args, message, tmp_path, llava, hadpo_dir, capsys):
    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    error = cli_error(capsys, "train", "--config", str(config), *args, "--output-dir", str(tmp_path / "out"))
    assert message in error
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unreadable_config_files(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("backbone: [llava\n")
    assert "invalid YAML" in cli_error(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "must be a mapping" in cli_error(capsys, "train", "--config", str(tmp_path / "list.yaml"))
    assert "config file not found" in cli_error(capsys, "train", "--config", str(tmp_path / "none.yaml"))


# ---------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def damaged(tmp_path, pib) -> dict[str, Path]:
    """Copies of a llava PIB checkpoint, each damaged in one way."""
    import shutil

    made = {}
    for name in ("hidden", "cut"):
        made[name] = Path(shutil.copytree(pib, tmp_path / name))
    meta = json.loads((made["hidden"] / "pib_checkpoint.json").read_text())
    meta["base_model"]["hidden_size"] = 4096  # as written for a 7B model
    (made["hidden"] / "pib_checkpoint.json").write_text(json.dumps(meta))
    weights = made["cut"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["pickle"] = tmp_path / "pib.bin"
    made["pickle"].write_bytes(b"\x80\x04K\x01.")  # pickle of the integer 1
    return made


def test_checkpoint_for_another_backbone_hidden_size_or_damaged(damaged, pib, llava, tiny_model_dir, images, capsys):
    ask = ["--image", str(images / "RGB.png"), "--prompt", "What?", "--max-new-tokens", "2"]
    error = cli_error(capsys, "generate", "--backbone", "instructblip", "--model", tiny_model_dir("instructblip"),
                      "--pib", pib, *ask)
    assert "trained for backbone 'llava'" in error and "not 'instructblip'" in error
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", llava, "--pib", str(damaged["hidden"]), *ask)
    assert "trained for hidden_size 4096 but the loaded backbone has 64" in error
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", llava, "--pib", str(damaged["cut"]), *ask)
    assert str(damaged["cut"] / "model.safetensors") in error and "may be truncated" in error
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", llava, "--pib", str(damaged["pickle"]), *ask)
    assert "a pickle file" in error and "never unpickled" in error


def test_export_refuses_a_pickle_and_a_base_of_another_backbone(damaged, pib, tiny_model_dir, tmp_path, capsys):
    error = cli_error(capsys, "export", "--pib", str(damaged["pickle"]), "--base", tiny_model_dir("llava"),
                      str(tmp_path / "a"))
    assert "never unpickled" in error
    error = cli_error(capsys, "export", "--pib", pib, "--base", tiny_model_dir("instructblip"), str(tmp_path / "b"))
    assert f"{tiny_model_dir('instructblip')}: cannot be loaded as a 'llava' model" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_truncated_base_model_weights(tmp_path, llava, images, capsys):
    import shutil

    base = Path(shutil.copytree(llava, tmp_path / "base"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", str(base), "--image",
                      str(images / "RGB.png"), "--prompt", "What?")
    assert f"{base}: cannot be loaded as a 'llava' model (SafetensorError" in error


# ---------------------------------------------------------------------------- POPE scorer

WORD = st.text(alphabet="NnoOtYesy!?'", min_size=0, max_size=5)
SENTENCE = st.lists(WORD, max_size=6).map(" ".join)


@given(SENTENCE, st.text(max_size=20))
def test_only_the_first_sentence_counts(first, rest):
    assume("." not in first)
    assert answer_is_yes(f"{first}.{rest}") == answer_is_yes(first)


@given(st.lists(WORD, max_size=6), st.integers(min_value=0, max_value=6), st.sampled_from(["No", "no", "not"]))
def test_a_no_word_anywhere_in_the_first_sentence_means_no(words, where, no):
    words.insert(min(where, len(words)), no)
    assert not answer_is_yes(" ".join(words))
    assert not answer_is_yes(", ".join(words) + ". Yes, yes.")  # commas are dropped, the rest ignored


@given(st.lists(WORD.filter(lambda w: w not in ("No", "no", "not")), max_size=6))
def test_without_an_exact_no_word_the_answer_is_yes(words):
    assert answer_is_yes(" ".join(words))


LABELS = st.lists(st.tuples(st.sampled_from(["yes", "no"]), st.sampled_from(["random", "popular", "adversarial"]),
                            st.sampled_from(["Yes", "No", "no.", "Yes, there is.", "There is not.", "", "NO"])),
                  min_size=1, max_size=40)


@given(LABELS, st.randoms(use_true_random=False))
def test_pope_counts_add_up_and_ignore_question_order(rows, rng):
    questions = [PopeQuestion(i, f"{i}.jpg", "Is there a cat?", label, split) for i, (label, split, _) in enumerate(rows)]
    answers = {i: text for i, (_, _, text) in enumerate(rows)}
    scores = score(questions, answers)
    for split, s in scores.items():
        ours = [(label, answer_is_yes(text)) for label, sp, text in rows if sp == split]
        assert (s.tp, s.fn, s.fp, s.tn) == (
            sum(lab == "yes" and yes for lab, yes in ours), sum(lab == "yes" and not yes for lab, yes in ours),
            sum(lab == "no" and yes for lab, yes in ours), sum(lab == "no" and not yes for lab, yes in ours))
        assert 0 <= s.accuracy <= 1 and 0 <= s.f1 <= 1 and 0 <= s.yes_ratio <= 1
    shuffled = list(questions)
    rng.shuffle(shuffled)
    assert score(shuffled, answers) == scores


@given(LABELS)
def test_flipping_every_answer_swaps_the_confusion_counts(rows):
    questions = [PopeQuestion(i, f"{i}.jpg", "q", label, split) for i, (label, split, _) in enumerate(rows)]
    answers = {i: text for i, (_, _, text) in enumerate(rows)}
    flipped = {i: "No" if answer_is_yes(text) else "Yes" for i, text in answers.items()}
    for split, s in score(questions, answers).items():
        f = score(questions, flipped)[split]
        assert (f.tp, f.fn, f.fp, f.tn) == (s.fn, s.tp, s.tn, s.fp)


@given(LABELS, st.data())
def test_an_answer_missing_or_extra_is_refused(rows, data):
    questions = [PopeQuestion(i, f"{i}.jpg", "q", label, split) for i, (label, split, _) in enumerate(rows)]
    answers = {i: text for i, (_, _, text) in enumerate(rows)}
    dropped = data.draw(st.sampled_from(sorted(answers)))
    with pytest.raises(UserError, match="questions have no answer"):
        score(questions, {i: t for i, t in answers.items() if i != dropped})
    with pytest.raises(UserError, match="ids that are not questions"):
        score(questions, {**answers, len(rows) + 5: "Yes"})


# ---------------------------------------------------------------------------- data readers

JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
FIELD = st.one_of(JSON_SCALAR, st.lists(JSON_SCALAR, max_size=2), st.text(max_size=12))
RECORD = st.dictionaries(st.sampled_from(["image", "prompt", "chosen", "rejected", "extra"]), FIELD, max_size=5)
LINE = st.one_of(RECORD.map(json.dumps), JSON_SCALAR.map(json.dumps), st.text(max_size=10))


@PROPERTIES
@given(st.lists(LINE, max_size=25))
def test_generic_reader_keeps_or_counts_every_line(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    budget = BadRecordBudget(10_000)
    pairs = list(read_generic(path, ImageResolver(tmp_path), budget))
    records = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(pairs) + len(budget.skipped) == len(records)
    for pair in pairs:
        original = json.loads(records[pair.index])
        assert (pair.prompt, pair.chosen, pair.rejected) == (original["prompt"], original["chosen"], original["rejected"])
        assert all(isinstance(v, str) for v in (pair.prompt, pair.chosen, pair.rejected))
        assert pair.image == ImageResolver(tmp_path)(original["image"])
    assert sorted([p.index for p in pairs] + [s[1] for s in budget.skipped]) == list(range(len(records)))


@PROPERTIES
@given(st.lists(LINE, max_size=12), st.integers(min_value=0, max_value=5))
def test_the_budget_stops_exactly_past_its_limit(tmp_path, lines, limit):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    counted = BadRecordBudget(10_000)
    list(read_generic(path, ImageResolver(tmp_path), counted))
    if len(counted.skipped) > limit:
        with pytest.raises(UserError, match=f"more than max_bad_records={limit}"):
            list(read_generic(path, ImageResolver(tmp_path), BadRecordBudget(limit)))
    else:
        list(read_generic(path, ImageResolver(tmp_path), BadRecordBudget(limit)))


ANSWERS = st.lists(st.text(min_size=1, max_size=10), max_size=3)
DESC = st.dictionaries(st.from_regex(r"[0-9]{1,4}", fullmatch=True),
                       st.one_of(st.fixed_dictionaries({"chosen": ANSWERS, "rejected": ANSWERS}), FIELD), max_size=6)


@PROPERTIES
@given(DESC)
def test_desc_reader_pairs_every_chosen_with_every_rejected(tmp_path, data):
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    budget = BadRecordBudget(10_000)
    pairs = list(read_desc_data(path, ImageResolver(tmp_path), budget))
    valid = {key: v for key, v in data.items() if isinstance(v, dict)}
    assert len(pairs) == sum(len(v["chosen"]) * len(v["rejected"]) for v in valid.values())
    assert len(budget.skipped) == len(data) - len(valid)
    assert {(p.chosen, p.rejected) for p in pairs} == {(c, r) for v in valid.values() for c in v["chosen"] for r in v["rejected"]}


# ---------------------------------------------------------------------------- config loader

KEYS = st.sampled_from(["loss.beta", "loss.type", "max_length", "pib.num_heads", "freeze", "training.max_steps",
                        "training.learning_rate", "max_bad_records", "pib.dropout", "loss.label_smoothing",
                        "bootstrap.seed", "data", "nonsense", "loss.nonsense", "training.nonsense"])
VALUES = st.one_of(st.sampled_from(["0.2", "1e-3", "-1", "ipo", "stage2", "[]", "{}", "true", "null", "x: [", "7"]),
                   st.text(max_size=8))


@PROPERTIES
@given(st.lists(st.tuples(KEYS, VALUES).map("=".join), max_size=4))
def test_config_loader_returns_a_config_or_a_user_error(tmp_path, overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"backbone": "llava", "data": [{"format": "generic", "path": "d.jsonl"}]}))
    try:
        config = load_config(path, overrides)
    except UserError as err:
        assert str(err)
        return
    assert isinstance(config, TrainConfig)
    try:
        config.training_arguments()
    except UserError:
        pass


@PROPERTIES
@given(st.floats(min_value=1e-6, max_value=1e3, allow_nan=False), st.integers(min_value=1, max_value=4096),
       st.sampled_from(["sigmoid", "ipo", "hinge", "robust"]))
def test_overrides_land_and_a_dumped_config_loads_back_equal(tmp_path, beta, length, loss):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"backbone": "llava", "data": [{"format": "generic", "path": "d.jsonl"}]}))
    config = load_config(path, [f"loss.beta={beta!r}", f"max_length={length}", f"loss.type={loss}"])
    assert (config.loss.beta, config.max_length, config.loss.type) == (beta, length, loss)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert load_config(tmp_path / "again.yaml") == config
