"""The demo's base model: a tiny checkpoint of a backbone plugin, pretrained on the biased world
and cached on disk.

The model is written by the plugin's own ``write_tiny`` (the real transformers classes, the
published layout) with a tokenizer trained on the backbone's conversations about the world, so
that every template and world word is a single token: sequences stay short, which is what CPU
training time depends on. It is then fine-tuned with :func:`~mllm_pib.demo.pretrain.supervised_finetune`
and saved with the backbone's ``save_pretrained``, so every later step loads it like any model.

The cache directory is keyed by :meth:`DemoConfig.backbone_key`; a model is built in a temporary
directory next to its final place and renamed into it, and its record file marks it complete, so
a crash never leaves a half-written model that a later run would take for a finished one.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mllm_pib.demo import world as W
from mllm_pib.demo.config import DemoConfig
from mllm_pib.demo.pretrain import SupervisedExample, supervised_finetune
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_directory

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mllm-pib"
FINISHED = "pretraining.json"  # written last: its presence marks a complete model
# caption examples for the tokenizer corpus: enough to hold every list shape
CORPUS_CAPTIONS = 64


@dataclass(frozen=True)
class PretrainedModel:
    """Where the pretrained model is, whether it came from the cache, and its training record
    (``pretraining.json``: the settings, the per-step losses and the seconds it took)."""

    path: Path
    cached: bool
    record: dict


def conversation_corpus(backbone_name: str, world: W.World, tiny_options: dict | None = None) -> list[str]:
    """The backbone's prompts and answers about the world, as the text of whole conversations.

    The template is the backbone's own: a throwaway tiny model (written with ``tiny_options``,
    whose tokenizer round-trips any text) renders each prompt with ``prompt_ids`` and ``answer_ids``.
    """
    from mllm_pib.plugins import get_backbone

    registered = get_backbone(backbone_name)
    prompts = [W.DESCRIBE_PROMPT] + [W.question(kind.word) for kind in W.KINDS]
    answers = [W.answer(kind.word, yes) for kind in W.KINDS for yes in (True, False)]
    answers += [scene.biased_caption for scene in world.sample(CORPUS_CAPTIONS)]
    with tempfile.TemporaryDirectory(prefix="mllm-pib-template-") as tmp:
        registered.write_tiny(tmp, seed=0, **(tiny_options or {}))
        backbone = registered.load(tmp)
    tokenizer = backbone.tokenizer
    texts = []
    for prompt, answer in zip(itertools.cycle(prompts), answers):
        ids = [i for i in backbone.prompt_ids(prompt) if i != backbone.image_token_id]
        texts.append(tokenizer.decode(ids + backbone.answer_ids(answer), skip_special_tokens=True))
    return texts


def pretraining_examples(config: DemoConfig) -> Iterator[SupervisedExample]:
    """The world's biased supervised stream over the pretraining scenes, images rendered once."""
    scenes = W.World(config.world_seed, config.world).sample(config.pretrain.scenes)
    rendered: dict[int, object] = {}
    for example in W.pretraining_stream(scenes, config.pretrain.finetune.seed, config.pretrain.mix):
        scene = example.scene
        if scene.image_id not in rendered:
            rendered[scene.image_id] = scene.render()
        yield SupervisedExample(rendered[scene.image_id], example.prompt, example.target)


def build_base_model(config: DemoConfig, out_dir: Path, progress: bool = True) -> dict:
    """Write the tiny model, fine-tune it on the world and save it to ``out_dir``; returns the
    training record."""
    from mllm_pib.plugins import get_backbone

    pre = config.pretrain
    registered = get_backbone(pre.backbone)
    world = W.World(config.world_seed, config.world)
    start = time.perf_counter()
    corpus = conversation_corpus(pre.backbone, world, pre.tiny_options)
    registered.write_tiny(str(out_dir), seed=pre.model_seed, corpus=corpus, **pre.tiny_options)
    backbone = registered.load(str(out_dir))
    losses = supervised_finetune(backbone, pretraining_examples(config), pre.finetune, progress=progress)
    backbone.save_pretrained(str(out_dir))
    return {
        "key": config.backbone_key(),
        "settings": {"world_seed": config.world_seed, "world": config.world.model_dump(), "pretrain": pre.model_dump()},
        "seconds": time.perf_counter() - start,
        "prompt_tokens": len(backbone.prompt_ids(W.question(W.KINDS[0].word))),
        "losses": losses,
    }


def pretrained_base_model(config: DemoConfig, cache_dir: str | Path | None = None, progress: bool = True) -> PretrainedModel:
    """The base model of ``config``: from the cache when it is complete there, else built (in
    a temporary sibling directory, renamed into place at the end) and cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    final = root / "demo" / config.backbone_key()
    if (final / FINISHED).is_file():
        return PretrainedModel(final, True, _read_record(final / FINISHED))
    with atomic_directory(final, replace=True) as tmp:  # replaces what a crash may have left
        record = build_base_model(config, tmp, progress=progress)
        (tmp / FINISHED).write_text(json.dumps(record))
    return PretrainedModel(final, False, _read_record(final / FINISHED))


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable pretraining record ({err}); delete its folder and rerun") from None
