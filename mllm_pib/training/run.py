"""``mllm-pib train``: from a config to a trained PIB checkpoint."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from mllm_pib.config import TrainConfig
from mllm_pib.data.dataset import PreferenceCollator, PreferenceDataset
from mllm_pib.data.images import ImageResolver
from mllm_pib.data.records import READERS, BadRecordBudget
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_write_json
from mllm_pib.log import get_logger
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone

logger = get_logger(__name__)


def bootstrap(config: TrainConfig) -> None:
    """Create the tiny model and synthetic data a self-contained config asks for, if absent."""
    boot = config.bootstrap
    if boot.tiny_model and config.model and not (Path(config.model) / "config.json").is_file():
        logger.info(f"bootstrap: writing a tiny random {config.backbone} model to {config.model}")
        get_backbone(config.backbone).write_tiny(config.model, seed=boot.seed)
    if boot.synthetic_scenes and boot.data_dir and not all(Path(s.path).exists() for s in config.data):
        from mllm_pib.demo.world import World, export_dataset

        logger.info(f"bootstrap: exporting {boot.synthetic_scenes} synthetic scenes to {boot.data_dir}")
        export_dataset(World(boot.seed).sample(boot.synthetic_scenes), boot.data_dir, seed=boot.seed)


def build_model(config: TrainConfig, backbone) -> PIBModel:
    from pydantic import ValidationError

    try:
        return PIBModel(backbone, pib_config=config.pib.model_dump())
    except ValidationError as err:  # options valid alone, but not with this backbone's widths
        problems = "; ".join(problem["msg"].removeprefix("Value error, ") for problem in err.errors())
        raise UserError(f"pib: {problems} (backbone {backbone.name!r}); change the pib options") from None


def build_dataset(config: TrainConfig, backbone, budget: BadRecordBudget) -> PreferenceDataset:
    sources = []
    for source in config.data:
        images = ImageResolver(source.images or Path(source.path).parent)
        sources.append(READERS[source.format](source.path, images, budget))
    return PreferenceDataset(itertools.chain(*sources), backbone, budget, config.max_length)


def cached_dataset(config: TrainConfig, backbone, model, policy):
    """The training pairs read from ``config.feature_cache``, after checking it fits this run."""
    from mllm_pib.errors import UserError
    from mllm_pib.training.feature_cache import CachedPairs, cache_key, check_cache, collate_cached

    if policy.trains_before_pib:
        raise UserError(
            "feature_cache: the cache holds frozen backbone outputs, but this freeze policy trains parts "
            "before the PIB (LoRA or the projector); drop feature_cache or freeze those parts"
        )
    manifest = check_cache(config.feature_cache, cache_key(config, backbone, model))
    return CachedPairs(config.feature_cache, manifest), collate_cached


def train(config: TrainConfig, output_dir: str | None = None, resume: bool = False) -> Path:
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.trainer import PIBTrainer, start_distributed

    bootstrap(config)
    if output_dir:
        config.training["output_dir"] = output_dir
    args = config.training_arguments()
    start_distributed(args)
    from transformers import set_seed

    backbone = get_backbone(config.backbone).load(config.model, **config.backbone_options)
    # after the load, which draws random numbers differently under ZeRO-3: the block's
    # initialisation is part of the run's reproducibility
    set_seed(args.seed)
    model = build_model(config, backbone)
    policy = config.freeze_policy()
    logger.info("\n".join(str(row) for row in policy.apply(model)))
    budget = BadRecordBudget(config.max_bad_records)
    if config.feature_cache:
        dataset, collator = cached_dataset(config, backbone, model, policy)
    else:
        dataset, collator = build_dataset(config, backbone, budget), PreferenceCollator(backbone)
    logger.info(f"data: {len(dataset)} preference pairs; {budget.summary()}")
    trainer = PIBTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        step=PreferenceStep(model, config.loss), policy=policy,
    )
    trainer.train(resume_from_checkpoint=resume or None)
    out = Path(args.output_dir)
    trainer.save_model(str(out))
    atomic_write_json(out / "log_history.json", trainer.state.log_history)
    atomic_write_json(out / "train_config.json", json.loads(config.model_dump_json()))
    logger.info(f"data: {budget.summary()}")
    logger.info(f"saved the PIB checkpoint to {out}")
    if config.pope:
        evaluate_trained(model.eval(), config, out)
    return out


def evaluate_trained(model, config: TrainConfig, out: Path) -> dict:
    """POPE of the freshly trained model, written to ``out/pope/pope.json``."""
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.evaluation.suite import evaluate_pope

    p = config.pope
    settings = GenerationSettings(max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, stop_at_sentence_end=True)
    with torch.no_grad():
        return evaluate_pope(model, p.questions, p.images, out / "pope", style=p.style, labels=p.labels, settings=settings)
