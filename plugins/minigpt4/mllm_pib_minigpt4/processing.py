"""MiniGPT-4's image preprocessing.

MiniGPT-4 evaluates with BLIP-2's eval transform: resize to ``image_size`` x ``image_size``
(bicubic), scale to [0, 1], normalise with CLIP's mean and std. transformers'
``BlipImageProcessorPil`` does exactly that (its class defaults), given the size; the PIL variant
needs no torchvision.
"""

from __future__ import annotations

from pathlib import Path

from transformers import BlipImageProcessorPil

PROCESSOR_FILE = "preprocessor_config.json"


def minigpt4_image_processor(image_size: int) -> BlipImageProcessorPil:
    """The eval-time image processor for square ``image_size`` inputs."""
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def load_image_processor(directory: str | Path) -> BlipImageProcessorPil:
    """The image processor saved in ``directory``."""
    return BlipImageProcessorPil.from_pretrained(directory)
