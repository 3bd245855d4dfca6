"""SHR: HA-DPO's sentence-level hallucination ratio of detailed image descriptions.

A model describes Visual Genome images ("Describe this image in detail."). Each description is
split into sentences, which a judge LLM labels ``hallucination``, ``correct`` or
``cannot judge`` against the image's VG region descriptions and SHR's factual sentences.
SHR = hallucinated sentences / (hallucination + correct + cannot judge) × 100.

Expected inputs (HA-DPO's layout)::

    shr_dir/
        val_images_final.json     [{"image_id": <VG id>, ...}, ...]   the SHR validation images
        shr_factual_part*.jsonl   {"<VG id>": ["factual sentence", ...]} per line (all parts read)
    vg_dir/
        image_data.json           [{"image_id", "width", "height", "url", ...}, ...]
        region_descriptions.json  [{"id": <VG id>, "regions": [{"x", "y", "width", "height",
                                     "phrase", "image_id"}, ...]}, ...]

:func:`run_shr` judges given descriptions and writes ``judgements.jsonl`` (one line per image)
and ``metrics.json`` (see :func:`shr_metrics`) into its output directory.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from mllm_pib.errors import UserError
from mllm_pib.io import atomic_write_json, atomic_write_text, read_json, read_jsonl

LABELS = ("hallucination", "correct", "cannot judge")
DESCRIBE_PROMPT = "Describe this image in detail."

JUDGE_PROMPT = """\
Judge whether each comment on an image is a hallucination or correct.
The ground truth of the image is a list of region descriptions, one per line as [x1, y1, x2, y2]: description, \
where [x1, y1, x2, y2] is the bounding box of the region, normalised to the image size. Strongly overlapping boxes may \
show the same object. Some factual information about the image follows; it is fully accurate. Base your judgement on \
this information. It only describes the objects in the regions of the image, so it cannot settle subjective content \
such as atmosphere, style or emotion: judge such a comment "cannot judge".
Judge the numbered comments one by one, each with its reason. Your output must be:
Judgement:
1. hallucination or correct or cannot judge: <reason>
2. ...

Region descriptions of the image:
{regions}
Factual information:
{facts}
Comments to judge (hallucination, correct or cannot judge):
{sentences}"""

_HEADER = re.compile(r"judge?ment\s*:", re.IGNORECASE)
_NUMBERED = re.compile(r"^(\d+)(?:\s*[.)]\s*|\s+)(.*)$")


class Judge(Protocol):
    """Anything that answers prompts, e.g. :class:`mllm_pib.evaluation.judge.JudgeClient`."""

    def complete_many(self, prompts: list[str]) -> list[str]: ...


# ---------------------------------------------------------------------------- prompt pieces


def split_sentences(description: str) -> list[str]:
    """Sentences of a description as judged by SHR: split on ``.``, stripped, empty ones and
    those equal to or contained in an earlier kept sentence dropped (repetitions)."""
    kept: list[str] = []
    for part in description.split("."):
        sentence = part.strip()
        if sentence and not any(sentence in earlier for earlier in kept):
            kept.append(sentence)
    return kept


def number_sentences(sentences: list[str]) -> str:
    """``1. first\\n2. second\\n`` — the comments the judge labels."""
    return "".join(f"{i}. {s}\n" for i, s in enumerate(sentences, start=1))


def format_regions(regions: list[dict], width: float, height: float, where: str = "regions") -> str:
    """VG regions as ``[x1, y1, x2, y2]: phrase`` lines, corners divided by the image width and
    height and rounded to 2 decimals (printed as Python floats, e.g. ``[0.1, 0.25, 0.5, 1.0]``);
    regions without a phrase are left out."""
    if not width or not height:
        raise UserError(f"{where}: image width and height must be positive, got {width}x{height}")
    lines = []
    for i, region in enumerate(regions):
        try:
            x, y, w, h = (float(region[k]) for k in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where} region {i}: needs numeric 'x', 'y', 'width', 'height'") from None
        box = [float(f"{v:.2f}") for v in (x / width, y / height, (x + w) / width, (y + h) / height)]
        if region.get("phrase"):
            lines.append(f"{box}: {region['phrase']}\n")
    return "".join(lines)


def build_judge_prompt(regions_text: str, facts: list[str], sentences: list[str]) -> str:
    """The judge prompt: region descriptions, factual sentences (one per line), numbered sentences."""
    return JUDGE_PROMPT.format(
        regions=regions_text, facts="".join(f"{f}\n" for f in facts), sentences=number_sentences(sentences)
    )


# ---------------------------------------------------------------------------- judging


@dataclass
class SentenceJudgement:
    """A sentence and its label (``None`` when the judge's line for it could not be read)."""

    sentence: str
    label: str | None
    reason: str | None


@dataclass
class ImageJudgement:
    """The judge's verdict on one description.

    ``status`` is ``labelled``, ``no_judgement`` (no ``Judgement:`` header in the reply) or
    ``count_mismatch`` (the reply's numbered lines do not match the sentences 1..n); only a
    labelled image carries labels.
    """

    image_id: int
    status: str
    sentences: list[SentenceJudgement]

    @property
    def unparseable(self) -> int:
        return sum(s.label is None for s in self.sentences) if self.status == "labelled" else 0


def parse_judgement(image_id: int, reply: str, sentences: list[str]) -> ImageJudgement:
    """Read a judge reply: after the ``Judgement:`` header, the non-empty lines must be
    ``N. label: reason`` for N = 1..len(sentences). A line whose label is not one of
    :data:`LABELS` (case and ``*`` emphasis aside) is kept unlabelled, never guessed."""
    lines = reply.split("\n")
    header = next((i for i, line in enumerate(lines) if _HEADER.search(line)), None)
    unlabelled = [SentenceJudgement(s, None, None) for s in sentences]
    if header is None:
        return ImageJudgement(image_id, "no_judgement", unlabelled)
    first = _HEADER.split(lines[header], maxsplit=1)[1]
    # markdown emphasis around the header or a line ("**Judgement:**") is not content
    entries = [e for e in (line.strip().strip("*").strip() for line in [first, *lines[header + 1 :]]) if e]
    numbered = [_NUMBERED.match(entry) for entry in entries]
    if len(entries) != len(sentences) or any(m and int(m.group(1)) != i for i, m in enumerate(numbered, 1)):
        return ImageJudgement(image_id, "count_mismatch", unlabelled)
    judged = [SentenceJudgement(s, *_label(m.group(2) if m else None)) for s, m in zip(sentences, numbered)]
    return ImageJudgement(image_id, "labelled", judged)


def _label(body: str | None) -> tuple[str | None, str | None]:
    if body is None:
        return None, None
    head, _, reason = body.partition(":")
    label = head.strip().strip("*").strip().lower()
    return (label, reason.strip()) if label in LABELS else (None, None)


def shr_metrics(images: list[ImageJudgement]) -> dict:
    """SHR metrics over judged images.

    Returns a dict with ``shr`` (hallucinated / labelled sentences × 100), ``hal_words_ratio``
    (same over words, × 100), ``images``, ``unlabelled_images`` (by status),
    ``unparseable_sentences``, ``label_counts`` and, averaged over all judged images,
    ``sentences_per_image``, ``words_per_image``, ``hal_sentences_per_image``,
    ``hal_words_per_image``. Words are whitespace-separated tokens of a sentence.
    """
    n = len(images)
    labels: Counter = Counter()
    words: Counter = Counter()
    for image in images:
        for s in image.sentences:
            count = len(s.sentence.split())
            words["all"] += count
            if image.status == "labelled" and s.label is not None:
                labels[s.label] += 1
                words[s.label] += count
    judged = sum(labels[label] for label in LABELS)
    judged_words = sum(words[label] for label in LABELS)
    sentences = sum(len(image.sentences) for image in images)
    return {
        "shr": _ratio(labels["hallucination"], judged) * 100,
        "hal_words_ratio": _ratio(words["hallucination"], judged_words) * 100,
        "images": n,
        "unlabelled_images": dict(Counter(i.status for i in images if i.status != "labelled")),
        "unparseable_sentences": sum(i.unparseable for i in images),
        "label_counts": {label: labels[label] for label in LABELS},
        "sentences_per_image": _ratio(sentences, n),
        "words_per_image": _ratio(words["all"], n),
        "hal_sentences_per_image": _ratio(labels["hallucination"], n),
        "hal_words_per_image": _ratio(words["hallucination"], n),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


# ---------------------------------------------------------------------------- inputs and run


@dataclass(frozen=True)
class ShrImage:
    """What the judge needs about one validation image."""

    image_id: int
    regions_text: str
    facts: list[str]


def load_val_image_ids(shr_dir: str | Path) -> list[int]:
    """The SHR validation image ids, in file order."""
    path = Path(shr_dir) / "val_images_final.json"
    return [_image_id(r, f"{path} element {i}") for i, r in enumerate(_list(read_json(path), path))]


def load_shr_images(shr_dir: str | Path, vg_dir: str | Path, image_ids: set[int] | None = None) -> dict[int, ShrImage]:
    """The SHR validation images (all, or those in ``image_ids``) with their formatted VG
    regions and factual sentences, in ``val_images_final.json`` order."""
    shr_dir, vg_dir = Path(shr_dir), Path(vg_dir)
    val_ids = load_val_image_ids(shr_dir)
    wanted = [i for i in val_ids if image_ids is None or i in image_ids]
    if image_ids is not None and (unknown := sorted(image_ids - set(val_ids))):
        raise UserError(f"{len(unknown)} described images are not SHR validation images (e.g. {unknown[:5]})")
    facts = _load_facts(shr_dir)
    meta_path = vg_dir / "image_data.json"
    meta = {_image_id(m, f"{meta_path} element {i}"): m for i, m in enumerate(_list(read_json(meta_path), meta_path))}
    regions_path = vg_dir / "region_descriptions.json"
    regions = {}
    for i, entry in enumerate(_list(read_json(regions_path), regions_path)):
        image_regions = entry.get("regions") or []
        image_id = entry.get("id", image_regions[0].get("image_id") if image_regions else None)
        regions[_image_id({"image_id": image_id}, f"{regions_path} element {i}")] = image_regions
    out = {}
    for image_id in wanted:
        if image_id not in meta or image_id not in regions:
            raise UserError(f"VG image {image_id}: missing from {meta_path if image_id not in meta else regions_path}")
        where = f"{regions_path} image {image_id}"
        text = format_regions(regions[image_id], meta[image_id].get("width"), meta[image_id].get("height"), where)
        out[image_id] = ShrImage(image_id, text, facts.get(image_id, []))
    return out


def input_files(shr_dir: str | Path, vg_dir: str | Path) -> list[Path]:
    """Every file SHR reads (the images excepted)."""
    shr_dir, vg_dir = Path(shr_dir), Path(vg_dir)
    return [shr_dir / "val_images_final.json", *_factual_files(shr_dir),
            vg_dir / "image_data.json", vg_dir / "region_descriptions.json"]


def _factual_files(shr_dir: Path) -> list[Path]:
    return sorted(shr_dir.glob("shr_factual_part*.jsonl"))


def _load_facts(shr_dir: Path) -> dict[int, list[str]]:
    parts = _factual_files(shr_dir)
    if not parts:
        raise UserError(f"{shr_dir}: no shr_factual_part*.jsonl files")
    facts: dict[int, list[str]] = {}
    for path in parts:
        for lineno, record in enumerate(read_jsonl(path), start=1):
            for key, sentences in record.items():
                if not key.isdigit() or not isinstance(sentences, list):
                    raise UserError(f'{path} record {lineno}: expected {{"<VG image id>": [sentences]}}')
                facts[int(key)] = [str(s) for s in sentences]
    return facts


def _list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list")
    return data


def _image_id(record, where: str) -> int:
    value = record.get("image_id") if isinstance(record, dict) else record
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected an integer image id, got {value!r}")
    return value


def run_shr(
    descriptions: Mapping[int | str, str],
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: Judge,
    out_dir: str | Path,
    identity: dict | None = None,
) -> dict:
    """Judge ``descriptions`` (VG image id -> model description) and write the results.

    Writes ``out_dir/judgements.jsonl`` (per image: ``image_id``, ``description``, ``status``,
    ``reply``, ``sentences`` with ``label`` and ``reason``) and ``out_dir/metrics.json``
    (:func:`shr_metrics` plus ``val_images``, ``described_images`` and the evaluation's
    ``identity`` when given). Images without any sentence are recorded without asking the
    judge. Returns the metrics.
    """
    by_id = {_image_id({"image_id": k}, "descriptions"): v for k, v in descriptions.items()}
    images = load_shr_images(shr_dir, vg_dir, set(by_id))
    sentences = {i: split_sentences(by_id[i]) for i in images}
    asked = [i for i in images if sentences[i]]
    prompts = [build_judge_prompt(images[i].regions_text, images[i].facts, sentences[i]) for i in asked]
    replies = dict(zip(asked, judge.complete_many(prompts)))
    judged, lines = [], []
    for image_id in images:
        if image_id in replies:
            verdict = parse_judgement(image_id, replies[image_id], sentences[image_id])
        else:
            verdict = ImageJudgement(image_id, "labelled", [])
        judged.append(verdict)
        record = {
            "image_id": image_id,
            "description": by_id[image_id],
            "status": verdict.status,
            "reply": replies.get(image_id),
            "sentences": [asdict(s) for s in verdict.sentences],
        }
        lines.append(record)
    metrics = {**shr_metrics(judged), "val_images": len(load_val_image_ids(shr_dir)), "described_images": len(images)}
    if identity is not None:
        metrics["identity"] = identity
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "judgements.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
