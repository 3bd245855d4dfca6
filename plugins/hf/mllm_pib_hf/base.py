"""What every backbone of this distribution shares: a transformers ``*ForConditionalGeneration``
(vision tower, projector, ``model.language_model``, ``lm_head``) and its processor."""

from __future__ import annotations

from typing import ClassVar

from mllm_pib.errors import UserError
from mllm_pib.processor_backbone import ProcessorBackbone


class HFBackbone(ProcessorBackbone):
    """A published VLM on its own transformers class. ``feature_choices[0]`` is the default
    feature: the vision tower's output, ``tower_width()`` wide; ``"projector"`` is what the LLM
    receives (hidden-size wide)."""

    decoder_name: ClassVar[str] = "language_model"
    """The attribute of ``model.model`` holding the decoder."""

    def __init__(self, model, processor, feature: str | None = None, model_id: str = ""):
        super().__init__()
        feature = feature or self.feature_choices[0]
        if feature not in self.feature_choices:
            raise UserError(f"unknown {self.name} feature {feature!r}; choose one of {', '.join(self.feature_choices)}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature = feature
        self.model_id = model_id
        self.image_token_id = model.config.image_token_id
        self.decoder = getattr(model.model, self.decoder_name)
        self._lm_head = model.lm_head
        self.hidden_size = model.config.text_config.hidden_size
        self.pib_vision_size = self.hidden_size if feature == "projector" else self.tower_width()

    def tower_width(self) -> int:
        """Width of the tower feature."""
        return self.model.config.vision_config.hidden_size

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
