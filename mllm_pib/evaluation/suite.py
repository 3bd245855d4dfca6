"""Benchmarks that need a model: POPE answers, image descriptions (for CHAIR and SHR), and the
SHR judging of given descriptions.

All of them go through :func:`~mllm_pib.evaluation.runner.generate_answers`, so every one is
batched, resumable and shardable across processes, for every backbone; each writes into an
evaluation folder that records what produced it (:mod:`~mllm_pib.evaluation.folder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mllm_pib.errors import UserError
from mllm_pib.evaluation import folder, pope
from mllm_pib.evaluation.runner import EvalItem, GenerationSettings, distributed, generate_answers
from mllm_pib.evaluation.shr import DESCRIBE_PROMPT
from mllm_pib.io import atomic_write_json

if TYPE_CHECKING:
    from mllm_pib.evaluation.judge import JudgeConfig


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
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict:
    """Answer and score POPE question files; writes ``answers_<name>.jsonl`` per question file
    and ``pope.json`` (the report keyed by split, plus ``mean_f1`` and the ``identity``). A rerun
    continues the answers of the same evaluation (see :mod:`~mllm_pib.evaluation.folder`).
    Returns the report, identity included."""
    out_dir = Path(out_dir)
    files = question_files(questions)
    inputs = {"questions": files, **({"labels": pope.label_files(labels)} if labels else {})}
    identity = folder.identity(model, inputs, folder.generation_settings(settings, style=style))
    folder.open_folder(out_dir, folder.POPE, identity, overwrite)
    scores: dict[str, pope.PopeScores] = {}
    for path in files:
        items = pope.load_questions(path, labels)
        pending = [EvalItem(q.question_id, _pope_image(images, q, path, allow_outside_images),
                            pope.format_prompt(q.text, style)) for q in items]
        answers = generate_answers(model, pending, out_dir / f"answers_{path.stem}.jsonl", settings, desc=f"POPE {path.stem}")
        for split, result in pope.score(items, answers).items():
            if split in scores:
                raise UserError(f"{path}: split {split!r} appears in more than one question file")
            scores[split] = result
    ordered = sorted(scores, key=lambda s: (pope.SPLITS.index(s) if s in pope.SPLITS else len(pope.SPLITS), s))
    report = {**pope.report({split: scores[split] for split in ordered}), "identity": identity}
    if distributed()[0] == 0:
        atomic_write_json(out_dir / "pope.json", report)
    return report


def _pope_image(root, question, path: Path, allow_outside: bool) -> Path:
    """A question's image, inside ``root`` unless ``allow_outside`` (see :mod:`mllm_pib.data.images`)."""
    from mllm_pib.data.images import ImageOutsideRoot, inside_root

    try:
        return inside_root(root, question.image, allow_outside)
    except ImageOutsideRoot as err:
        raise UserError(f"{path}: question {question.question_id}: field 'image': {err}") from None


def describe_images(
    model,
    images: dict[int, Path],
    out_file: str | Path,
    *,
    prompt: str = DESCRIBE_PROMPT,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=512, num_beams=5, batch_size=4),
) -> dict[int, str]:
    """Describe each image (``{image_id: path}``) into ``out_file``, in a folder an evaluation
    opened (see :func:`evaluate_chair`, :func:`evaluate_shr`); resumable. Returns ``{image_id: text}``."""
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
    overwrite: bool = False,
) -> dict:
    """Describe ``images`` (resumable) and score the descriptions with CHAIR against the
    annotations; writes ``descriptions.jsonl`` and ``chair.json`` (per-description details and
    the ``identity``) and returns the overall metrics with the identity."""
    from mllm_pib.evaluation import chair

    out_dir = Path(out_dir)
    inputs = {"annotations": chair.annotation_files(annotations),
              "synonyms": [chair.DEFAULT_SYNONYMS if synonyms is None else synonyms]}
    described = [[image_id, Path(path).name] for image_id, path in sorted(images.items())]
    generation = folder.generation_settings(settings, prompt=prompt, images=folder.digest(described))
    identity = folder.identity(model, inputs, generation)
    folder.open_folder(out_dir, folder.CHAIR, identity, overwrite)
    vocab = chair.ChairVocabulary.from_file(synonyms)
    truth = chair.load_ground_truth(annotations, vocab)
    captions = describe_images(model, images, out_dir / "descriptions.jsonl", prompt=prompt, settings=settings)
    result = chair.evaluate(sorted(captions.items()), truth, vocab)
    if distributed()[0] == 0:
        atomic_write_json(out_dir / "chair.json", {**result.to_dict(), "identity": identity})
    return {**result.to_dict(per_caption=False), "identity": identity}


def evaluate_shr(
    model,
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: JudgeConfig,
    out_dir: str | Path,
    *,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=512, num_beams=5, batch_size=4),
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict | None:
    """Describe every SHR validation image (resumable, shardable), then judge the descriptions
    (on the first process; the others return ``None``). Writes ``descriptions.jsonl``,
    ``judge_cache.jsonl``, ``judgements.jsonl`` and ``metrics.json`` (with the ``identity``)."""
    from mllm_pib.data.images import ImageResolver
    from mllm_pib.evaluation.shr import input_files, load_val_image_ids

    out_dir = Path(out_dir)
    generation = folder.generation_settings(settings, prompt=DESCRIBE_PROMPT)
    identity = folder.identity(model, {"shr": input_files(shr_dir, vg_dir)}, generation, judge=judge_identity(judge))
    folder.open_folder(out_dir, folder.SHR, identity, overwrite)
    resolve = ImageResolver(vg_dir, allow_outside=allow_outside_images)
    images = {image_id: resolve(image_id) for image_id in load_val_image_ids(shr_dir)}
    descriptions = describe_images(model, images, out_dir / "descriptions.jsonl", prompt=DESCRIBE_PROMPT, settings=settings)
    if distributed()[0] != 0:
        return None
    return _judge(descriptions, shr_dir, vg_dir, judge, out_dir, identity)


def judge_descriptions(
    descriptions_file: str | Path,
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: JudgeConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> dict:
    """SHR of given descriptions (a JSON object of VG image id -> text); writes as
    :func:`evaluate_shr` does, descriptions excepted."""
    from mllm_pib.evaluation.shr import input_files
    from mllm_pib.io import read_json

    descriptions = read_json(descriptions_file)
    if not isinstance(descriptions, dict) or not all(isinstance(v, str) for v in descriptions.values()):
        raise UserError(f"{descriptions_file}: expected a JSON object of image id -> description text")
    inputs = {"descriptions": [descriptions_file], "shr": input_files(shr_dir, vg_dir)}
    identity = folder.identity(None, inputs, None, judge=judge_identity(judge))
    folder.open_folder(out_dir, folder.SHR, identity, overwrite)
    return _judge(descriptions, shr_dir, vg_dir, judge, Path(out_dir), identity)


def judge_identity(judge: JudgeConfig) -> dict:
    """The judge settings that decide its verdicts (the key and the transport settings do not)."""
    return judge.model_dump(include={"url", "model", "temperature", "max_tokens"})


def _judge(descriptions: dict, shr_dir, vg_dir, judge: JudgeConfig, out_dir: Path, identity: dict) -> dict:
    from mllm_pib.evaluation.judge import JudgeClient
    from mllm_pib.evaluation.shr import run_shr

    client = JudgeClient(judge.model_copy(update={"cache_path": out_dir / "judge_cache.jsonl"}))
    return run_shr(descriptions, shr_dir, vg_dir, client, out_dir, identity=identity)
