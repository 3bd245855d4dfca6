"""Benchmarks that need a model: POPE answers, image descriptions (for CHAIR and SHR), and the
SHR judging of given descriptions.

All of them go through :func:`~mllm_pib.evaluation.runner.generate_answers`, so every one is
batched, resumable and shardable across processes, for every backbone; each writes into an
evaluation folder that records what produced it (:mod:`~mllm_pib.evaluation.folder`). Their
inputs are loaded and checked (:func:`load_pope_sets`, :func:`load_chair_inputs`,
:func:`check_shr_inputs`) before any model is loaded, so a bad file fails in seconds, not after
a benchmark has run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_pib.errors import UserError
from mllm_pib.evaluation import chair, folder, pope
from mllm_pib.evaluation.runner import EvalItem, GenerationSettings, distributed, generate_answers
from mllm_pib.evaluation.shr import DESCRIBE_PROMPT
from mllm_pib.io import atomic_write_json

if TYPE_CHECKING:
    from mllm_pib.evaluation.judge import JudgeConfig
    from mllm_pib.evaluation.shr import ShrOptions


def question_files(questions: str | Path) -> list[Path]:
    """A question file, or every ``*.json``/``*.jsonl`` question file of a directory (hidden
    files left out: ``eval pope build`` keeps its ownership marker there)."""
    path = Path(questions)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and not p.name.startswith("."))
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
    """One POPE question file, loaded, with the image file of each question."""

    path: Path
    questions: list[pope.PopeQuestion]
    images: list[Path]


def load_pope_sets(
    questions: str | Path, images: str | Path, labels: str | Path | None = None, allow_outside_images: bool = False
) -> list[PopeSet]:
    """Load every question file and check that each question's image is inside ``images``
    (unless ``allow_outside_images``) and exists, and that no split comes from two files."""
    sets, splits = [], {}
    for path in question_files(questions):
        items = pope.load_questions(path, labels)
        files = [_pope_image(images, q, path, allow_outside_images) for q in items]
        check_images(files, f"{path} (images in {images})")
        for split in dict.fromkeys(q.split for q in items):
            if split in splits:
                raise UserError(f"{path}: split {split!r} is also in {splits[split]}")
            splits[split] = path
        sets.append(PopeSet(path, items, files))
    return sets


def _pope_image(root, question, path: Path, allow_outside: bool) -> Path:
    """A question's image, inside ``root`` unless ``allow_outside`` (see :mod:`mllm_pib.data.images`)."""
    from mllm_pib.data.images import ImageOutsideRoot, inside_root

    try:
        return inside_root(root, question.image, allow_outside)
    except ImageOutsideRoot as err:
        raise UserError(f"{path}: question {question.question_id}: field 'image': {err}") from None


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
    sets = load_pope_sets(questions, images, labels, allow_outside_images)
    inputs = {"questions": [qset.path for qset in sets], **({"labels": pope.label_files(labels)} if labels else {})}
    identity = folder.identity(model, inputs, folder.generation_settings(settings, style=style))
    folder.open_folder(out_dir, folder.POPE, identity, overwrite)
    scores: dict[str, pope.PopeScores] = {}
    for qset in sets:
        pending = [EvalItem(q.question_id, image, pope.format_prompt(q.text, style))
                   for q, image in zip(qset.questions, qset.images)]
        answers = generate_answers(
            model, pending, out_dir / f"answers_{qset.path.stem}.jsonl", settings, desc=f"POPE {qset.path.stem}"
        )
        scores.update(pope.score(qset.questions, answers))
    ordered = sorted(scores, key=lambda s: (pope.SPLITS.index(s) if s in pope.SPLITS else len(pope.SPLITS), s))
    report = {**pope.report({split: scores[split] for split in ordered}), "identity": identity}
    if distributed()[0] == 0:
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
    """Describe each image (``{image_id: path}``) into ``out_file``, in a folder an evaluation
    opened (see :func:`evaluate_chair`, :func:`evaluate_shr`); resumable. Returns ``{image_id: text}``.

    The file holds ``{"question_id": image id, "prompt", "text"}`` lines, which ``eval chair
    --captions`` and ``eval shr judge --descriptions`` read as they are."""
    items = [EvalItem(image_id, path, prompt) for image_id, path in sorted(images.items())]
    return generate_answers(model, items, out_file, settings, desc="describing")


@dataclass(frozen=True)
class ChairInputs:
    """What CHAIR needs before a model describes anything: the vocabulary (and its matcher),
    the ground-truth objects per image id, the image file of every image to describe, and the
    files read, by role (``annotations``, ``synonyms``: for the evaluation's identity)."""

    vocab: chair.ChairVocabulary
    truth: Mapping[int, set[str]]
    images: Mapping[int, Path]
    files: Mapping[str, list[Path]]


def chair_files(annotations: Iterable[str | Path], synonyms: str | Path | None) -> dict[str, list[Path]]:
    """The files CHAIR reads, by role: the annotation files and the synonym list."""
    return {"annotations": chair.annotation_files(annotations),
            "synonyms": [Path(chair.DEFAULT_SYNONYMS if synonyms is None else synonyms)]}


def load_chair_inputs(
    annotations: list[str | Path],
    images: str | Path,
    *,
    synonyms: str | Path | None = None,
    matcher: str = "builtin",
    image_pattern: str | None = None,
    limit: int | None = None,
    allow_outside_images: bool = False,
) -> ChairInputs:
    """Read the annotations and pick the images to describe: the annotated image ids in order,
    the first ``limit`` of them, named by ``image_pattern`` (e.g.
    ``COCO_val2014_{image_id:012d}.jpg``) or else by the file names the annotations give.
    Every image must exist, inside ``images`` unless ``allow_outside_images``."""
    from mllm_pib.data.images import ImageOutsideRoot, inside_root

    vocab = chair.ChairVocabulary.from_file(synonyms, matcher)
    annotated = chair.load_annotations(annotations, vocab)
    ids = sorted(annotated.objects)[:limit]
    if not ids:
        raise UserError(f"{', '.join(map(str, annotations))}: no annotated images")
    files = {}
    for image_id in ids:
        if image_pattern is not None:
            name = _format_name(image_pattern, image_id)
        elif image_id in annotated.files:
            name = annotated.files[image_id]
        else:
            raise UserError(
                f"image id {image_id}: the annotations name no image file for it; give an image pattern "
                "such as 'COCO_val2014_{image_id:012d}.jpg'"
            )
        try:
            files[image_id] = inside_root(images, name, allow_outside_images)
        except ImageOutsideRoot as err:
            raise UserError(f"CHAIR image id {image_id}: {err}") from None
    check_images(files.values(), f"CHAIR images in {images}")
    return ChairInputs(vocab, annotated.objects, files, chair_files(annotations, synonyms))


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
    overwrite: bool = False,
) -> dict:
    """Describe ``inputs.images`` (resumable) and score the descriptions with CHAIR; writes
    ``descriptions.jsonl`` and ``chair.json`` (per-description details and the ``identity``:
    model, annotation and synonym files, matcher, generation settings, images described) and
    returns the overall metrics (with the matcher) and the identity."""
    out_dir = Path(out_dir)
    described = [[image_id, Path(path).name] for image_id, path in sorted(inputs.images.items())]
    generation = folder.generation_settings(settings, prompt=prompt, images=folder.digest(described))
    identity = folder.identity(model, dict(inputs.files), generation, scoring={"matcher": inputs.vocab.matcher})
    folder.open_folder(out_dir, folder.CHAIR, identity, overwrite)
    captions = describe_images(model, dict(inputs.images), out_dir / "descriptions.jsonl", prompt=prompt, settings=settings)
    result = chair.evaluate(sorted(captions.items()), inputs.truth, inputs.vocab)
    if distributed()[0] == 0:
        atomic_write_json(out_dir / "chair.json", {**result.to_dict(), "identity": identity})
    return {**result.to_dict(per_caption=False), "identity": identity}


def check_shr_inputs(
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: JudgeConfig,
    options: ShrOptions | None = None,
    allow_outside_images: bool = False,
) -> dict[int, Path]:
    """Check what SHR needs before a model describes anything: SHR's and VG's files, every
    validation image (inside ``vg_dir`` unless ``allow_outside_images``), the judge prompt and
    the judge's API key variable. Returns the image file of every validation image."""
    from mllm_pib.data.images import ImageResolver
    from mllm_pib.evaluation.judge import read_api_key
    from mllm_pib.evaluation.shr import JudgePrompt
    from mllm_pib.evaluation.shr_data import input_files, load_val_image_ids

    for path in input_files(shr_dir, vg_dir):
        if not path.is_file():
            raise UserError(f"{path}: SHR input file not found")
    resolve = ImageResolver(vg_dir, allow_outside=allow_outside_images)
    images = {image_id: resolve(image_id) for image_id in load_val_image_ids(shr_dir)}
    check_images(images.values(), f"SHR images in {vg_dir}")
    JudgePrompt.load(options.judge_prompt if options else None)
    read_api_key(judge.api_key_env)
    return images


def evaluate_shr(
    model,
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: JudgeConfig,
    out_dir: str | Path,
    *,
    options: ShrOptions | None = None,
    settings: GenerationSettings = GenerationSettings(max_new_tokens=512, num_beams=5, batch_size=4),
    overwrite: bool = False,
    allow_outside_images: bool = False,
) -> dict | None:
    """Describe every SHR validation image (resumable, shardable), then judge the descriptions
    as ``options`` say (on the first process; the others return ``None``). Writes
    ``descriptions.jsonl``, ``judge_cache.jsonl``, ``judgements.jsonl`` and ``metrics.json``
    (with the ``identity``)."""
    from mllm_pib.evaluation.shr import ShrOptions
    from mllm_pib.evaluation.shr_data import input_files

    out_dir, options = Path(out_dir), options or ShrOptions()
    images = check_shr_inputs(shr_dir, vg_dir, judge, options, allow_outside_images)
    generation = folder.generation_settings(settings, prompt=DESCRIBE_PROMPT)
    identity = folder.identity(model, {"shr": input_files(shr_dir, vg_dir)}, generation,
                               judge=judge_identity(judge, options))
    folder.open_folder(out_dir, folder.SHR, identity, overwrite)
    descriptions = describe_images(model, images, out_dir / "descriptions.jsonl", prompt=DESCRIBE_PROMPT, settings=settings)
    if distributed()[0] != 0:
        return None
    return _judge(descriptions, shr_dir, vg_dir, judge, options, out_dir, identity)


def judge_descriptions(
    descriptions_file: str | Path,
    shr_dir: str | Path,
    vg_dir: str | Path,
    judge: JudgeConfig,
    out_dir: str | Path,
    *,
    options: ShrOptions | None = None,
    overwrite: bool = False,
) -> dict:
    """SHR of given descriptions: a JSON object of VG image id -> text, or the
    ``descriptions.jsonl`` :func:`evaluate_shr` writes; writes as :func:`evaluate_shr` does,
    descriptions excepted."""
    from mllm_pib.evaluation.judge import read_api_key
    from mllm_pib.evaluation.shr import ShrOptions
    from mllm_pib.evaluation.shr_data import input_files, load_descriptions

    out_dir, options = Path(out_dir), options or ShrOptions()
    descriptions = load_descriptions(descriptions_file)
    read_api_key(judge.api_key_env)  # a missing key fails before the folder is touched
    if overwrite and out_dir.resolve() in Path(descriptions_file).resolve().parents:
        raise UserError(f"{descriptions_file}: lies in the output folder that --overwrite would clear; "
                        "choose another output folder")
    inputs = {"descriptions": [descriptions_file], "shr": input_files(shr_dir, vg_dir)}
    identity = folder.identity(None, inputs, None, judge=judge_identity(judge, options))
    folder.open_folder(out_dir, folder.SHR, identity, overwrite)
    return _judge(descriptions, shr_dir, vg_dir, judge, options, out_dir, identity)


def judge_identity(judge: JudgeConfig, options: ShrOptions) -> dict:
    """Every judge setting that decides the verdicts: endpoint, model, request settings, how
    often a reply without a judgement is asked again, the judge prompt (its sha256), the reply
    parser and the prompt limit. The API key, the cache and the transport settings (deadline,
    retries, concurrency, reply size cap) do not."""
    from mllm_pib.evaluation.shr import JudgePrompt

    return {
        "url": judge.endpoint,
        "model": judge.model,
        "request": judge.request.model_dump(),
        "reasks": judge.reasks,
        "prompt_sha256": JudgePrompt.load(options.judge_prompt).sha256,
        "parser": options.parser,
        "max_prompt_chars": options.max_prompt_chars,
    }


def _judge(descriptions: dict, shr_dir, vg_dir, judge: JudgeConfig, options: ShrOptions, out_dir: Path,
           identity: dict) -> dict:
    from mllm_pib.evaluation.judge import JudgeClient
    from mllm_pib.evaluation.shr import run_shr

    client = JudgeClient(judge.model_copy(update={"cache_path": judge.cache_path or out_dir / "judge_cache.jsonl"}))
    return run_shr(descriptions, shr_dir, vg_dir, client, out_dir, options, identity=identity)
