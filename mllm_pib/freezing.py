"""Which parts of a :class:`~mllm_pib.model.PIBModel` train.

A policy maps each named part (``vision``, ``projector``, ``qformer``, ``llm``, ``lm_head``,
``pib``) to ``train``, ``freeze`` or — for the LLM — ``lora``. Parts not named are frozen.
Presets follow the published recipe: ``stage1`` trains the PIB only, ``stage2`` the PIB and
``lm_head``; ``projector`` trains the PIB and the vision-to-LLM projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mllm_pib.errors import UserError

Mode = Literal["train", "freeze", "lora"]
PRESETS: dict[str, dict[str, Mode]] = {
    "stage1": {"pib": "train"},
    "stage2": {"pib": "train", "lm_head": "train"},
    "projector": {"pib": "train", "projector": "train"},
}


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class FreezePolicy(BaseModel):
    """``parts``: part name -> mode; ``lora``: adapter settings used by ``llm: lora``."""

    model_config = ConfigDict(extra="forbid")

    parts: dict[str, Mode] = Field(default_factory=lambda: dict(PRESETS["stage1"]))
    lora: LoraSettings = Field(default_factory=LoraSettings)

    @classmethod
    def preset(cls, name: str) -> "FreezePolicy":
        if name not in PRESETS:
            raise UserError(f"unknown freeze preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(parts=dict(PRESETS[name]))

    @property
    def trains_before_pib(self) -> bool:
        """True when anything upstream of the PIB trains (its inputs are then not constant)."""
        return any(mode != "freeze" for part, mode in self.parts.items() if part not in ("pib", "lm_head"))

    @property
    def uses_lora(self) -> bool:
        return self.parts.get("llm") == "lora"

    @property
    def trains_lm_head(self) -> bool:
        return self.parts.get("lm_head") == "train"

    @property
    def trained_backbone_parts(self) -> list[str]:
        """Backbone parts whose weights train whole (a checkpoint carries them)."""
        return sorted(part for part, mode in self.parts.items() if part != "pib" and mode == "train")

    def apply(self, model) -> list["PartReport"]:
        """Set ``requires_grad`` on every part of ``model`` and return a per-part report."""
        available = model.parts()
        unknown = sorted(set(self.parts) - set(available))
        if unknown:
            raise UserError(
                f"the freeze policy names {', '.join(unknown)}, which backbone "
                f"{model.backbone.name!r} does not have; its parts are {', '.join(available)}"
            )
        for part, mode in self.parts.items():
            if mode == "lora" and part != "llm":
                raise UserError(f"freeze policy: 'lora' applies to the llm only, not to {part!r}")
        model.requires_grad_(False)
        if self.trains_lm_head:
            _untie(model, available["lm_head"])
        if self.uses_lora:
            add_lora(available["llm"], self.lora)
        for part, mode in self.parts.items():
            module = available[part]
            if mode == "train":
                module.requires_grad_(True)
            elif mode == "lora":
                for name, param in module.named_parameters():
                    param.requires_grad_("lora_" in name)
        model.keep_reference()  # what trains is now known and not yet changed
        return report(model)


@dataclass
class PartReport:
    part: str
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return f"{self.part:<10} {self.trainable:>14,} / {self.total:>14,} trainable ({share:.2f}%)"


def report(model) -> list[PartReport]:
    """Trainable and total parameter counts per part (shared tensors counted once per part)."""
    rows = []
    for part, module in model.parts().items():
        params = {id(p): p for p in module.parameters()}.values()
        rows.append(PartReport(part, sum(p.numel() for p in params if p.requires_grad),
                               sum(p.numel() for p in params)))
    return rows


def add_lora(llm: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into the LLM only (targets are matched inside it, so a vision
    tower with the same module names is never touched)."""
    from peft import LoraConfig, inject_adapter_in_model

    if any("lora_" in name for name, _ in llm.named_parameters()):
        return
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.targets)
    inject_adapter_in_model(config, llm)


def _untie(model, head: nn.Module) -> None:
    """Give a trainable lm_head its own weight when it shares it with the input embeddings."""
    embeddings = model.backbone.parts()["llm"].get_input_embeddings()
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
