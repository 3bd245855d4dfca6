"""Benchmarks that need a model: POPE answers, image descriptions (for CHAIR and SHR), and the
multi-model evaluation report of ``mllm-pib eval run``.

All of them go through :func:`~mllm_pib.evaluation.runner.generate_answers`, so every one is
batched, resumable and shardable across processes, for every backbone.
"""

from __future__ import annotations

from pathlib import Path

from mllm_pib.errors import UserError
from mllm_pib.evaluation import pope
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
    for path in question_files(questions):
        items = pope.load_questions(path, labels)
        pending = [EvalItem(q.question_id, Path(images) / q.image, pope.format_prompt(q.text, style)) for q in items]
        answers = generate_answers(model, pending, out_dir / f"answers_{path.stem}.jsonl", settings, desc=f"POPE {path.stem}")
        for split, result in pope.score(items, answers).items():
            if split in scores:
                raise UserError(f"{path}: split {split!r} appears in more than one question file")
            scores[split] = result
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
    """Describe each image (``{image_id: path}``); resumable. Returns ``{image_id: text}``."""
    items = [EvalItem(image_id, path, prompt) for image_id, path in sorted(images.items())]
    return generate_answers(model, items, out_file, settings, desc="describing")


def evaluate_chair(
    model,
    images: dict[int, Path],
    annotations: list[str | Path],
    out_dir: str | Path,
    *,
    synonyms: str | Path | None = None,
    prompt: str = DESCRIBE_PROMPT,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=128),
) -> dict:
    """Describe ``images`` (resumable) and score the descriptions with CHAIR against the
    annotations; writes ``descriptions.jsonl`` and ``chair.json`` (per-description details)
    and returns the overall metrics."""
    from mllm_pib.evaluation import chair

    out_dir = Path(out_dir)
    vocab = chair.ChairVocabulary.from_file(synonyms)
    truth = chair.load_ground_truth(annotations, vocab)
    captions = describe_images(model, images, out_dir / "descriptions.jsonl", prompt=prompt, settings=settings)
    result = chair.evaluate(sorted(captions.items()), truth, vocab)
    atomic_write_json(out_dir / "chair.json", result.to_dict())
    return result.to_dict(per_caption=False)
