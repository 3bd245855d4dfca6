"""SHR: HA-DPO's sentence-level hallucination ratio of detailed image descriptions.

A model describes Visual Genome images ("Describe this image in detail."). Each description is
split into sentences, which a judge LLM labels ``hallucination``, ``correct`` or
``cannot judge`` against the image's VG region descriptions and SHR's factual sentences.
SHR = hallucinated sentences / (hallucination + correct + cannot judge) × 100.

By default every step follows HA-DPO's ``ha_dpo/shr_eval`` code: sentence splitting and
numbering, region formatting, the 15,000-character prompt limit of its LLaVA-1.5 script, asking
again when a reply has no ``Judgement:`` line, and its reply parser (``post_process_no_revise``).
The judge prompt is a template file (:class:`JudgePrompt`); with HA-DPO's own prompt file the
request carries HA-DPO's prompt byte for byte. What the judge could not label is counted, never
silently dropped from a denominator. Inputs: :mod:`mllm_pib.evaluation.shr_data`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mllm_pib.errors import UserError
from mllm_pib.evaluation.shr_data import ShrImage, as_image_id, load_shr_images, load_val_image_ids
from mllm_pib.io import atomic_write_json, atomic_write_text

LABELS = ("hallucination", "correct", "cannot judge")
DESCRIBE_PROMPT = "Describe this image in detail."
BUILTIN_PROMPT = Path(__file__).with_name("shr_judge_prompt.txt")
# SHA-256 of GPT_JUDGE_PROMPT in HA-DPO's ha_dpo/shr_eval/gpt_utils.py (as UTF-8 bytes)
HADPO_PROMPT_SHA256 = "00550be1a5a96e48da20158a4da26fe6fc200f5ae17e902f2c8f7145f5dbf6d5"
# image statuses that leave an image's sentences unlabelled
UNLABELLED = ("no_judgement", "count_mismatch", "prompt_too_long")


class Judge(Protocol):
    """Anything that answers prompts, e.g. :class:`mllm_pib.evaluation.judge.JudgeClient`."""

    def complete_many(self, prompts: list[str], accept: Callable[[str], bool] | None = None) -> list[str]: ...

    def describe(self) -> dict: ...


class ShrOptions(BaseModel):
    """How descriptions are judged; the defaults are HA-DPO's rules.

    Attributes:
        judge_prompt: judge prompt template file (a Python ``str.format`` template with three
            ``{}`` fields: regions, facts, numbered sentences); none: the built-in prompt, which
            is not HA-DPO's (its verdicts are not comparable with published SHR).
        parser: ``hadpo`` reads replies exactly as HA-DPO's ``post_process_no_revise``;
            ``lenient`` also accepts ``**Correct**``-style emphasis, ``judgment:`` headers and
            ``2)`` numbering, and checks that lines are numbered 1..n.
        max_prompt_chars: an image whose prompt is longer is not judged (HA-DPO's LLaVA-1.5
            script skips prompts over 15,000 characters); 0: no limit.
    """

    model_config = ConfigDict(extra="forbid")

    judge_prompt: Path | None = None
    parser: Literal["hadpo", "lenient"] = "hadpo"
    max_prompt_chars: int = Field(default=15000, ge=0)

    @field_validator("judge_prompt")
    @classmethod
    def _usable_template(cls, path: Path | None) -> Path | None:
        if path is not None:
            JudgePrompt.load(path)  # a bad template stops a run before any model does
        return path


# ---------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt template, read byte for byte, with where it came from and its hash."""

    template: str
    path: str
    sha256: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> JudgePrompt:
        """The template in ``path`` (none: the built-in one). Raw UTF-8: no newline translation."""
        source = Path(path) if path is not None else BUILTIN_PROMPT
        try:
            data = source.read_bytes()
            template = data.decode("utf-8")
        except OSError as err:
            raise UserError(f"judge prompt {source}: cannot read ({err.strerror})") from None
        except UnicodeDecodeError as err:
            raise UserError(f"judge prompt {source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        _check_template(template, source)
        return cls(template, "built-in" if path is None else str(source), hashlib.sha256(data).hexdigest())

    def format(self, regions_text: str, facts: list[str], sentences: list[str]) -> str:
        """The prompt for one image: regions, one fact per line, numbered sentences."""
        return self.template.format(regions_text, "".join(f"{fact}\n" for fact in facts), number_sentences(sentences))

    def record(self) -> dict:
        """What the reports record about the prompt."""
        return {"path": self.path, "sha256": self.sha256, "hadpo": self.sha256 == HADPO_PROMPT_SHA256}


def _check_template(template: str, source: Path) -> None:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UserError(f"judge prompt {source}: not a format template ({err}); write literal braces as {{{{ }}}}") from None
    names = [name for name, _, _ in fields]
    if (names != ["", "", ""] and sorted(names) != ["0", "1", "2"]) or any(spec or conv for _, spec, conv in fields):
        raise UserError(
            f"judge prompt {source}: needs exactly three plain {{}} fields (regions, facts, sentences), "
            f"found {['{' + n + '}' for n in names]}; write literal braces as {{{{ }}}}"
        )


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
    if isinstance(width, bool) or isinstance(height, bool) or not _positive(width) or not _positive(height):
        raise UserError(f"{where}: image width and height must be positive numbers, got {width!r}x{height!r}")
    lines = []
    for i, region in enumerate(regions):
        if not isinstance(region, dict):
            raise UserError(f"{where} region {i}: expected an object, got {type(region).__name__}")
        for field in ("x", "y", "width", "height"):
            value = region.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where} region {i}: field '{field}' must be a number, got {value!r}")
        phrase = region.get("phrase")
        if phrase is not None and not isinstance(phrase, str):
            raise UserError(f"{where} region {i}: field 'phrase' must be text, got {phrase!r}")
        x, y, w, h = region["x"], region["y"], region["width"], region["height"]
        box = [float(f"{v:.2f}") for v in (x / width, y / height, (x + w) / width, (y + h) / height)]
        if phrase:
            lines.append(f"{box}: {phrase}\n")
    return "".join(lines)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


# ---------------------------------------------------------------------------- reading replies


@dataclass
class SentenceJudgement:
    """A sentence, its label (``None``: not one of :data:`LABELS`, or the image is unlabelled)
    and the judge's text for it (its line without the number)."""

    sentence: str
    label: str | None
    judgement: str | None


@dataclass
class ImageJudgement:
    """The judge's verdict on one description.

    ``status`` is ``labelled``, ``no_judgement`` (no ``Judgement:`` line in the reply, after
    asking again), ``count_mismatch`` (the reply's lines do not match the sentences) or
    ``prompt_too_long`` (not asked); only a labelled image carries labels.
    """

    image_id: int
    status: str
    sentences: list[SentenceJudgement]


def _unlabelled(image_id: int, status: str, sentences: list[str]) -> ImageJudgement:
    return ImageJudgement(image_id, status, [SentenceJudgement(s, None, None) for s in sentences])


def parse_hadpo(image_id: int, reply: str, sentences: list[str]) -> ImageJudgement:
    """Read a reply as HA-DPO's ``post_process_no_revise``: drop empty lines; the judgements
    are the lines after the first one containing ``Judgement:``, each without its first
    space-separated token (the number) and stripped, empty ones dropped; their count must equal
    the sentences'; a label is the text before the first ``:``, lower-cased and otherwise as
    written (``correct `` or ``**correct**`` are not labels)."""
    lines = [line for line in reply.split("\n") if line]
    header = next((i for i, line in enumerate(lines) if "Judgement:" in line), None)
    if header is None:
        return _unlabelled(image_id, "no_judgement", sentences)
    entries = [" ".join(line.split(" ")[1:]).strip() for line in lines[header + 1 :]]
    entries = [entry for entry in entries if entry]
    if len(entries) != len(sentences):
        return _unlabelled(image_id, "count_mismatch", sentences)
    judged = []
    for sentence, entry in zip(sentences, entries):
        label = entry.split(":")[0].lower()
        judged.append(SentenceJudgement(sentence, label if label in LABELS else None, entry))
    return ImageJudgement(image_id, "labelled", judged)


_HEADER = re.compile(r"judge?ment\s*:", re.IGNORECASE)
_NUMBERED = re.compile(r"^(\d+)(?:\s*[.)]\s*|\s+)(.*)$")


def parse_lenient(image_id: int, reply: str, sentences: list[str]) -> ImageJudgement:
    """A more forgiving reader: the header may be ``judgment:`` in any case, text after it on
    its line counts, ``*`` emphasis is ignored, ``2)`` numbering accepted; the non-empty lines
    must be numbered 1..n. A line whose label is not one of :data:`LABELS` stays unlabelled."""
    lines = reply.split("\n")
    header = next((i for i, line in enumerate(lines) if _HEADER.search(line)), None)
    if header is None:
        return _unlabelled(image_id, "no_judgement", sentences)
    first = _HEADER.split(lines[header], maxsplit=1)[1]
    entries = [e for e in (line.strip().strip("*").strip() for line in [first, *lines[header + 1 :]]) if e]
    numbered = [_NUMBERED.match(entry) for entry in entries]
    if len(entries) != len(sentences) or any(m and int(m.group(1)) != i for i, m in enumerate(numbered, 1)):
        return _unlabelled(image_id, "count_mismatch", sentences)
    judged = []
    for sentence, match in zip(sentences, numbered):
        body = match.group(2) if match else None
        label = body.partition(":")[0].strip().strip("*").strip().lower() if body else None
        judged.append(SentenceJudgement(sentence, label if label in LABELS else None, body))
    return ImageJudgement(image_id, "labelled", judged)


@dataclass(frozen=True)
class ReplyParser:
    has_judgement: Callable[[str], bool]  # a reply failing this is asked again
    parse: Callable[[int, str, list[str]], ImageJudgement]


PARSERS = {
    "hadpo": ReplyParser(lambda reply: "Judgement:" in reply, parse_hadpo),
    "lenient": ReplyParser(lambda reply: _HEADER.search(reply) is not None, parse_lenient),
}


# ---------------------------------------------------------------------------- metrics


def shr_metrics(images: list[ImageJudgement]) -> dict:
    """SHR metrics: ours, with HA-DPO's beside them under ``hadpo`` (:func:`hadpo_metrics`).

    Ours: ``shr`` (hallucinated / labelled sentences × 100), ``shr_words`` (words of
    hallucinated sentences / words of labelled sentences × 100), ``label_counts``,
    ``labelled_sentences``; what could not be labelled, by cause: ``unlabelled_images`` and
    ``unlabelled_sentences`` (``unknown_label``: a line of a labelled reply whose label is none
    of :data:`LABELS`); and over the ``images`` judged (prompt too long excepted, as in HA-DPO)
    ``sentences_per_image``, ``words_per_image``, ``hal_sentences_per_image``,
    ``hal_words_per_image``. Words are whitespace-separated; a ratio without a denominator is None.
    """
    judged = [image for image in images if image.status != "prompt_too_long"]
    labels: Counter = Counter()
    words: Counter = Counter()
    unlabelled: Counter = Counter()
    for image in images:
        for s in image.sentences:
            if s.label is None:
                unlabelled[image.status if image.status != "labelled" else "unknown_label"] += 1
            else:
                labels[s.label] += 1
                words[s.label] += len(s.sentence.split())
    n = len(judged)
    statuses = Counter(image.status for image in images)
    return {
        "shr": _percent(labels["hallucination"], sum(labels.values())),
        "shr_words": _percent(words["hallucination"], sum(words.values())),
        "images": n,
        "labelled_sentences": sum(labels.values()),
        "label_counts": {label: labels[label] for label in LABELS},
        "unlabelled_images": {status: statuses[status] for status in UNLABELLED},
        "unlabelled_sentences": {cause: unlabelled[cause] for cause in ("unknown_label", *UNLABELLED)},
        "sentences_per_image": _ratio(sum(len(i.sentences) for i in judged), n),
        "words_per_image": _ratio(sum(len(s.sentence.split()) for i in judged for s in i.sentences), n),
        "hal_sentences_per_image": _ratio(labels["hallucination"], n),
        "hal_words_per_image": _ratio(words["hallucination"], n),
        "hadpo": hadpo_metrics(judged),
    }


def hadpo_metrics(images: list[ImageJudgement]) -> dict:
    """HA-DPO's ``get_metric`` with its names and rounding: fractions (not percentages) rounded
    to 3 decimals, words split on single spaces, per-image figures over the judged images
    (unlabelled sentences count in ``sents_per_image``, not in the ratios). ``mean_hal_ratio``
    is the published SHR (one run). Where HA-DPO would divide by zero the value is None."""
    sentences = [s for image in images for s in image.sentences]
    labelled = [s for s in sentences if s.label is not None]
    hallucinated = [s for s in labelled if s.label == "hallucination"]

    def words(group: list[SentenceJudgement]) -> int:
        return sum(len(s.sentence.split(" ")) for s in group)

    n = len(images)
    ratio = _rounded(len(hallucinated), len(labelled))
    return {
        "num_images": n,
        "sents_per_image": _rounded(len(sentences), n),
        "words_per_image": _rounded(words(sentences), n),
        "hal_sents_per_image": _rounded(len(hallucinated), n),
        "hal_words_per_image": _rounded(words(hallucinated), n),
        "hal_sents_ratio": ratio,
        "hal_words_ratio": _rounded(words(hallucinated), words(labelled)),
        "mean_hal_ratio": ratio,
    }


def summary(metrics: dict) -> list[str]:
    """Readable lines for a report: the judge prompt and whether it is HA-DPO's, what could not
    be labelled, and HA-DPO's own metrics."""
    prompt = metrics["judge"]["prompt"]
    comparable = "HA-DPO's prompt" if prompt["hadpo"] else "not HA-DPO's prompt: not comparable with published SHR"
    images, sentences = metrics["unlabelled_images"], metrics["unlabelled_sentences"]

    def causes(counts: dict) -> str:
        return ", ".join(f"{cause.replace('_', ' ')} {count}" for cause, count in counts.items())

    return [
        f"judge: {metrics['judge']['model']}, prompt {prompt['path']} (sha256 {prompt['sha256'][:12]}, {comparable}), "
        f"{metrics['judge']['parser']} parser",
        f"not labelled: {sum(images.values())} images ({causes(images)}); "
        f"{sum(sentences.values())} sentences ({causes(sentences)})",
        "HA-DPO metrics: " + ", ".join(f"{name} {value}" for name, value in metrics["hadpo"].items()),
    ]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _percent(num: float, den: float) -> float | None:
    return num / den * 100 if den else None


def _rounded(num: float, den: float) -> float | None:
    return round(num / den, 3) if den else None


# ---------------------------------------------------------------------------- a run


def run_shr(
    descriptions: Mapping[int | str, str],
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: Judge,
    out_dir: str | Path,
    options: ShrOptions | None = None,
    identity: dict | None = None,
) -> dict:
    """Judge ``descriptions`` (VG image id -> model description) and write the results.

    Writes ``out_dir/judgements.jsonl`` (per image: ``image_id``, ``description``, ``status``,
    ``reply``, ``sentences`` with ``label`` and ``judgement``) and ``out_dir/metrics.json``
    (:func:`shr_metrics` plus ``val_images``, ``described_images``, ``judge``: endpoint,
    model, request settings, prompt path and SHA-256, parser, prompt limit; and the
    evaluation's ``identity`` when given). Images without any sentence are recorded without
    asking the judge. Returns the metrics.
    """
    options = options or ShrOptions()
    prompt = JudgePrompt.load(options.judge_prompt)
    parser = PARSERS[options.parser]
    by_id = {as_image_id(k, "descriptions: key"): v for k, v in descriptions.items()}
    images = load_shr_images(shr_dir, vg_dir, set(by_id))
    sentences = {i: split_sentences(by_id[i]) for i in images}
    prompts = {i: prompt.format(_regions_text(image), image.facts, sentences[i]) for i, image in images.items()}
    limit = options.max_prompt_chars
    too_long = {i for i, text in prompts.items() if limit and len(text) > limit}
    asked = [i for i in images if sentences[i] and i not in too_long]
    replies = dict(zip(asked, judge.complete_many([prompts[i] for i in asked], accept=parser.has_judgement)))
    verdicts = []
    for image_id in images:
        if image_id in too_long:
            verdicts.append(_unlabelled(image_id, "prompt_too_long", sentences[image_id]))
        elif image_id in replies:
            verdicts.append(parser.parse(image_id, replies[image_id], sentences[image_id]))
        else:
            verdicts.append(ImageJudgement(image_id, "labelled", []))
    lines = [
        {
            "image_id": verdict.image_id,
            "description": by_id[verdict.image_id],
            "status": verdict.status,
            "reply": replies.get(verdict.image_id),
            "sentences": [asdict(s) for s in verdict.sentences],
        }
        for verdict in verdicts
    ]
    metrics = {
        **shr_metrics(verdicts),
        "val_images": len(load_val_image_ids(shr_dir)),
        "described_images": len(images),
        "judge": {**judge.describe(), "prompt": prompt.record(), "parser": options.parser, "max_prompt_chars": limit},
        **({"identity": identity} if identity is not None else {}),
    }
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "judgements.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _regions_text(image: ShrImage) -> str:
    return format_regions(image.regions, image.width, image.height, image.where)
