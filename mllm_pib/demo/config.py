"""Settings of the demo: the world, the pretraining of the base model, the preference training
of the PIB and the evaluation, with a full preset and a quick one.

Scene ids keep every data set apart: pretraining uses ids ``0 .. scenes - 1``; seed ``s`` takes
its preference-training scenes from ``(s + 1) * SEED_STRIDE`` and its held-out evaluation
scenes from ``(s + 1) * SEED_STRIDE + EVAL_OFFSET``, so no image is shared between the base
model's training, the PIB's training and the evaluation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mllm_pib import __version__
from mllm_pib.demo.pretrain import FinetuneSettings
from mllm_pib.demo.world import PretrainMix, WorldConfig

SEED_STRIDE = 1_000_000
EVAL_OFFSET = SEED_STRIDE // 2


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainConfig(Frozen):
    """The base model: the backbone plugin's tiny random checkpoint, with a tokenizer trained on
    the template and the world's sentences (every word one token), fine-tuned on the biased
    world."""

    backbone: str = "llava"
    model_seed: int = 0
    scenes: int = Field(4000, ge=1)
    mix: PretrainMix = PretrainMix()
    finetune: FinetuneSettings = FinetuneSettings()
    # The world's tokenizer: byte-level BPE, every world word one token. The demo's measured
    # effect was tuned with it; with the LLaMA-shaped tokenizer the same 3000 steps leave the
    # seed-0 model answering yes/no at chance (99.8% "yes" on POPE).
    tiny_options: dict[str, str] = {"tokenizer": "byte-level"}


class PreferenceConfig(Frozen):
    """DPO (stage 1: the PIB alone) on the world's HA-DPO-format pairs.

    ``beta`` is high next to the published 0.1: with a small beta the policy has to move the
    answers' log-probabilities by many nats before the loss saturates, and on this small world
    that ruins the descriptions (both answers of a pair are pushed down together).
    """

    scenes: int = Field(2400, ge=1, description="preference-training scenes per seed")
    sources: tuple[str, ...] = ("pope", "desc")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    beta: float = Field(1.0, gt=0)
    warmup_steps: int = Field(50, ge=0)
    logging_steps: int = Field(20, ge=1)
    pib: dict[str, Any] = Field(default_factory=lambda: {"num_heads": 4, "intermediate_size": 128})


class EvalConfig(Frozen):
    """Held-out evaluation: POPE on ``pope_images`` images per split, CHAIR on descriptions of
    ``chair_images`` images (greedy decoding)."""

    pope_images: int = Field(150, ge=1)
    chair_images: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    max_description_tokens: int = Field(48, ge=1)


class DemoConfig(Frozen):
    world_seed: int = 0
    world: WorldConfig = WorldConfig()
    pretrain: PretrainConfig = PretrainConfig()
    preference: PreferenceConfig = PreferenceConfig()
    evaluation: EvalConfig = EvalConfig()

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A few-second run of the whole pipeline (for tests and a first look): too short to
        learn much, so its numbers mean nothing."""
        return cls(
            pretrain=PretrainConfig(
                scenes=64,
                finetune=FinetuneSettings(steps=20, batch_size=8, warmup_steps=2, learning_rate=3e-3),
            ),
            preference=PreferenceConfig(scenes=24, steps=16, batch_size=4, learning_rate=5e-3, logging_steps=2,
                                        warmup_steps=0),
            evaluation=EvalConfig(pope_images=6, chair_images=6, batch_size=32, max_description_tokens=24),
        )

    def backbone_key(self) -> str:
        """What identifies the pretrained base model: the world, its pretraining and the
        package version (a new version may train differently)."""
        identity = {
            "version": __version__,
            "world_seed": self.world_seed,
            "world": self.world.model_dump(),
            "pretrain": self.pretrain.model_dump(),
        }
        blob = json.dumps(identity, sort_keys=True).encode()
        return f"{self.pretrain.backbone}-{hashlib.sha256(blob).hexdigest()[:16]}"
