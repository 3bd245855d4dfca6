"""InstructBLIP (Vicuna) as an mllm-pib backbone, on ``transformers.InstructBlipForConditionalGeneration``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mllm_pib.backbone import DecoderBackbone, PromptTemplate, VisionFeatures, resolve_dtype
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_directory

FEATURES = ("vit", "qformer")
# LAVIS tokenises the Q-Former instruction to at most this many tokens (``max_txt_len``).
QFORMER_MAX_TOKENS = 128


class InstructBlipBackbone(DecoderBackbone):
    """InstructBLIP: EVA-ViT-g -> Q-Former (queries + instruction) -> linear projection -> Vicuna.

    The LLM input is the ``num_query_tokens`` projected query outputs followed by the tokenised
    instruction, BOS included: LAVIS concatenates the query embeddings in front of the tokenised
    prompt, and the transformers processor prepends ``num_query_tokens`` image tokens before the
    BOS token. The Vicuna prompt is the raw instruction text.

    ``feature="vit"`` gives the PIB the ViT output after its LayerNorm (LAVIS ``ln_vision``), CLS
    included: 257 x 1408 for EVA-ViT-g at 224 px. ``feature="qformer"`` gives it the Q-Former
    query outputs (32 x 768), the ones the projection maps into the LLM; they depend on the
    instruction.
    """

    name = "instructblip"
    feature_choices = FEATURES

    def __init__(self, model, processor, feature: str = "vit", model_id: str = ""):
        super().__init__()
        check_feature(feature)
        config = model.config
        apply_ln_vision_eps(model)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature = feature
        self.model_id = model_id
        self.image_token_id = config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.num_image_tokens = config.num_query_tokens
        # LAVIS tokenises ``answer + eos`` on its own and drops the BOS it gets.
        self.template = PromptTemplate(
            prompt="{question}", answer="{answer}" + self.tokenizer.eos_token, answer_alone=True
        )
        self.hidden_size = config.text_config.hidden_size
        self.pib_vision_size = (
            config.vision_config.hidden_size if feature == "vit" else config.qformer_config.hidden_size
        )

    # The decoder and head are looked up in ``self.model`` rather than stored, so that the state
    # dict holds each weight once.
    @property
    def decoder(self) -> nn.Module:
        return self.model.language_model.model

    @property
    def _lm_head(self) -> nn.Module:
        return self.model.language_model.lm_head

    def parts(self) -> dict[str, nn.Module]:
        model = self.model
        return {
            "vision": model.vision_model,
            "qformer": QFormerWithQueries(model.qformer, model.query_tokens),
            "projector": model.language_projection,
            "llm": model.language_model.model,
            "lm_head": model.language_model.lm_head,
        }

    def prompt_ids(self, question: str, image=None) -> list[int]:
        # The query tokens come before BOS, so they cannot be part of the tokenised text.
        return [self.image_token_id] * self.num_image_tokens + self.tokenizer(question).input_ids

    def preprocess(self, images: list[Image.Image], questions: list[str]) -> dict[str, torch.Tensor]:
        """Pixels for the ViT and the instruction for the Q-Former, as InstructBLIP reads them.

        The Q-Former text is padded on the right (as LAVIS's BERT tokenizer does): its position
        embeddings count from the first token, so left padding would shift them.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        pixels = self.processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
        max_tokens = min(QFORMER_MAX_TOKENS, self.model.config.qformer_config.max_position_embeddings)
        text = self.processor.qformer_tokenizer(
            questions, padding="longest", truncation=True, max_length=max_tokens,
            padding_side="right", return_tensors="pt",
        )
        device = self.model.device
        return {
            "pixel_values": pixels.pixel_values.to(device, self.model.dtype),
            "qformer_input_ids": text.input_ids.to(device),
            "qformer_attention_mask": text.attention_mask.to(device),
        }

    def encode_vision(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> VisionFeatures:
        out = self.model.get_image_features(
            pixel_values,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            return_dict=True,
        )
        if self.feature == "vit":
            pib = out.last_hidden_state
        else:
            pib = out.qformer_outputs.last_hidden_state[:, : self.num_image_tokens]
        return VisionFeatures(pib=pib, llm=out.pooler_output)

    def save_pretrained(self, path: str) -> None:
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)


class QFormerWithQueries(nn.Module):
    """The Q-Former together with its learned query tokens, as one part for the freezing policy."""

    def __init__(self, qformer: nn.Module, query_tokens: nn.Parameter):
        super().__init__()
        self.qformer = qformer
        self.query_tokens = query_tokens


def apply_ln_vision_eps(model) -> None:
    """Give the ViT's final norm the epsilon the configuration records (``vision_config.ln_vision_eps``,
    set when the weights come from LAVIS, whose ``ln_vision`` uses 1e-5); transformers builds it
    with the ViT blocks' ``layer_norm_eps``."""
    eps = getattr(model.config.vision_config, "ln_vision_eps", None)
    if eps is not None:
        model.vision_model.post_layernorm.eps = eps


def check_feature(feature: str) -> None:
    if feature not in FEATURES:
        raise UserError(f"unknown instructblip feature {feature!r}; choose one of {', '.join(FEATURES)}")


def load(
    model_path: str | None,
    *,
    feature: str = "vit",
    config_path: str | None = None,
    llm_path: str | None = None,
    vit_path: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> InstructBlipBackbone:
    """Load InstructBLIP (Vicuna) from a transformers directory or a LAVIS checkpoint.

    Args:
        model_path: a directory written by ``InstructBlipForConditionalGeneration.save_pretrained``
            plus ``InstructBlipProcessor.save_pretrained`` (e.g. ``Salesforce/instructblip-vicuna-7b``),
            or a LAVIS ``blip2_vicuna_instruct`` checkpoint file (``.pth``); see
            :mod:`mllm_pib_instructblip.checkpoints` for what the latter needs.
        feature: the vision features the PIB reads, ``"vit"`` (default) or ``"qformer"``.
        config_path, llm_path, vit_path: for LAVIS checkpoints only, see
            :func:`mllm_pib_instructblip.checkpoints.load_lavis`.
        dtype: weight dtype (a ``torch.dtype`` or its name); default float32.
        device: where to put the model; default CPU.
    """
    check_feature(feature)
    if model_path is None:
        raise UserError(
            "the instructblip backbone needs a model path: a transformers InstructBLIP directory "
            "or a LAVIS blip2_vicuna_instruct .pth checkpoint"
        )
    path = Path(model_path)
    if not path.exists():
        raise UserError(
            f"{path}: not found; expected a transformers InstructBLIP directory or a LAVIS "
            "blip2_vicuna_instruct .pth checkpoint"
        )
    dtype = resolve_dtype(dtype)
    if path.is_dir():
        lavis_options = {"config_path": config_path, "llm_path": llm_path, "vit_path": vit_path}
        given = sorted(name for name, value in lavis_options.items() if value is not None)
        if given:
            raise UserError(
                f"{path}: {', '.join(given)} only apply to LAVIS .pth checkpoints; a transformers "
                "directory carries its own configuration and weights"
            )
        model, processor = load_transformers_dir(path, dtype)
    else:
        from mllm_pib_instructblip.checkpoints import load_lavis

        model, processor = load_lavis(
            path, config_path=config_path, llm_path=llm_path, vit_path=vit_path, dtype=dtype
        )
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    return InstructBlipBackbone(model, processor, feature=feature, model_id=str(model_path))


def load_transformers_dir(path: Path, dtype: torch.dtype):
    """Model and processor from a transformers InstructBLIP directory."""
    from transformers import InstructBlipForConditionalGeneration

    config = read_config(path)
    processor = read_processor(path, config)
    try:
        model, info = InstructBlipForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True
        )
    except OSError as err:
        raise UserError(f"{path}: cannot read the InstructBLIP weights: {err}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"{path}: the weights lack {len(missing)} tensors of the model "
            f"(first: {', '.join(missing[:3])}); the directory is incomplete or holds another model"
        )
    return model, processor


def read_config(path: Path):
    """The ``InstructBlipConfig`` of a transformers directory, checked for what this backbone needs."""
    from transformers import InstructBlipConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; expected a transformers InstructBLIP directory")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if model_type != "instructblip":
        raise UserError(f"{config_file}: model_type is {model_type!r}, expected 'instructblip'")
    config = InstructBlipConfig.from_pretrained(path)
    if not config.use_decoder_only_language_model:
        raise UserError(
            f"{config_file}: the language model is {config.text_config.model_type!r}, an encoder-decoder; "
            "this backbone supports the decoder-only (Vicuna/LLaMA) InstructBLIP models"
        )
    if config.image_token_id is None:
        raise UserError(
            f"{config_file}: no image_token_index; this snapshot predates image placeholder tokens, "
            "use a current revision of the model (transformers >= 4.47 layout)"
        )
    return config


def read_processor(path: Path, config):
    """The ``InstructBlipProcessor`` of a directory, checked against ``config``."""
    from transformers import AddedToken, InstructBlipProcessor

    try:
        processor = InstructBlipProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(
            f"{path}: cannot read the InstructBLIP processor (image processor, tokenizer, "
            f"qformer_tokenizer/): {err}"
        ) from None
    if processor.num_query_tokens is None:  # older snapshots did not record it
        processor.num_query_tokens = config.num_query_tokens
    if processor.num_query_tokens != config.num_query_tokens:
        raise UserError(
            f"{path}: the processor expands {processor.num_query_tokens} image tokens but the model "
            f"has {config.num_query_tokens} query tokens"
        )
    if isinstance(processor.image_token, str):
        # a tokenizer with a named ``image_token`` hands the processor a plain string, which its
        # ``__call__`` cannot expand (it reads ``.content``)
        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
    image_token = processor.image_token.content
    token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    if token_id != config.image_token_id:
        raise UserError(
            f"{path}: the tokenizer maps the image token {image_token!r} to id {token_id} but "
            f"config.json says image_token_index={config.image_token_id}"
        )
    return processor
