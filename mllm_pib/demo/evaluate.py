"""Evaluate one model of the demo — the base model (identity PIB) or base + trained PIB — with
the project's model-driven benchmarks: POPE answers and scores, then CHAIR of greedy
descriptions of the held-out images against their ground-truth objects."""

from __future__ import annotations

from pathlib import Path

from mllm_pib.demo.config import EvalConfig
from mllm_pib.demo.data import SeedData

POPE_ANSWER_TOKENS = 16  # "No, there is no flag." and a margin; answers stop at their first "."


def evaluate_model(
    model_path: str | Path,
    backbone: str,
    pib: str | Path | None,
    data: SeedData,
    settings: EvalConfig,
    out_dir: str | Path,
) -> dict:
    """``{"pope": {split: metrics, ..., "mean_f1", "identity"}, "chair": {chair_s, chair_i, recall,
    ..., "identity"}}``; POPE answers and scores go to ``out_dir/pope``, descriptions and
    per-description CHAIR details to ``out_dir/chair``."""
    from mllm_pib.checkpoint import load_model
    from mllm_pib.evaluation import chair
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.evaluation.suite import ChairInputs, chair_files, evaluate_chair, evaluate_pope

    out = Path(out_dir)
    annotations = [data.chair_annotations]
    vocab = chair.ChairVocabulary.from_file(data.chair_synonyms)
    chair_inputs = ChairInputs(vocab, chair.load_annotations(annotations, vocab).objects, data.chair_images,
                               chair_files(annotations, data.chair_synonyms))
    model = load_model(str(model_path), backbone=backbone, pib=str(pib) if pib else None)
    pope_report = evaluate_pope(
        model, data.pope_dir, data.eval_image_dir, out / "pope",
        settings=GenerationSettings(
            max_new_tokens=POPE_ANSWER_TOKENS, batch_size=settings.batch_size, stop_at_sentence_end=True
        ),
    )
    chair_report = evaluate_chair(
        model, chair_inputs, out / "chair",
        settings=GenerationSettings(max_new_tokens=settings.max_description_tokens, batch_size=settings.batch_size),
    )
    return {"pope": pope_report, "chair": chair_report}
