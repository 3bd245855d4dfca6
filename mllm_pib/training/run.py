"""``mllm-pib train``: from a config to a trained PIB checkpoint."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import torch

from mllm_pib.checkpoint import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from mllm_pib.config import TrainConfig
from mllm_pib import ranks
from mllm_pib.data.dataset import PreferenceCollator, PreferenceDataset
from mllm_pib.data.images import ImageResolver
from mllm_pib.data.records import READERS, BadRecordBudget
from mllm_pib.errors import Interrupted, UserError
from mllm_pib.io import atomic_write_json
from mllm_pib.log import get_logger
from mllm_pib.model import PIBModel
from mllm_pib.outputs import OutputKind, claim
from mllm_pib.plugins import get_backbone

logger = get_logger(__name__)

LOG_HISTORY = "log_history.json"
TRAIN_CONFIG = "train_config.json"


def bootstrap(config: TrainConfig) -> None:
    """Create the tiny model and synthetic data a self-contained config asks for, if absent: on
    rank 0, while the other processes of a launcher wait for them (each appears atomically)."""
    boot = config.bootstrap

    def model_missing() -> bool:
        return bool(boot.tiny_model and config.model and not (Path(config.model) / "config.json").is_file())

    def data_missing() -> bool:
        return bool(boot.synthetic_scenes and boot.data_dir and not all(Path(s.path).exists() for s in config.data))

    if not ranks.is_first():
        ranks.wait_for_first(lambda: not (model_missing() or data_missing()), "the tiny model and synthetic data")
        return
    if model_missing():
        logger.info(f"bootstrap: writing a tiny random {config.backbone} model to {config.model}")
        get_backbone(config.backbone).write_tiny(config.model, seed=boot.seed, **boot.tiny_options)
    if data_missing():
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
    """The checked, tokenised pairs of every data source; none left is a :class:`UserError`."""
    read: Counter[str] = Counter()
    sources = []
    for source in config.data:
        images = ImageResolver(source.images or Path(source.path).parent, allow_outside=config.allow_outside_images)
        sources.append(_counted(READERS[source.format](source.path, images, budget), read, source.path))
    dataset = PreferenceDataset(itertools.chain(*sources), backbone, budget, config.max_length)
    if not len(dataset):
        raise UserError(f"no training pairs left: {_data_summary(config, read, budget)}")
    return dataset


def _counted(pairs, counts: Counter, key: str):
    for pair in pairs:
        counts[key] += 1
        yield pair


def _data_summary(config: TrainConfig, read: Counter, budget: BadRecordBudget) -> str:
    """Per source: the pairs read and the records skipped by reason; and what to change."""
    parts = []
    for source in config.data:
        reasons = Counter(reason.split(":")[0] for where, _, reason in budget.skipped if where == source.path)
        reasons.update({reason: n for (where, reason), n in budget.left_out.items() if where == source.path})
        skipped = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "none"
        parts.append(f"{source.format} {source.path}: {read[source.path]} pairs read, skipped: {skipped}")
    over_long = any(reason.startswith("over-long") for _, _, reason in budget.skipped)
    hint = f"raise max_length (now {config.max_length}) or fix the data" if over_long else "fix the data"
    return "; ".join(parts) + f"; {hint}"


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


TRAIN_OUTPUT = OutputKind(
    command="train",
    what="training run",
    writes=("checkpoint-*", WEIGHTS_FILE, CONFIG_FILE, META_FILE, LOG_HISTORY, TRAIN_CONFIG, "pope", "runs"),
    done=TRAIN_CONFIG,
    resumable=True,
)


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training; ``checkpoint`` is the newest complete one (``None``: none yet)."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None):
        self.checkpoint = checkpoint
        kept = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been saved yet"
        super().__init__(f"training stopped at step {step}{f' of {max_steps}' if max_steps else ''}; {kept}")


def train(config: TrainConfig, output_dir: str | None = None, resume: bool = False, overwrite: bool = False,
          allow_base_mismatch: bool = False) -> Path:
    """Train the PIB of ``config`` into ``output_dir`` (default: ``training.output_dir``).

    A folder holding an earlier run is refused unless ``resume`` (continue from its newest
    complete checkpoint) or ``overwrite`` (delete what that run wrote, then start afresh).
    """
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.trainer import PIBTrainer, start_distributed

    if output_dir:
        config.training["output_dir"] = output_dir
    args = config.training_arguments()
    output = claim(args.output_dir, TRAIN_OUTPUT, resume=resume, overwrite=overwrite)  # only looks
    bootstrap(config)
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
    wait_for_everyone(args)  # every process has looked at the folder before it changes
    if args.should_save:
        output.prepare()
    trainer = PIBTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        step=PreferenceStep(model, config.loss), policy=policy, allow_base_mismatch=allow_base_mismatch,
    )
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except KeyboardInterrupt:
        raise interrupted(trainer) from None
    out = Path(args.output_dir)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        atomic_write_json(out / LOG_HISTORY, trainer.state.log_history)
        atomic_write_json(out / TRAIN_CONFIG, json.loads(config.model_dump_json()))
    logger.info(f"data: {budget.summary()}")
    logger.info(f"saved the PIB checkpoint to {out}")
    if config.pope:
        evaluate_trained(model.eval(), config, out)
    return out


def wait_for_everyone(args) -> None:
    if args.world_size > 1:
        torch.distributed.barrier()


def interrupted(trainer) -> TrainingInterrupted:
    from mllm_pib.training.trainer import checkpoint_problem, sorted_checkpoints

    # ends the progress bar now: the message must come after it, not under a bar redrawn at exit
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    complete = [c for c in sorted_checkpoints(Path(trainer.args.output_dir)) if checkpoint_problem(c) is None]
    max_steps = trainer.args.max_steps if trainer.args.max_steps > 0 else trainer.state.max_steps
    return TrainingInterrupted(trainer.state.global_step, max_steps, complete[-1] if complete else None)


def evaluate_trained(model, config: TrainConfig, out: Path) -> dict:
    """POPE of the freshly trained model, written to ``out/pope/pope.json``."""
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.evaluation.suite import evaluate_pope

    p = config.pope
    settings = GenerationSettings(max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, stop_at_sentence_end=True)
    with torch.no_grad():
        return evaluate_pope(model, p.questions, p.images, out / "pope", style=p.style, labels=p.labels, settings=settings,
                             allow_outside_images=config.allow_outside_images)
