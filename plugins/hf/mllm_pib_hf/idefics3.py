"""Idefics3 (``HuggingFaceM4/Idefics3-8B-Llama3``) on ``transformers.Idefics3ForConditionalGeneration``
and ``Idefics3Processor``; the family that SmolVLM (:mod:`mllm_pib_hf.smolvlm`) belongs to, whose
SmolVLM2 checkpoints are the second published :class:`Layout` (``model_type: smolvlm`` on
transformers' ``SmolVLM*`` subclasses of the Idefics3 classes).

With image splitting on, the processor resizes an image so that its sides are multiples of the
tile size, cuts it into a grid of tiles and adds a downscaled global view; the prompt gets one
block of ``<image>`` tokens per tile, each led by ``<fake_token_around_image>`` and its tile
marker (``<row_1_col_1>`` ... ``<global-img>``). The number of visual tokens therefore follows the
image size. In a batch, ``pixel_values`` ``[B, N_tiles, 3, H, W]`` is padded with all-zero tiles
(which the model drops) and ``pixel_attention_mask`` marks the real pixels. Each tile goes through
SigLIP, a pixel shuffle (``scale_factor`` x ``scale_factor`` neighbouring patches concatenated)
and a linear projection into the decoder's width.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mllm_pib.backbone import VisionFeatures, pad_visual
from mllm_pib.processor_backbone import image_only_processor
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_llama3_tokenizer
from mllm_pib_hf.base import HFBackbone
from mllm_pib_hf.tiny import TEMPLATE_WORDS, tiny_text_sizes, tiny_vision_sizes

FEATURES = ("siglip", "projector")
END_OF_UTTERANCE = "<end_of_utterance>"
# the tokens the template and the processor write, as the published tokenizers add them
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", END_OF_UTTERANCE, "<global-img>",
                *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)))


def chat_template(start: str) -> str:
    """The chat template the Idefics3 family publishes, after its first token ``start``
    (``<|begin_of_text|>`` for Idefics3, ``<|im_start|>`` for SmolVLM): capitalised roles, a
    colon glued to the role when the turn starts with an image, each turn closed by
    ``<end_of_utterance>`` and a newline; the generation prompt is ``Assistant:``."""
    return (
        start + "{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


class Idefics3Backbone(HFBackbone):
    """Idefics3: SigLIP on every tile and the global view -> pixel shuffle + linear connector ->
    Llama 3 decoder.

    ``feature="siglip"``: the tower's patch features of every real tile, in the processor's
    order (``tiles x patches`` per image, 1152 wide at published size); ``"projector"``: the
    connector's output, what the LLM receives (``tiles x patches / scale_factor**2``).
    """

    name = "idefics3"
    feature_choices = FEATURES
    end_of_turn = (END_OF_UTTERANCE,)
    decoder_name = "text_model"

    def parts(self):
        inner = self.model.model
        return {"vision": inner.vision_model, "projector": inner.connector, "llm": inner.text_model,
                "lm_head": self.model.lm_head}

    def image_batch(self, images: list) -> list:
        return [[image] for image in images]  # a flat list would be the images of one sample

    def encode_vision(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                      **_) -> VisionFeatures:
        out = self.model.model.get_image_features(pixel_values, pixel_attention_mask, return_dict=True)
        llm, llm_mask = pad_visual(list(out.pooler_output))
        if self.feature == "projector":
            return VisionFeatures(pib=llm, llm=llm, pib_mask=llm_mask, llm_mask=llm_mask)
        # the model drops the all-zero tiles that pad a batch; the same rule splits its output
        tiles = (pixel_values != 0).flatten(2).any(-1).sum(1).tolist()
        pib, pib_mask = pad_visual([image.flatten(0, 1) for image in out.last_hidden_state.split(tiles)])
        return VisionFeatures(pib=pib, llm=llm, pib_mask=pib_mask, llm_mask=llm_mask)


@dataclass(frozen=True)
class Layout:
    """A published layout of the family: ``config.json``'s ``model_type`` and the prefix of its
    transformers classes (``{prefix}ForConditionalGeneration``, ``{prefix}Config``,
    ``{prefix}VisionConfig``, ``{prefix}Processor``, ``{prefix}ImageProcessorPil``)."""

    model_type: str
    prefix: str

    def transformers_class(self, suffix: str) -> type:
        import transformers

        return getattr(transformers, self.prefix + suffix)

    def processor_class(self) -> type:
        """The layout's processor, read and built without a video processor."""
        from transformers.processing_utils import ProcessorMixin

        base = image_only_processor(self.transformers_class("Processor"))
        # SmolVLMProcessor's __init__ requires a video processor argument
        no_video = {"video_processor": None} if "video_processor" in inspect.signature(base.__init__).parameters else {}

        class Processor(base):
            def __init__(self, image_processor, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template,
                                 **no_video, **kwargs)

            # SmolVLMProcessor's own only adds video frame-sampling defaults, read from the video
            # processor this one has not (Idefics3Processor has none of its own); images and the
            # chat template render as published
            apply_chat_template = ProcessorMixin.apply_chat_template

        Processor.__name__ = Processor.__qualname__ = base.__name__
        return Processor


IDEFICS3 = Layout("idefics3", "Idefics3")
SMOLVLM = Layout("smolvlm", "SmolVLM")


def load(model_path, *, feature=None, dtype=None, device=None) -> Idefics3Backbone:
    return load_family(Idefics3Backbone, (IDEFICS3,), model_path, feature=feature, dtype=dtype, device=device)


def load_family(cls, layouts: tuple[Layout, ...], model_path, *, feature, dtype, device):
    """A published checkpoint of one of ``layouts``, chosen by its ``config.json`` ``model_type``,
    on that layout's classes, as a ``cls``."""
    from mllm_pib_hf.loading import load_classes, published_model_type

    model_type = published_model_type(cls, model_path, tuple(layout.model_type for layout in layouts))
    layout = next(layout for layout in layouts if layout.model_type == model_type)
    return load_classes(cls, layout.transformers_class("ForConditionalGeneration"), layout.processor_class(),
                        model_path, feature=feature, dtype=dtype, device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, vocab_size: int = 512) -> None:
    """A tiny random Idefics3 with the published layout: SigLIP-style tower on 32 px tiles (4 px
    patches, 8 x 8 per tile), pixel shuffle by 2 (16 tokens a tile), image splitting up to 2 x 2
    tiles + the global view, a Llama decoder and a Llama-3-style byte-level tokenizer
    (``train_llama3_tokenizer``) with the published chat template."""
    tokenizer = train_llama3_tokenizer([*corpus, TEMPLATE_WORDS, "User: Assistant:"], vocab_size=vocab_size,
                                       extra_special_tokens=IMAGE_TOKENS)
    write_family_tiny(out_dir, seed, tokenizer, chat_template("<|begin_of_text|>"), IDEFICS3, tile=32, scale_factor=2)


def write_family_tiny(out_dir: str, seed: int, tokenizer, template: str, layout: Layout, *, tile: int,
                      scale_factor: int) -> None:
    """Write a tiny random model of ``layout`` and its processor: ``tile`` px tiles of 4 px
    patches, images split into at most 2 x 2 tiles (published: 4 x 4), pixel shuffle by
    ``scale_factor``."""
    from transformers import LlamaConfig

    vision = {**tiny_vision_sizes(), "image_size": tile}
    tokens = (tile // vision["patch_size"]) ** 2 // scale_factor**2
    image_processor = layout.transformers_class("ImageProcessorPil")(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    processor = layout.processor_class()(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens,
                                         chat_template=template)
    pad = tokenizer.pad_token_id
    config = layout.transformers_class("Config")(
        vision_config=layout.transformers_class("VisionConfig")(**vision),
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=pad, **tiny_text_sizes()),
        scale_factor=scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = layout.transformers_class("ForConditionalGeneration")(config).eval()
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
