"""POPE: parity with the official position-based scoring on real LLaVA-1.5-13B answers, the
answer rule's edge cases, question formats, id checks, resumable answers and split building."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.evaluation import pope

DATA = Path(__file__).parent / "data" / "pope"  # copies of the official files (see tests/data/README.md)
COMBINED = DATA / "llava_pope_test.jsonl"
REFERENCE_ANSWERS = DATA / "llava_v1.5_13b_answers_reference.jsonl"
LABELS = DATA / "coco_e3e3926"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- the official script, re-implemented


def official_counts(answers: list[dict], label_file: Path) -> dict[str, int]:
    """LLaVA's eval_pope.py, independently: labels by position in the label file, answers by
    position among this category's answers, truncating to the shorter list."""
    labels = [0 if json.loads(line)["label"] == "no" else 1 for line in label_file.open()]
    preds = []
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    counts = Counter()
    for pred, label in zip(preds, labels):
        counts[("t" if pred == label else "f") + ("p" if pred == 1 else "n")] += 1
    return {k: counts[k] for k in ("tp", "fp", "tn", "fn")}


def official_scores(answers_path: Path) -> dict[str, dict[str, int]]:
    categories = {q["question_id"]: q["category"] for q in map(json.loads, COMBINED.open())}
    answers = [json.loads(line) for line in answers_path.open()]
    out = {}
    for name in sorted(os.listdir(LABELS)):
        category = name[len("coco_pope_") : -len(".json")]
        out[category] = official_counts([a for a in answers if categories[a["question_id"]] == category], LABELS / name)
    return out


def test_parity_with_official_script_on_real_answers(capsys):
    code, out, _ = run_cli(
        capsys,
        "eval",
        "pope",
        "score",
        "--answers",
        REFERENCE_ANSWERS,
        "--questions",
        COMBINED,
        "--labels",
        LABELS,
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    expected = official_scores(REFERENCE_ANSWERS)
    assert set(report) == {"random", "popular", "adversarial", "mean_f1"}
    for split, counts in expected.items():
        got = report[split]
        assert {k: got[k] for k in counts} == counts
        tp, fp, tn, fn = (counts[k] for k in ("tp", "fp", "tn", "fn"))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert got["total"] == tp + fp + tn + fn
        assert got["accuracy"] == (tp + tn) / (tp + fp + tn + fn)
        assert got["precision"] == precision and got["recall"] == recall
        assert got["f1"] == 2 * precision * recall / (precision + recall)
        assert got["yes_ratio"] == (tp + fp) / (tp + fp + tn + fn)
    assert report["random"]["total"] == 2910  # coco_e3e3926's random split
    assert report["mean_f1"] == sum(report[s]["f1"] for s in ("random", "popular", "adversarial")) / 3


def test_pairing_is_by_id_not_position(tmp_path, capsys):
    answers = [json.loads(line) for line in REFERENCE_ANSWERS.open()]
    random.Random(0).shuffle(answers)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", answers)
    code, out, _ = run_cli(
        capsys, "eval", "pope", "score", "--answers", shuffled, "--questions", COMBINED, "--labels", LABELS, "--json"
    )
    assert code == 0
    report = json.loads(out)
    expected = official_scores(REFERENCE_ANSWERS)
    for split, counts in expected.items():
        assert {k: report[split][k] for k in counts} == counts
    # pairing by position, as the official script does, gets the shuffled file wrong
    assert official_scores(shuffled) != expected


def test_table_output_in_percent(capsys):
    code, out, _ = run_cli(
        capsys, "eval", "pope", "score", "--answers", REFERENCE_ANSWERS, "--questions", COMBINED, "--labels", LABELS
    )
    assert code == 0
    counts = official_scores(REFERENCE_ANSWERS)["adversarial"]
    accuracy = 100 * (counts["tp"] + counts["tn"]) / sum(counts.values())
    row = next(line for line in out.splitlines() if line.startswith("adversarial"))
    assert row.split()[1] == f"{accuracy:.2f}"
    assert row.split()[-5:] == [str(counts[k]) for k in ("tp", "fp", "tn", "fn")] + [str(sum(counts.values()))]
    assert out.strip().splitlines()[-1].startswith("mean F1: ")


# ---------------------------------------------------------------- answer rule


@pytest.mark.parametrize(
    "text, is_yes",
    [
        ("Yes", True),
        ("No", False),
        ("no", False),
        ("NO", True),  # only No / no / not count
        ("Nope", True),
        ("Not", True),
        ("", True),
        ("not", False),
        ("There is not a dog.", False),
        ("No, there is no dog.", False),
        ("Yes, no doubt", False),  # commas dropped: "no" is a word
        ("Yes,no", True),  # comma dropped without a space: one word "Yesno"
        ("Yes. No.", True),  # only the first sentence counts
        ("Yes there is. There is not", True),
        (" no", False),
        ("no\n", True),  # split on single spaces: the word is "no\n"
        ("I do not know.", False),
    ],
)
def test_answer_rule(text, is_yes):
    assert pope.answer_is_yes(text) is is_yes


@given(st.text(alphabet="Nnot ,.Ye\ns", max_size=12), st.text(alphabet="Nnot ,.Ye\ns", max_size=12))
def test_stopping_at_sentence_end_never_changes_the_score(prefix, continuation):
    if pope.is_sentence_end(prefix):
        assert pope.answer_is_yes(prefix + continuation) == pope.answer_is_yes(prefix)
    else:
        assert "." not in prefix


def test_prompt_styles():
    question = "Is there a dog in the image?"
    assert pope.format_prompt(question, "hadpo") == question
    assert pope.format_prompt(question, "llava") == question + pope.LLAVA_SUFFIX
    assert pope.format_prompt(question + pope.LLAVA_SUFFIX, "llava") == question + pope.LLAVA_SUFFIX
    with pytest.raises(UserError, match="prompt style"):
        pope.format_prompt(question, "other")


# ---------------------------------------------------------------- question formats


def test_combined_file_maps_ids_to_label_rows():
    questions = pope.load_questions(COMBINED, LABELS)
    by_id = {q.question_id: q for q in questions}
    assert Counter(q.split for q in questions) == {"adversarial": 3000, "random": 2910, "popular": 3000}
    for split, offset in (("adversarial", 0), ("random", 10_000_000), ("popular", 20_000_000)):
        rows = [json.loads(line) for line in (LABELS / f"coco_pope_{split}.json").open()]
        for row_number in (1, 2, len(rows)):
            q, row = by_id[offset + row_number], rows[row_number - 1]
            assert (q.image, q.text, q.label, q.split) == (row["image"], row["text"], row["label"], split)
    assert not any(q.text.endswith(pope.LLAVA_SUFFIX) for q in questions)


def test_combined_file_with_another_version_of_labels_is_refused():
    with pytest.raises(UserError, match="another POPE version"):
        pope.load_questions(COMBINED, DATA / "coco_head")


def test_combined_id_outside_label_file(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    write_jsonl(
        labels / "coco_pope_random.json",
        [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}],
    )
    combined = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 10_000_002, "image": "a.jpg", "text": "Is there a cat in the image?", "category": "random"},
        ],
    )
    with pytest.raises(UserError, match="row 2 of coco_pope_random.json, which has 1 rows"):
        pope.load_questions(combined, labels)


def test_seem_json_array_and_answer_field(tmp_path, capsys):
    seem = DATA / "seem" / "gqa_pope_seem_adversarial.json"
    rows = json.loads(seem.read_text())
    texts = {r["question_id"]: ("Yes" if r["question_id"] % 3 else "No, there is not.") for r in rows}
    answers = write_jsonl(
        tmp_path / "answers.jsonl", [{"question_id": q, "answer": t} for q, t in reversed(texts.items())]
    )
    code, out, _ = run_cli(capsys, "eval", "pope", "score", "--answers", answers, "--questions", seem, "--json")
    assert code == 0
    expected = Counter()
    for r in rows:
        pred_yes, label_yes = texts[r["question_id"]] == "Yes", r["label"] == "yes"
        expected[("t" if pred_yes == label_yes else "f") + ("p" if pred_yes else "n")] += 1
    got = json.loads(out)["adversarial"]
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == {k: expected[k] for k in ("tp", "fp", "tn", "fn")}


def test_records_with_both_text_and_answer(tmp_path, capsys):
    """POPE's evaluate.py scores 'answer'; a record carrying a different 'text' is ambiguous:
    refused by default, scored from the field the user names, accepted when both agree."""
    questions = DATA / "coco_head" / "coco_pope_random.json"
    rows = [json.loads(line) for line in questions.open()]
    # 'answer' is the truth, 'text' its opposite: the two fields give opposite scores
    records = [
        {"question_id": r["question_id"], "text": "No." if r["label"] == "yes" else "Yes.", "answer": r["label"].capitalize()}
        for r in rows
    ]
    answers = write_jsonl(tmp_path / "answers.jsonl", records)
    argv = ["eval", "pope", "score", "--answers", answers, "--questions", questions, "--json"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and f"{answers} record 1: 'text'" in err and "--answer-field" in err
    for field, accuracy in (("answer", 1.0), ("text", 0.0)):
        code, out, _ = run_cli(capsys, *argv, "--answer-field", field)
        assert code == 0 and json.loads(out)["random"]["accuracy"] == accuracy
    same = write_jsonl(tmp_path / "same.jsonl", [{**r, "text": r["answer"]} for r in records])
    assert pope.read_answers(same) == {r["question_id"]: r["answer"] for r in records}


def test_several_split_files_in_one_report(tmp_path, capsys):
    argv = ["eval", "pope", "score", "--json"]
    for split in ("random", "popular"):
        questions = DATA / "coco_head" / f"coco_pope_{split}.json"
        ids = [json.loads(line)["question_id"] for line in questions.open()]
        answers = write_jsonl(tmp_path / f"{split}.jsonl", [{"question_id": i, "text": "Yes"} for i in ids])
        argv += ["--answers", answers, "--questions", questions]
    code, out, _ = run_cli(capsys, *argv)
    report = json.loads(out)
    assert code == 0 and list(report) == ["random", "popular", "mean_f1"]
    for split in ("random", "popular"):
        assert report[split]["yes_ratio"] == 1.0 and report[split]["fn"] == report[split]["tn"] == 0
        assert report[split]["recall"] == 1.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a[:-3], "3 questions have no answer"),
        (
            lambda a: a + [{"question_id": 99_999_999, "text": "Yes"}, {"question_id": 5, "text": "No"}],
            "1 duplicate question ids",
        ),
        (
            lambda a: a + [{"question_id": 99_999_999, "text": "Yes"}, {"question_id": 99_999_998, "text": "No"}],
            "2 answers have ids that are not questions",
        ),
        (lambda a: a[:1] + [{"question_id": 2}] + a[2:], "needs the answer as a 'text' (or 'answer') string"),
    ],
)
def test_answer_id_problems_are_clear_errors(tmp_path, capsys, mutate, message):
    answers = [json.loads(line) for line in REFERENCE_ANSWERS.open()]
    path = write_jsonl(tmp_path / "answers.jsonl", mutate(answers))
    code, _, err = run_cli(
        capsys, "eval", "pope", "score", "--answers", path, "--questions", COMBINED, "--labels", LABELS
    )
    assert code == 2
    assert message in err and str(path) in err


# ---------------------------------------------------------------- resumable answers file


def test_answer_writer_resumes_after_a_crash(tmp_path):
    path = tmp_path / "answers.jsonl"
    with pope.AnswerWriter(path) as writer:
        assert writer.answered == set()
        writer.write(1, "p1", "Yes")
        writer.write(2, "p2", "No", split="random")
        # flushed line by line: readable while the writer is still open
        assert pope.read_answers(path) == {1: "Yes", 2: "No"}
        with pytest.raises(ValueError, match="already answered"):
            writer.write(2, "p2", "Yes")
    # a crash in the middle of a write: the last line has no newline (whether or not it parses)
    with path.open("a") as handle:
        handle.write('{"question_id": 3, "prompt": "p3", "text": "No"}')
    with pope.AnswerWriter(path) as writer:
        assert writer.answered == {1, 2}
        writer.write(3, "p3", "Yes")
    with path.open("a") as handle:
        handle.write('{"question_id": 4, "prom')
    with pope.AnswerWriter(path) as writer:
        assert writer.answered == {1, 2, 3}
        writer.write(4, "p4", "No")
    assert pope.read_answers(path) == {1: "Yes", 2: "No", 3: "Yes", 4: "No"}
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 4


def test_answer_writer_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, \n{"question_id": 3, "text": "No"}\n')
    with pytest.raises(UserError, match=r"answers.jsonl:2: invalid JSON"):
        pope.AnswerWriter(path)


# ---------------------------------------------------------------- building splits

# distinct-enough frequencies to check popular/adversarial negatives by hand
IMAGES = {
    "img1.jpg": ["person", "dog", "frisbee"],
    "img2.jpg": ["person", "dog", "car", "bicycle"],
    "img3.jpg": ["cat", "couch", "tv"],
    "img4.jpg": ["person", "car", "bus"],
    "img5.jpg": ["dog", "dog"],  # one distinct object: never sampled
}


def coco_instances(path: Path) -> Path:
    names = sorted({o for objects in IMAGES.values() for o in objects})
    categories = [{"id": 10 + i, "name": n} for i, n in enumerate(names)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images = [{"id": 100 + i, "file_name": name} for i, name in enumerate(IMAGES)]
    annotations = [
        {"id": len(images) * 10 + j, "image_id": 100 + i, "category_id": cat_id[o]}
        for i, objects in enumerate(IMAGES.values())
        for j, o in enumerate(objects)
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def questions_by_image(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list] = {}
    for q in map(json.loads, path.open()):
        obj = q["text"].removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
        out.setdefault(q["image"], []).append((obj, q["label"]))
    return out


def test_build_splits_follow_pope_sampling(tmp_path, capsys):
    annotations = coco_instances(tmp_path / "instances_val2014.json")
    code, out, _ = run_cli(
        capsys,
        "eval",
        "pope",
        "build",
        "--annotations",
        annotations,
        "--images",
        4,
        "--seed",
        3,
        "--out",
        tmp_path / "out",
    )
    assert code == 0 and "coco_pope_adversarial.json: 24 questions" in out
    splits = {s: questions_by_image(tmp_path / "out" / f"coco_pope_{s}.json") for s in pope.SPLITS}
    for per_image in splits.values():
        assert set(per_image) == {"img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg"}
        for image, qs in per_image.items():
            assert [o for o, label in qs if label == "yes"] == IMAGES[image][:3]
            assert [label for _, label in qs] == ["yes", "no"] * 3
            negatives = [o for o, label in qs if label == "no"]
            assert len(set(negatives)) == 3 and not set(negatives) & set(IMAGES[image])

    def negatives(split: str, image: str) -> list[str]:
        return [o for o, label in splits[split][image] if label == "no"]

    # popular: person 3, then car and dog twice each, in the order they were first seen
    order = list(splits["popular"])  # the sampling order
    first_seen = list(dict.fromkeys(o for image in order for o in IMAGES[image]))
    car_dog = sorted(["car", "dog"], key=first_seen.index)
    assert negatives("popular", "img3.jpg") == ["person", *car_dog]
    # adversarial: person co-occurs with car and dog twice; frisbee only with person and dog
    assert negatives("adversarial", "img1.jpg")[:2] == ["car", "bicycle"]
    # the files are valid POPE question files: perfect answers score 1
    questions = pope.load_questions(tmp_path / "out" / "coco_pope_random.json")
    scores = pope.score(questions, {q.question_id: q.label.capitalize() for q in questions})
    assert scores["random"].accuracy == 1.0 and scores["random"].total == 24


# ---------------------------------------------------------------- POPE's sampling, re-implemented


def pope_reference_files(records: list[dict], img_num: int, seed: int, sample_num: int = 3) -> dict[str, str]:
    """What POPE's main.py writes after random.seed(seed), written here from its main.py and
    utils.py: one random stream for the image sample and then the random, popular and
    adversarial files in that order; counts in insertion-ordered dicts sorted with a stable
    descending sort; random negatives by rejection from the sampled images' objects. The
    question text is the published files' ("an" before a lower-case vowel)."""
    stream = random.Random(seed)
    pool = [r for r in records if len(r["objects"]) >= sample_num]
    chosen = stream.sample(pool, img_num)
    counts: dict[str, int] = {}
    pairs: dict[str, dict[str, int]] = {}
    for r in chosen:
        for o in r["objects"]:
            counts[o] = counts.get(o, 0) + 1
            row = pairs.setdefault(o, {})
            for other in r["objects"]:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    names = list(counts.keys())
    popular = [k for k, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]
    partners = {o: [k for k, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in pairs.items()}

    def line(qid: int, image: str, obj: str, label: str) -> str:
        text = ("Is there an {} in the image?" if obj[0] in "aeiou" else "Is there a {} in the image?").format(obj)
        return json.dumps({"question_id": qid, "image": image, "text": text, "label": label}) + "\n"

    files = {}
    for strategy in ("random", "popular", "adversarial"):
        lines: list[str] = []
        for r in chosen:
            history: list[str] = []
            for i in range(sample_num):
                pos = r["objects"][i]
                history.append(pos)
                lines.append(line(len(lines) + 1, r["image"], pos, "yes"))
                candidates = {"random": [], "popular": popular, "adversarial": partners[pos]}[strategy]
                picked = None
                for candidate in candidates:
                    if candidate not in history and candidate not in r["objects"]:
                        picked = candidate
                        break
                if picked is None:
                    picked = stream.choice(names)
                    while picked in history or picked in r["objects"]:
                        picked = stream.choice(names)
                history.append(picked)
                lines.append(line(len(lines) + 1, r["image"], picked, "no"))
        files[strategy] = "".join(lines)
    return files


COCO_NAMES = [line.split(",")[0].strip() for line in (Path(__file__).parent / "data" / "chair" / "synonyms.txt").open()
              if line.strip()]


def coco_shaped_records(n: int, seed: int) -> list[dict]:
    """COCO-like annotations: 80 categories with skewed frequencies ("person" everywhere),
    1-12 distinct objects per image in annotation order, COCO file names."""
    rng = random.Random(seed)
    weights = [3.0] + [1.0 / (1 + i) ** 0.8 for i in range(len(COCO_NAMES) - 1)]
    records = []
    for i in range(n):
        objects: list[str] = []
        for _ in range(rng.randint(1, 12)):
            name = rng.choices(COCO_NAMES, weights)[0]
            if name not in objects:
                objects.append(name)
        records.append({"image": f"COCO_val2014_{100000 + 7 * i:012d}.jpg", "objects": objects})
    return records


@pytest.mark.parametrize("seed, sample_num", [(0, 3), (1, 3), (2024, 4), (5, 1)])
def test_build_equals_pope_sampling_on_coco_shaped_annotations(tmp_path, capsys, seed, sample_num):
    records = coco_shaped_records(1200, seed=seed)
    path = write_jsonl(tmp_path / "segmentation.jsonl", records)
    argv = ["eval", "pope", "build", "--annotations", path, "--images", 500, "--seed", seed, "--out", tmp_path / "out"]
    code, _, _ = run_cli(capsys, *argv, "--sample-num", sample_num)
    assert code == 0
    expected = pope_reference_files(records, 500, seed, sample_num)
    for split in pope.SPLITS:
        assert (tmp_path / "out" / f"coco_pope_{split}.json").read_text() == expected[split], split
        assert len(expected[split].splitlines()) == 500 * sample_num * 2


def test_build_equals_pope_sampling_on_the_world(tmp_path):
    """The world has 12 object kinds: popular and adversarial candidates often run out, so the
    random fallback (and its shared random stream) is exercised in every split."""
    from mllm_pib.demo.world import World, export_dataset

    paths = export_dataset(World(3).sample(150), tmp_path / "world", seed=3)
    records = [{"image": r["image"], "objects": r["objects"]} for r in map(json.loads, paths.objects.open())]
    for seed in (0, 7):
        got = pope.build_splits(pope.load_object_images(paths.objects), 60, seed)
        written = pope.write_splits(got, tmp_path / f"out{seed}")
        expected = pope_reference_files(records, 60, seed)
        assert [p.read_text() for p in written] == [expected[s] for s in pope.SPLITS]


def test_build_is_seeded_and_reads_simple_jsonl(tmp_path):
    coco = pope.load_object_images(coco_instances(tmp_path / "instances.json"))
    simple = pope.load_object_images(
        write_jsonl(tmp_path / "objects.jsonl", [{"image": k, "objects": v} for k, v in IMAGES.items()])
    )
    assert coco == simple
    runs = [pope.build_splits(simple, 4, seed) for seed in (0, 0, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert any(run != runs[0] for run in runs[2:])
    assert [q["question_id"] for q in runs[0]["popular"]] == list(range(1, 25))


def test_build_needs_enough_images(tmp_path):
    images = pope.load_object_images(coco_instances(tmp_path / "instances.json"))
    with pytest.raises(UserError, match="only 4 images have at least 3 objects"):
        pope.build_splits(images, 5, 0)


def test_build_refuses_when_no_negative_is_left(tmp_path):
    images = [pope.ObjectImage("only.jpg", ("cat", "dog", "bird"))]
    with pytest.raises(UserError, match="only.jpg: every object of the sampled images is present"):
        pope.build_splits(images, 1, 0)
