"""Benchmarks that need a model: POPE answers, image descriptions (for CHAIR and SHR), and the
multi-model evaluation report of ``mllm-pib eval run``.

All of them go through :func:`~mllm_pib.evaluation.runner.generate_answers`, so every one is
batched, resumable and shardable across processes, for every backbone. Their inputs are loaded
and checked (:func:`load_pope_sets`, :func:`load_chair_inputs`) before any model is loaded, so
a bad file fails in seconds, not after a benchmark has run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mllm_pib.errors import UserError
from mllm_pib.evaluation import chair, pope
from mllm_pib.evaluation.runner import EvalItem, GenerationSettings, generate_answers
from mllm_pib.io import atomic_write_json

DESCRIBE_PROMPT = "Describe this image in detail."


def question_files(questions: str | Path) -> list[Path]:
    """A question file, or every ``*.json``/``*.jsonl`` question file of a directory."""
    path = Path(questions)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise UserError(f"{path}: no POPE question files (*.json, *.jsonl)")
        return files
    if not path.is_file():
        raise UserError(f"{path}: POPE question file or directory not found")
    return [path]


def check_images(paths: Iterable[Path], source: str) -> None:
    """Refuse image files that do not exist, with their count and examples."""
    missing = sorted({str(p) for p in paths if not p.is_file()})
    if missing:
        raise UserError(f"{source}: {len(missing)} images not found, e.g. {missing[:3]}")


@dataclass(frozen=True)
class PopeSet:
    """One POPE question file, loaded, with the folder of its images."""

    path: Path
    questions: list[pope.PopeQuestion]
    images: Path


def load_pope_sets(questions: str | Path, images: str | Path, labels: str | Path | None = None) -> list[PopeSet]:
    """Load every question file and check that each question's image exists and that no split
    comes from two files."""
    sets, splits = [], {}
    for path in question_files(questions):
        items = pope.load_questions(path, labels)
        check_images((Path(images) / q.image for q in items), f"{path} (images in {images})")
        for split in dict.fromkeys(q.split for q in items):
            if split in splits:
                raise UserError(f"{path}: split {split!r} is also in {splits[split]}")
            splits[split] = path
        sets.append(PopeSet(path, items, Path(images)))
    return sets


def evaluate_pope(
    model,
    questions: str | Path,
    images: str | Path,
    out_dir: str | Path,
    *,
    style: str = "hadpo",
    labels: str | Path | None = None,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=64, stop_at_sentence_end=True),
) -> dict:
    """Answer and score POPE question files; writes ``answers_<name>.jsonl`` per question file
    and ``pope.json`` (the report keyed by split, plus ``mean_f1``). Returns the report."""
    out_dir = Path(out_dir)
    scores: dict[str, pope.PopeScores] = {}
    for qset in load_pope_sets(questions, images, labels):
        pending = [EvalItem(q.question_id, qset.images / q.image, pope.format_prompt(q.text, style)) for q in qset.questions]
        answers = generate_answers(
            model, pending, out_dir / f"answers_{qset.path.stem}.jsonl", settings, desc=f"POPE {qset.path.stem}"
        )
        scores.update(pope.score(qset.questions, answers))
    ordered = sorted(scores, key=lambda s: (pope.SPLITS.index(s) if s in pope.SPLITS else len(pope.SPLITS), s))
    report = pope.report({split: scores[split] for split in ordered})
    atomic_write_json(out_dir / "pope.json", report)
    return report


def describe_images(
    model,
    images: dict[int, Path],
    out_file: str | Path,
    *,
    prompt: str = DESCRIBE_PROMPT,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=512, num_beams=5, batch_size=4),
) -> dict[int, str]:
    """Describe each image (``{image_id: path}``); resumable. Returns ``{image_id: text}``.

    The file holds ``{"question_id": image id, "prompt", "text"}`` lines, which ``eval chair
    --captions`` reads as they are."""
    items = [EvalItem(image_id, path, prompt) for image_id, path in sorted(images.items())]
    return generate_answers(model, items, out_file, settings, desc="describing")


@dataclass(frozen=True)
class ChairInputs:
    """What CHAIR needs before a model describes anything: the vocabulary (and its matcher),
    the ground-truth objects per image id, and the image file of every image to describe."""

    vocab: chair.ChairVocabulary
    truth: Mapping[int, set[str]]
    images: Mapping[int, Path]


def load_chair_inputs(
    annotations: list[str | Path],
    images: str | Path,
    *,
    synonyms: str | Path | None = None,
    matcher: str = "builtin",
    image_pattern: str | None = None,
    limit: int | None = None,
) -> ChairInputs:
    """Read the annotations and pick the images to describe: the annotated image ids in order,
    the first ``limit`` of them, named by ``image_pattern`` (e.g.
    ``COCO_val2014_{image_id:012d}.jpg``) or else by the file names the annotations give.
    Every image must exist."""
    vocab = chair.ChairVocabulary.from_file(synonyms, matcher)
    annotated = chair.load_annotations(annotations, vocab)
    ids = sorted(annotated.objects)[:limit]
    if not ids:
        raise UserError(f"{', '.join(map(str, annotations))}: no annotated images")
    files = {}
    for image_id in ids:
        if image_pattern is not None:
            files[image_id] = Path(images) / _format_name(image_pattern, image_id)
        elif image_id in annotated.files:
            files[image_id] = Path(images) / annotated.files[image_id]
        else:
            raise UserError(
                f"image id {image_id}: the annotations name no image file for it; give an image pattern "
                "such as 'COCO_val2014_{image_id:012d}.jpg'"
            )
    check_images(files.values(), f"CHAIR images in {images}")
    return ChairInputs(vocab, annotated.objects, files)


def _format_name(pattern: str, image_id: int) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"image pattern {pattern!r}: {err!r}; it may use only {{image_id}}") from None


def evaluate_chair(
    model,
    inputs: ChairInputs,
    out_dir: str | Path,
    *,
    prompt: str = DESCRIBE_PROMPT,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=128),
) -> dict:
    """Describe ``inputs.images`` (resumable) and score the descriptions with CHAIR; writes
    ``descriptions.jsonl`` and ``chair.json`` (per-description details) and returns the
    overall metrics (with the matcher)."""
    out_dir = Path(out_dir)
    captions = describe_images(model, dict(inputs.images), out_dir / "descriptions.jsonl", prompt=prompt, settings=settings)
    result = chair.evaluate(sorted(captions.items()), inputs.truth, inputs.vocab)
    atomic_write_json(out_dir / "chair.json", result.to_dict())
    return result.to_dict(per_caption=False)
