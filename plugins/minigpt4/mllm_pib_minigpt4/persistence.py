"""This plugin's own on-disk layout of a MiniGPT-4 model.

One directory: ``config.json`` + safetensors of :class:`MiniGPT4ForConditionalGeneration`
(``save_pretrained``), the tokenizer files and ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_directory
from transformers import AutoTokenizer

from .configuration import MiniGPT4Config
from .modeling import MiniGPT4ForConditionalGeneration
from .processing import PROCESSOR_FILE, load_image_processor


def save_model_dir(path: str | Path, model, tokenizer, image_processor) -> None:
    """Write model, tokenizer and image processor to ``path``, replacing it as a whole.

    The files are written to a sibling temporary directory first, so an interrupted save never
    leaves a half-written model at ``path``.
    """
    with atomic_directory(path, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)


def load_model_dir(path: str | Path, dtype: torch.dtype | str | None = None):
    """Read a directory written by :func:`save_model_dir`.

    Returns:
        ``(model, tokenizer, image_processor)``; ``model`` is in eval mode.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"MiniGPT-4 model directory {directory} has no config.json; pass a directory "
                        "written by the minigpt4 backbone, or assemble the published pieces with "
                        "blip2_path=, proj_path= and llm_path=")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != MiniGPT4Config.model_type:
        raise UserError(f"{config_file} describes a {model_type!r} model, not MiniGPT-4; to build "
                        "MiniGPT-4 from BLIP-2, MiniGPT-4 .pth and LLM checkpoints pass "
                        "blip2_path=, proj_path= and llm_path= instead of a model path")
    if not (directory / PROCESSOR_FILE).is_file():
        raise UserError(f"{directory} has no {PROCESSOR_FILE}; the image processor is missing")
    model = MiniGPT4ForConditionalGeneration.from_pretrained(
        directory, dtype=dtype if dtype is not None else "auto"
    )
    # Given the config, AutoTokenizer does not look up "minigpt4" among transformers' model types.
    tokenizer = AutoTokenizer.from_pretrained(directory, config=model.config)
    return model.eval(), tokenizer, load_image_processor(directory)
