"""Configuration of a MiniGPT-4 model (both published variants)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, Blip2VisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

VARIANTS = ("v1", "llama2")


@strict
class MiniGPT4Config(PreTrainedConfig):
    r"""
    Configuration of [`MiniGPT4ForConditionalGeneration`]: EVA-ViT-g (a BLIP-2 vision tower whose
    `post_layernorm` is MiniGPT-4's `ln_vision`), an optional BLIP-2 Q-Former, the `llama_proj`
    linear layer and a LLaMA decoder.

    Args:
        variant (`str`, *optional*, defaults to `"v1"`):
            `"v1"` (Vicuna): ViT -> Q-Former (`num_query_tokens` queries) -> `llama_proj`.
            `"llama2"`: no Q-Former; the ViT patch tokens (CLS dropped) are grouped by
            `num_merged_patches` consecutive tokens, concatenated along the width, and projected.
        vision_config (`dict` or `Blip2VisionConfig`, *optional*):
            The vision tower.
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            The Q-Former (`v1` only; must be `None` for `llama2`).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model (a `LlamaConfig` by default).
        num_query_tokens (`int`, *optional*, defaults to 32):
            Number of learned Q-Former queries (`v1`).
        num_merged_patches (`int`, *optional*, defaults to 4):
            Number of neighbouring patch tokens concatenated into one visual token (`llama2`).
        ln_vision_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of `ln_vision` (the vision tower's `post_layernorm`): MiniGPT-4 builds it as
            `LayerNorm(1408)` with PyTorch's default, while BLIP-2's vision config gives its blocks'
            1e-6.
        image_token_id (`int`, *optional*):
            Id of the `<ImageHere>` placeholder whose input embeddings the visual tokens replace.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialisation of `llama_proj` and the query tokens.

    Example:

    ```python
    >>> config = MiniGPT4Config(variant="llama2")
    >>> config.num_image_tokens
    64
    ```"""

    model_type = "minigpt4"
    sub_configs_defaults = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    variant: str = "v1"
    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    num_merged_patches: int = 4
    ln_vision_eps: float = 1e-5
    image_token_id: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.variant not in VARIANTS:
            raise ValueError(f"MiniGPT-4 variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "v1" and self.qformer_config is None:
            self.qformer_config = {}
        if self.variant == "llama2" and self.qformer_config is not None:
            raise ValueError("the MiniGPT-4 llama2 variant has no Q-Former; leave qformer_config unset")
        super().__post_init__(**kwargs)
        if self.qformer_config is not None:
            self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.variant == "llama2" and self.num_patches % self.num_merged_patches:
            raise ValueError(
                f"the llama2 variant concatenates {self.num_merged_patches} neighbouring patch tokens, "
                f"but the vision tower gives {self.num_patches} patches"
            )

    @property
    def num_patches(self) -> int:
        """Patch tokens of the vision tower (its CLS token excluded)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens placed into the LLM input per image."""
        if self.variant == "v1":
            return self.num_query_tokens
        return self.num_patches // self.num_merged_patches

    @property
    def projector_input_size(self) -> int:
        """Input width of `llama_proj`."""
        if self.variant == "v1":
            return self.qformer_config.hidden_size
        return self.vision_config.hidden_size * self.num_merged_patches


__all__ = ["MiniGPT4Config", "VARIANTS"]
