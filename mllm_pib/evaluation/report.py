"""``mllm-pib eval run``: several models on the same benchmarks, one report.

The config lists (backbone, model, pib) entries and the benchmarks to run (POPE on its splits,
CHAIR, and SHR when a judge is configured). Each model's outputs go to ``out/<name>/<benchmark>/``,
evaluation folders that a rerun continues when nothing they depend on changed (see
:mod:`~mllm_pib.evaluation.folder`); the comparison goes to ``report.json`` (each benchmark's
scores with their identity), ``report.md`` and PNG charts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mllm_pib.errors import UserError
from mllm_pib.evaluation.runner import GenerationSettings
from mllm_pib.io import atomic_write_json, atomic_write_text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(Strict):
    name: str
    backbone: str
    model: str
    pib: str | None = None
    allow_base_mismatch: bool = Field(default=False, description="load the PIB onto a base other than its own")
    options: dict = Field(default_factory=dict)


class PopeSection(Strict):
    questions: str
    images: str
    labels: str | None = None
    style: str = "hadpo"
    batch_size: int = 8
    max_new_tokens: int = 64


class ChairSection(Strict):
    annotations: list[str] = Field(min_length=1, description="COCO instance/caption files or an objects jsonl")
    images: str
    image_pattern: str = Field(default="COCO_val2014_{image_id:012d}.jpg", description="file name of an image id")
    synonyms: str | None = None
    limit: int | None = Field(default=None, gt=0, description="describe only the first N annotated images")
    prompt: str = "Describe this image in detail."
    max_new_tokens: int = 128
    num_beams: int = 1
    batch_size: int = 8


class JudgeSection(Strict):
    url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 4


class ShrSection(Strict):
    shr_dir: str
    vg_dir: str
    judge: JudgeSection
    num_beams: int = 5
    max_new_tokens: int = 512
    batch_size: int = 4


class EvalRunConfig(Strict):
    out: str
    models: list[ModelEntry] = Field(min_length=1)
    pope: PopeSection | None = None
    chair: ChairSection | None = None
    shr: ShrSection | None = None
    allow_outside_images: bool = Field(default=False, description="use POPE and SHR images outside their image folder")


def run_suite(config: EvalRunConfig, overwrite: bool = False) -> dict:
    """Evaluate every model on every configured benchmark; returns and writes the report.
    ``overwrite`` starts every evaluation folder afresh."""
    from mllm_pib import __version__
    from mllm_pib.checkpoint import load_model
    from mllm_pib.evaluation.folder import REPORT, open_folder

    names = [entry.name for entry in config.models]
    if len(set(names)) != len(names):
        raise UserError(f"eval run: model names must be unique, got {names}")
    out = open_folder(config.out, REPORT, {"mllm_pib_version": __version__}, overwrite)
    report: dict = {"models": {}}
    for entry in config.models:
        model = load_model(entry.model, backbone=entry.backbone, pib=entry.pib,
                           allow_base_mismatch=entry.allow_base_mismatch, **entry.options)
        report["models"][entry.name] = {
            "backbone": entry.backbone, "model": entry.model, "pib": entry.pib,
            **evaluate_model(model, config, out / entry.name, overwrite),
        }
        del model
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot(report, out)
    return report


def evaluate_model(model, config: EvalRunConfig, out: Path, overwrite: bool = False) -> dict:
    from mllm_pib.evaluation.suite import evaluate_pope

    results: dict = {}
    if config.pope:
        p = config.pope
        settings = GenerationSettings(max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, stop_at_sentence_end=True)
        results["pope"] = evaluate_pope(model, p.questions, p.images, out / "pope", style=p.style, labels=p.labels,
                                        settings=settings, overwrite=overwrite,
                                        allow_outside_images=config.allow_outside_images)
    if config.chair:
        results["chair"] = evaluate_chair(model, config.chair, out / "chair", overwrite)
    if config.shr:
        results["shr"] = evaluate_shr(model, config.shr, out / "shr", overwrite, config.allow_outside_images)
    return results


def evaluate_chair(model, section: ChairSection, out: Path, overwrite: bool = False) -> dict:
    from mllm_pib.evaluation import chair
    from mllm_pib.evaluation.suite import evaluate_chair as describe_and_score

    # the annotated images, in id order, limited to the first N
    truth = chair.load_ground_truth(section.annotations, chair.ChairVocabulary.from_file(section.synonyms))
    ids = sorted(truth)[: section.limit]
    images = {i: Path(section.images) / section.image_pattern.format(image_id=i) for i in ids}
    settings = GenerationSettings(max_new_tokens=section.max_new_tokens, num_beams=section.num_beams,
                                  batch_size=section.batch_size)
    return describe_and_score(model, images, section.annotations, out, synonyms=section.synonyms,
                              prompt=section.prompt, settings=settings, overwrite=overwrite)


def evaluate_shr(model, section: ShrSection, out: Path, overwrite: bool = False, allow_outside_images: bool = False) -> dict:
    from mllm_pib.evaluation.judge import JudgeConfig
    from mllm_pib.evaluation.suite import evaluate_shr as describe_and_judge

    settings = GenerationSettings(max_new_tokens=section.max_new_tokens, num_beams=section.num_beams,
                                  batch_size=section.batch_size)
    return describe_and_judge(model, section.shr_dir, section.vg_dir, JudgeConfig(**section.judge.model_dump()), out,
                              settings=settings, overwrite=overwrite, allow_outside_images=allow_outside_images)


def markdown(report: dict) -> str:
    """A table: one row per model, one column per metric and split."""
    rows = {name: flat_metrics(result) for name, result in report["models"].items()}
    columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics))
    lines = ["# Hallucination evaluation", "", "| model | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.2f}" if c in metrics else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "POPE and CHAIR figures are percentages; SHR is hallucinated sentences per 100 judged."]
    return "\n".join(lines) + "\n"


def flat_metrics(result: dict) -> dict[str, float]:
    from mllm_pib.evaluation.pope import split_scores

    metrics: dict[str, float] = {}
    if "pope" in result:
        for split, scores in split_scores(result["pope"]).items():
            metrics[f"POPE {split} F1"] = 100 * scores["f1"]
            metrics[f"POPE {split} acc"] = 100 * scores["accuracy"]
            metrics[f"POPE {split} yes"] = 100 * scores["yes_ratio"]
        metrics["POPE mean F1"] = 100 * result["pope"]["mean_f1"]
    if "chair" in result:
        metrics["CHAIR_s"] = 100 * result["chair"]["chair_s"]
        metrics["CHAIR_i"] = 100 * result["chair"]["chair_i"]
        metrics["CHAIR recall"] = 100 * result["chair"]["recall"]
    if "shr" in result:
        metrics["SHR"] = result["shr"]["shr"]
    return metrics


def plot(report: dict, out: Path) -> list[Path]:
    """One grouped bar chart per benchmark family (POPE F1 by split; CHAIR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = {name: flat_metrics(result) for name, result in report["models"].items()}
    for title, prefix, filename in (("POPE F1 by split", "POPE ", "pope.png"), ("CHAIR", "CHAIR", "chair.png")):
        columns = [c for c in dict.fromkeys(k for m in rows.values() for k in m)
                   if c.startswith(prefix) and (prefix != "POPE " or c.endswith(" F1"))]
        if not columns:
            continue
        fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2, 3.5))
        width = 0.8 / len(rows)
        for i, (name, metrics) in enumerate(rows.items()):
            xs = [j + i * width for j in range(len(columns))]
            ax.bar(xs, [metrics.get(c, 0.0) for c in columns], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns, fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{filename}.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(out / filename)
        written.append(out / filename)
    return written
