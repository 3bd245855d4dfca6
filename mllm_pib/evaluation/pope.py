"""POPE: polling-based object probing ("Is there a <object> in the image?").

Question sets come in three published layouts, all read by :func:`load_questions`:

- one split per file, JSON lines ``{"question_id", "image", "text", "label"}`` (the official
  ``coco_pope_{split}.json`` files, despite their ``.json`` name);
- the same records as one pretty-printed JSON array (the SEEM-based A-OKVQA/GQA files);
- LLaVA's combined ``llava_pope_test.jsonl`` (``"category"`` instead of ``"label"``; ids
  ``1..`` adversarial, ``10000001..`` random, ``20000001..`` popular, each the row of the same
  number in that split's label file ``coco_pope_{category}.json``) plus the directory of those
  label files.

Scoring follows the official answer rule (:func:`answer_is_yes`) with "yes" as the positive
class, but pairs answers with questions by ``question_id`` and refuses missing, duplicate or
unknown ids, where the official scripts pair by position and silently truncate.

:func:`build_splits` builds random / popular / adversarial splits from object annotations with
POPE's sampling algorithm.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from mllm_pib.errors import UserError
from mllm_pib.io import atomic_write_text, read_json_records, read_jsonl, read_text, repair_jsonl_tail

SPLITS = ("random", "popular", "adversarial")
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
# LLaVA's combined file numbers each split from an offset; id = offset + row number (1-based)
LLAVA_ID_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
PROMPT_STYLES = ("hadpo", "llava")
NO_WORDS = frozenset({"No", "no", "not"})
POSITIVES_PER_IMAGE = 3


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question.

    Attributes:
        question_id: id unique within the question set (answers are paired by it).
        image: image file name, e.g. ``COCO_val2014_000000310196.jpg``.
        text: the bare question, without any answer-format instruction.
        label: ``"yes"`` or ``"no"``.
        split: ``random``, ``popular``, ``adversarial`` (or the file stem for other names).
    """

    question_id: int
    image: str
    text: str
    label: str
    split: str


# ---------------------------------------------------------------------------- loading


def load_questions(path: str | Path, labels_dir: str | Path | None = None) -> list[PopeQuestion]:
    """Load a POPE question set in any of the published layouts (see the module docstring).

    Args:
        path: a labelled question file (JSON lines or JSON array), or LLaVA's combined file.
        labels_dir: for the combined file, the directory holding ``coco_pope_{category}.json``.

    Raises:
        UserError: on a missing field, a bad label, a duplicate id, an id outside its label
            file, or a question whose image/text differs from its label row (labels of another
            POPE version).
    """
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise UserError(f"{path}: no questions")
    if "category" in records[0]:
        if labels_dir is None:
            raise UserError(
                f"{path}: questions carry 'category' but no labels; pass the directory of "
                "coco_pope_{category}.json label files (--labels)"
            )
        questions = _combined_questions(records, path, Path(labels_dir))
    else:
        split = split_name(path)
        questions = [_labelled_question(rec, path, i, split) for i, rec in enumerate(records)]
    _check_unique_ids(questions, path)
    return questions


def split_name(path: str | Path) -> str:
    """The split a question file holds: the last ``_`` part of its stem when it names a split
    (``coco_pope_random.json``, ``gqa_pope_seem_popular.json``), else the whole stem."""
    stem = Path(path).stem
    last = stem.rsplit("_", 1)[-1]
    return last if last in SPLITS else stem


def _field(record: dict, key: str, kind: type, where: str):
    value = record.get(key)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise UserError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _labelled_question(record: dict, path: Path, index: int, split: str) -> PopeQuestion:
    where = f"{path} record {index + 1}"
    label = _field(record, "label", str, where).strip().lower()
    if label not in ("yes", "no"):
        raise UserError(f"{where}: label must be 'yes' or 'no', got {record['label']!r}")
    return PopeQuestion(
        question_id=_field(record, "question_id", int, where),
        image=_field(record, "image", str, where),
        text=_field(record, "text", str, where),
        label=label,
        split=split,
    )


def _combined_questions(records: list[dict], path: Path, labels_dir: Path) -> list[PopeQuestion]:
    labels: dict[str, list[PopeQuestion]] = {}
    questions = []
    for index, record in enumerate(records):
        where = f"{path} record {index + 1}"
        qid = _field(record, "question_id", int, where)
        category = _field(record, "category", str, where)
        if category not in LLAVA_ID_OFFSETS:
            raise UserError(f"{where}: unknown category {category!r}; expected one of {SPLITS}")
        if category not in labels:
            label_path = labels_dir / f"coco_pope_{category}.json"
            rows = read_json_records(label_path)
            labels[category] = [_labelled_question(r, label_path, i, category) for i, r in enumerate(rows)]
        rows = labels[category]
        row = qid - LLAVA_ID_OFFSETS[category] - 1
        if not 0 <= row < len(rows):
            raise UserError(
                f"{where}: question_id {qid} maps to row {row + 1} of coco_pope_{category}.json, "
                f"which has {len(rows)} rows"
            )
        truth = rows[row]
        text = _field(record, "text", str, where).removesuffix(LLAVA_SUFFIX)
        if (truth.image, truth.text) != (_field(record, "image", str, where), text):
            raise UserError(
                f"{where}: question_id {qid} ({record['image']}: {text!r}) differs from row {row + 1} "
                f"of {labels_dir / f'coco_pope_{category}.json'} ({truth.image}: {truth.text!r}); "
                "the label files are probably from another POPE version (LLaVA uses coco_e3e3926)"
            )
        questions.append(PopeQuestion(qid, truth.image, truth.text, truth.label, category))
    return questions


def _check_unique_ids(questions: list[PopeQuestion], path: Path) -> None:
    counts = Counter(q.question_id for q in questions)
    dups = sorted(qid for qid, n in counts.items() if n > 1)
    if dups:
        raise UserError(f"{path}: {len(dups)} duplicate question ids, e.g. {dups[:5]}")


# ---------------------------------------------------------------------------- prompts and answers


def format_prompt(question: str, style: str) -> str:
    """The text sent to the model for ``question``.

    ``hadpo`` asks the raw question (HA-DPO's POPE evaluation); ``llava`` appends LLaVA-1.5's
    short-answer instruction unless the question already ends with it.
    """
    if style == "hadpo":
        return question
    if style == "llava":
        return question if question.endswith(LLAVA_SUFFIX) else question + LLAVA_SUFFIX
    raise UserError(f"unknown POPE prompt style {style!r}; expected one of {PROMPT_STYLES}")


def is_sentence_end(text: str) -> bool:
    """Whether generation of a POPE answer may stop: only the text before the first ``.`` is
    scored, so once a ``.`` has been produced the remaining tokens cannot change the score."""
    return "." in text


class AnswerWriter:
    """Append-only answers file (JSON lines), one flushed line per answer, resumable.

    On opening, a last line cut short by a crash is removed (it is answered again) and the ids
    already answered are read back into :attr:`answered`. One file holds one question set,
    whose ids are unique.

    Example::

        with AnswerWriter(out / "answers.jsonl") as writer:
            for q in questions:
                if q.question_id not in writer.answered:
                    writer.write(q.question_id, prompt, generate(prompt))
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        repair_jsonl_tail(self.path)
        records = read_jsonl(self.path) if self.path.exists() else []
        self.answered: set[int] = set()
        for index, record in enumerate(records):
            qid = _field(record, "question_id", int, f"{self.path} line {index + 1}")
            if qid in self.answered:
                raise UserError(f"{self.path} line {index + 1}: question_id {qid} answered twice")
            self.answered.add(qid)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, question_id: int, prompt: str, text: str, **extra) -> None:
        """Append one answer and flush it to the file."""
        if question_id in self.answered:
            raise ValueError(f"question_id {question_id} is already answered in {self.path}")
        record = {"question_id": question_id, "prompt": prompt, "text": text, **extra}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.answered.add(question_id)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ANSWER_FIELDS = ("text", "answer")


def read_answers(path: str | Path, field: str | None = None) -> dict[int, str]:
    """Answers by question id from a JSON-lines file whose records hold ``question_id`` and the
    answer as ``text`` (LLaVA's files, and this project's) or ``answer`` (POPE's ``evaluate.py``).

    Args:
        field: the field holding the answer; by default whichever of the two a record has. A
            record with both, differing, is refused unless ``field`` says which one to score.

    Raises:
        UserError: on a missing field, an ambiguous record, or ids answered more than once.
    """
    if field is not None and field not in ANSWER_FIELDS:
        raise UserError(f"unknown answer field {field!r}; expected one of {ANSWER_FIELDS}")
    path = Path(path)
    answers: dict[int, str] = {}
    dups = []
    for index, record in enumerate(read_jsonl(path)):
        where = f"{path} record {index + 1}"
        qid = _field(record, "question_id", int, where)
        if qid in answers:
            dups.append(qid)
        answers[qid] = _answer_text(record, field, where)
    if dups:
        raise UserError(f"{path}: {len(dups)} duplicate question ids, e.g. {sorted(set(dups))[:5]}")
    return answers


def _answer_text(record: dict, field: str | None, where: str) -> str:
    if field is not None:
        return _field(record, field, str, where)
    present = [name for name in ANSWER_FIELDS if name in record]
    if not present:
        raise UserError(f"{where}: needs the answer as a 'text' (or 'answer') string")
    values = {name: _field(record, name, str, where) for name in present}
    if len(set(values.values())) > 1:
        raise UserError(
            f"{where}: 'text' {values['text']!r} and 'answer' {values['answer']!r} differ; POPE's evaluate.py "
            "scores 'answer', LLaVA's eval_pope.py 'text': choose one (--answer-field)"
        )
    return values[present[0]]


# ---------------------------------------------------------------------------- scoring


def answer_is_yes(text: str) -> bool:
    """The official POPE answer rule: keep the text before the first ``.``, drop commas, split
    on single spaces; the answer is "no" if a word is exactly ``No``, ``no`` or ``not``, else
    "yes" (so ``NO``, ``Nope`` and an empty answer count as "yes")."""
    words = text.split(".", 1)[0].replace(",", "").split(" ")
    return not NO_WORDS.intersection(words)


@dataclass(frozen=True)
class PopeScores:
    """Confusion counts of one split, "yes" being the positive class. Metrics are fractions;
    a ratio with a zero denominator is 0.0 (the official scripts divide by zero)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.total)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.precision * self.recall, self.precision + self.recall)

    @property
    def yes_ratio(self) -> float:
        return _ratio(self.tp + self.fp, self.total)

    def to_dict(self) -> dict:
        """``{accuracy, precision, recall, f1, yes_ratio, tp, fp, tn, fn, total}``."""
        metrics = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        return {**{m: getattr(self, m) for m in metrics}, **asdict(self), "total": self.total}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def check_answer_ids(questions: Iterable[PopeQuestion], answer_ids: Iterable[int], where: str) -> None:
    """Refuse answers that do not cover the questions exactly, with counts and example ids."""
    expected = {q.question_id for q in questions}
    given = set(answer_ids)
    missing, unknown = sorted(expected - given), sorted(given - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} questions have no answer (e.g. ids {missing[:5]})")
    if unknown:
        problems.append(f"{len(unknown)} answers have ids that are not questions (e.g. {unknown[:5]})")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems) + f" ({len(expected)} questions, {len(given)} answers)")


def score(questions: list[PopeQuestion], answers: Mapping[int, str]) -> dict[str, PopeScores]:
    """Score answers paired with questions by id; one :class:`PopeScores` per split, in
    :data:`SPLITS` order first. The answers must cover the questions exactly."""
    check_answer_ids(questions, answers.keys(), "answers")
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        predicted_yes = answer_is_yes(answers[q.question_id])
        actual_yes = q.label == "yes"
        key = ("t" if predicted_yes == actual_yes else "f") + ("p" if predicted_yes else "n")
        counts[q.split][key] += 1
    order = sorted(counts, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    return {s: PopeScores(**{k: counts[s][k] for k in ("tp", "fp", "tn", "fn")}) for s in order}


def report(scores: Mapping[str, PopeScores]) -> dict:
    """The JSON report: ``{split: PopeScores.to_dict(), ..., "mean_f1": mean F1 over splits}``
    (a report written by an evaluation also holds its ``identity``)."""
    out: dict = {split: s.to_dict() for split, s in scores.items()}
    out["mean_f1"] = _ratio(sum(s.f1 for s in scores.values()), len(scores))
    return out


def split_scores(report: Mapping) -> dict[str, dict]:
    """The per-split entries of a report (see :func:`report`)."""
    return {split: scores for split, scores in report.items() if split not in ("mean_f1", "identity")}


def label_files(labels_dir: str | Path) -> list[Path]:
    """The ``coco_pope_{category}.json`` label files of a labels directory."""
    return sorted(Path(labels_dir).glob("coco_pope_*.json"))


# ---------------------------------------------------------------------------- building splits


@dataclass(frozen=True)
class ObjectImage:
    """An image and its distinct object names, in annotation order."""

    image: str
    objects: tuple[str, ...]


def load_object_images(path: str | Path) -> list[ObjectImage]:
    """Objects per image from COCO instance annotations (``instances_*.json``: ``images``,
    ``annotations`` with ``category_id``, ``categories``) or a JSON-lines file of
    ``{"image", "objects"}``. Objects keep their first-appearance order, without repeats."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError:
        data = read_jsonl(path)  # JSON lines, or a syntax error reported with its line
    if isinstance(data, dict) and "annotations" in data:
        return _coco_object_images(data, path)
    records = data if isinstance(data, list) else [data]
    images = []
    for index, record in enumerate(records):
        where = f"{path} record {index + 1}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with 'image' and 'objects'")
        objects = _field(record, "objects", list, where)
        if not all(isinstance(o, str) and o.strip() for o in objects):
            raise UserError(f"{where}: 'objects' must be a list of non-empty names")
        images.append(ObjectImage(_field(record, "image", str, where), tuple(dict.fromkeys(objects))))
    return images


def _coco_object_images(data: dict, path: Path) -> list[ObjectImage]:
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: COCO instance annotations need a '{key}' list")
    names = {
        _field(c, "id", int, f"{path} category {i}"): _field(c, "name", str, f"{path} category {i}")
        for i, c in enumerate(data["categories"])
    }
    objects: dict[int, dict[str, None]] = defaultdict(dict)
    for index, ann in enumerate(data["annotations"]):
        where = f"{path} annotation {index}"
        category = _field(ann, "category_id", int, where)
        if category not in names:
            raise UserError(f"{where}: unknown category_id {category}")
        objects[_field(ann, "image_id", int, where)][names[category]] = None
    return [
        ObjectImage(_field(img, "file_name", str, f"{path} image {i}"), tuple(objects.get(img.get("id"), ())))
        for i, img in enumerate(data["images"])
    ]


def build_splits(
    images: list[ObjectImage], num_images: int, seed: int, sample_num: int = POSITIVES_PER_IMAGE
) -> dict[str, list[dict]]:
    """Build POPE's random / popular / adversarial splits exactly as POPE's ``main.py`` and
    ``utils.py`` do after ``random.seed(seed)``.

    Images with at least ``sample_num`` objects are eligible, in input order; ``num_images`` of
    them are sampled. Per image, the first ``sample_num`` objects are the positive questions;
    after each positive comes one negative: an object absent from the image and not already
    asked about for it, drawn uniformly (with rejection) from the objects of the *sampled*
    images (random), taken as the most frequent object over the sampled images (popular), or as
    the object co-occurring most often with that positive over the sampled images
    (adversarial); when popular or adversarial candidates run out, the negative is drawn at
    random. Ties in frequency keep first-seen order (a stable sort over the sampled images in
    sampling order). One random stream serves the image sample and then the three splits in
    the order random, popular, adversarial, as in POPE, so the same seed gives POPE's files.

    Returns:
        ``{split: [{"question_id", "image", "text", "label"}, ...]}``, ids from 1 in each split.
    """
    if sample_num < 1:
        raise UserError(f"sample_num must be at least 1, got {sample_num}")
    eligible = [im for im in images if len(im.objects) >= sample_num]
    if len(eligible) < num_images:
        raise UserError(f"only {len(eligible)} images have at least {sample_num} objects; cannot sample {num_images}")
    rng = random.Random(seed)
    sampled = rng.sample(eligible, num_images)
    frequency = Counter(obj for im in sampled for obj in im.objects)  # first-seen order
    vocabulary = list(frequency)
    cooccurrence: dict[str, Counter] = {}
    for im in sampled:
        for a in im.objects:
            cooccurrence.setdefault(a, Counter()).update(b for b in im.objects if b != a)
    popular = _by_count(frequency)
    adversarial = {obj: _by_count(counts) for obj, counts in cooccurrence.items()}
    splits = {}
    for split in SPLITS:
        questions: list[dict] = []
        for im in sampled:
            asked = set(im.objects)
            for positive in im.objects[:sample_num]:
                ranking = popular if split == "popular" else adversarial[positive] if split == "adversarial" else []
                negative = next((o for o in ranking if o not in asked), None)
                if negative is None:
                    negative = _random_negative(vocabulary, asked, rng, im.image)
                asked.add(negative)
                questions.append(_question(len(questions) + 1, im.image, positive, "yes"))
                questions.append(_question(len(questions) + 1, im.image, negative, "no"))
        splits[split] = questions
    return splits


def _by_count(counts: Counter) -> list[str]:
    """Most frequent first; equal counts keep their first-seen order (a stable sort)."""
    return sorted(counts, key=counts.__getitem__, reverse=True)


def _random_negative(vocabulary: list[str], asked: set[str], rng: random.Random, image: str) -> str:
    """POPE's rejection sampling: draw uniformly until the object is neither present nor asked
    (the number of draws matters, as every later draw of the stream depends on it)."""
    if all(o in asked for o in vocabulary):
        raise UserError(f"image {image}: every object of the sampled images is present or already asked; no negative left")
    while True:
        candidate = rng.choice(vocabulary)
        if candidate not in asked:
            return candidate


def _question(question_id: int, image: str, obj: str, label: str) -> dict:
    article = "an" if obj[:1] in ("a", "e", "i", "o", "u") else "a"  # POPE's rule: lower-case vowels only
    return {
        "question_id": question_id,
        "image": image,
        "text": f"Is there {article} {obj} in the image?",
        "label": label,
    }


def write_splits(splits: Mapping[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Write each split as ``coco_pope_{split}.json`` in the official JSON-lines format."""
    paths = []
    for split, questions in splits.items():
        path = Path(out_dir) / f"coco_pope_{split}.json"
        atomic_write_text(path, "".join(json.dumps(q) + "\n" for q in questions))
        paths.append(path)
    return paths
