"""``mllm-pib eval run``: several models on the same benchmarks, one report.

The config lists (backbone, model, pib) entries and the benchmarks to run (POPE on its splits,
CHAIR, and SHR when a judge is configured). Each model's outputs go to ``out/<name>/<benchmark>/``,
evaluation folders that a rerun continues when nothing they depend on changed (see
:mod:`~mllm_pib.evaluation.folder`); the comparison goes to ``report.json`` (each benchmark's
scores with their identity), ``report.md`` and PNG charts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from mllm_pib.errors import UserError
from mllm_pib.evaluation.judge import JudgeConfig
from mllm_pib.evaluation.runner import GenerationSettings
from mllm_pib.evaluation.shr import ShrOptions, summary as shr_summary
from mllm_pib.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from mllm_pib.evaluation.suite import ChairInputs


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(Strict):
    name: str
    backbone: str | None = Field(default=None, description="default: the PIB's, else the one registering the "
                                 "model_type of model/config.json")
    model: str
    pib: str | None = None
    allow_base_mismatch: bool = Field(default=False, description="load the PIB onto a base other than its own")
    options: dict = Field(default_factory=dict)


class PopeSection(Strict):
    questions: str
    images: str
    labels: str | None = None
    style: Literal["hadpo", "llava"] = "hadpo"
    batch_size: int = Field(default=8, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)


class ChairSection(Strict):
    annotations: list[str] = Field(min_length=1, description="COCO instance/caption files or an objects jsonl")
    images: str
    image_pattern: str | None = Field(
        default=None,
        description="file name of an image id, e.g. COCO_val2014_{image_id:012d}.jpg; "
        "by default the file names the annotations give",
    )
    synonyms: str | None = None
    matcher: Literal["builtin", "nltk"] = Field(default="builtin", description="CHAIR's word matcher")
    limit: int | None = Field(default=None, gt=0, description="describe only the first N annotated images")
    prompt: str = "Describe this image in detail."
    max_new_tokens: int = Field(default=128, gt=0)
    num_beams: int = Field(default=1, gt=0)
    batch_size: int = Field(default=8, gt=0)


class ShrSection(ShrOptions):
    """SHR: where its inputs are, the judge, how descriptions are judged and generated."""

    shr_dir: str
    vg_dir: str
    judge: JudgeConfig
    num_beams: int = 5
    max_new_tokens: int = 512
    batch_size: int = 4


class EvalRunConfig(Strict):
    out: str
    models: list[ModelEntry] = Field(min_length=1)
    pope: PopeSection | None = None
    chair: ChairSection | None = None
    shr: ShrSection | None = None
    allow_outside_images: bool = Field(default=False, description="use POPE, CHAIR and SHR images outside their image folder")


def run_suite(config: EvalRunConfig, overwrite: bool = False) -> dict:
    """Evaluate every model on every configured benchmark; returns and writes the report.
    ``overwrite`` starts every evaluation folder afresh."""
    from mllm_pib import __version__
    from mllm_pib.checkpoint import load_model
    from mllm_pib.evaluation.folder import REPORT, open_folder

    chair_inputs = check_inputs(config)
    out = open_folder(config.out, REPORT, {"mllm_pib_version": __version__}, overwrite)
    report: dict = {"models": {}}
    for entry in config.models:
        model = load_model(entry.model, backbone=entry.backbone, pib=entry.pib,
                           allow_base_mismatch=entry.allow_base_mismatch, **entry.options)
        report["models"][entry.name] = {
            "backbone": model.backbone.name, "model": entry.model, "pib": entry.pib,
            **evaluate_model(model, config, out / entry.name, chair_inputs, overwrite),
        }
        del model
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot(report, out)
    return report


def check_inputs(config: EvalRunConfig) -> ChairInputs | None:
    """Check every model entry and load every benchmark input before any model runs, so a bad
    path or record fails at once; returns the CHAIR inputs (read once for all models)."""
    from mllm_pib.checkpoint import backbone_name
    from mllm_pib.evaluation.suite import check_shr_inputs, load_chair_inputs, load_pope_sets
    from mllm_pib.plugins import get_backbone

    names = [entry.name for entry in config.models]
    if len(set(names)) != len(names):
        raise UserError(f"eval run: model names must be unique, got {names}")
    for entry in config.models:
        if entry.pib is not None and not Path(entry.pib).is_dir():
            raise UserError(f"eval run: model {entry.name!r}: PIB checkpoint {entry.pib} not found")
        get_backbone(backbone_name(entry.model, entry.backbone, entry.pib))
    if config.pope:
        load_pope_sets(config.pope.questions, config.pope.images, config.pope.labels, config.allow_outside_images)
    if config.shr:
        check_shr_inputs(config.shr.shr_dir, config.shr.vg_dir, config.shr.judge, config.shr, config.allow_outside_images)
    if not config.chair:
        return None
    c = config.chair
    return load_chair_inputs(c.annotations, c.images, synonyms=c.synonyms, matcher=c.matcher,
                             image_pattern=c.image_pattern, limit=c.limit, allow_outside_images=config.allow_outside_images)


def evaluate_model(model, config: EvalRunConfig, out: Path, chair_inputs: ChairInputs | None = None,
                   overwrite: bool = False) -> dict:
    from mllm_pib.evaluation.suite import evaluate_chair, evaluate_pope

    results: dict = {}
    if config.pope:
        p = config.pope
        settings = GenerationSettings(max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, stop_at_sentence_end=True)
        results["pope"] = evaluate_pope(model, p.questions, p.images, out / "pope", style=p.style, labels=p.labels,
                                        settings=settings, overwrite=overwrite,
                                        allow_outside_images=config.allow_outside_images)
    if config.chair:
        c = config.chair
        settings = GenerationSettings(max_new_tokens=c.max_new_tokens, num_beams=c.num_beams, batch_size=c.batch_size)
        results["chair"] = evaluate_chair(model, chair_inputs, out / "chair", prompt=c.prompt, settings=settings,
                                          overwrite=overwrite)
    if config.shr:
        results["shr"] = evaluate_shr(model, config.shr, out / "shr", overwrite, config.allow_outside_images)
    return results


def evaluate_shr(model, section: ShrSection, out: Path, overwrite: bool = False, allow_outside_images: bool = False) -> dict:
    from mllm_pib.evaluation.suite import evaluate_shr as describe_and_judge

    settings = GenerationSettings(max_new_tokens=section.max_new_tokens, num_beams=section.num_beams,
                                  batch_size=section.batch_size)
    options = ShrOptions(**section.model_dump(include=set(ShrOptions.model_fields)))
    return describe_and_judge(model, section.shr_dir, section.vg_dir, section.judge, out, options=options,
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
    lines += [f"- {name} SHR {line}" for name, result in report["models"].items() if "shr" in result
              for line in shr_summary(result["shr"])]
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
    if result.get("shr", {}).get("shr") is not None:
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
