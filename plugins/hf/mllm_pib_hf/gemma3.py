"""Gemma 3 (``google/gemma-3-4b-it``) on ``transformers.Gemma3ForConditionalGeneration`` and its
processor.

Every image gives 256 visual tokens (SigLIP at 896 px, 4 x 4 average-pooled, RMS-normed and
projected). Unlike the LLaVA family, the image tokens of one image attend to each other both
ways (transformers builds that mask from ``token_type_ids``); :meth:`Gemma3Backbone.image_attention`
builds the same masks with transformers' own mask functions. Its decoder mixes sliding-window and
global layers, so preference pairs are not packed into one row (``packs_pairs`` is false).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mllm_pib.backbone import VisionFeatures
from mllm_pib.tokenizer import DEFAULT_CORPUS, train_gemma_tokenizer
from mllm_pib_hf.base import HFBackbone
from mllm_pib_hf.tiny import TEMPLATE_WORDS, tiny_text_sizes, tiny_vision_sizes

FEATURES = ("siglip", "projector")
# The chat template Google publishes with gemma-3-4b-it (its user turns trim their text; the
# model's turns are "model"; a system message is prefixed to the first user turn).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


class Gemma3Backbone(HFBackbone):
    """Gemma 3: SigLIP-so400m (896 px) -> pooled to 256 tokens -> RMSNorm + projection -> Gemma 3
    decoder with bidirectional attention inside each image's tokens.

    ``feature="siglip"``: the tower's last hidden state (4096 x 1152 at published size);
    ``"projector"``: the 256 projected tokens the LLM receives (256 x 2560).
    """

    name = "gemma3"
    feature_choices = FEATURES
    end_of_turn = ("<end_of_turn>",)

    def parts(self):
        inner = self.model.model
        return {"vision": inner.vision_tower, "projector": inner.multi_modal_projector,
                "llm": inner.language_model, "lm_head": self.model.lm_head}

    def encode_vision(self, pixel_values: torch.Tensor, **_) -> VisionFeatures:
        out = self.model.model.get_image_features(pixel_values, return_dict=True)
        projected = out.pooler_output
        return VisionFeatures(pib=out.last_hidden_state if self.feature == "siglip" else projected, llm=projected)

    def image_attention(self, hidden, attention_mask, cache, position_ids, image_mask):
        from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                                get_block_sequence_ids_for_mask)

        return create_masks_for_vision_model(
            config=self.decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids,
            block_sequence_ids=get_block_sequence_ids_for_mask(image_mask.long(), device=hidden.device),
        )

    @property
    def packs_pairs(self) -> bool:
        return False



def load(model_path, *, feature=None, dtype=None, device=None) -> Gemma3Backbone:
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    from mllm_pib_hf.loading import load_published

    return load_published(Gemma3Backbone, Gemma3ForConditionalGeneration, Gemma3Processor, model_path,
                          feature=feature, dtype=dtype, device=device)


def write_tiny(out_dir: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,), *, vocab_size: int = 512) -> None:
    """A tiny random Gemma 3 with the published layout: SigLIP tower (32 px, 4 px patches, 64
    patches pooled 2 x 2 to 16 image tokens), a Gemma 3 decoder with a sliding-window and a global
    layer, and a Gemma-style tokenizer (``train_gemma_tokenizer``) with the published chat
    template."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = train_gemma_tokenizer([*corpus, TEMPLATE_WORDS, "user\nmodel\n\n"], vocab_size=vocab_size,
                                      named_special_tokens=IMAGE_TOKENS)
    vision = {**tiny_vision_sizes(), "image_size": 32}
    side = vision["image_size"]
    tokens = 16
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
                                chat_template=GEMMA3_CHAT_TEMPLATE)
    sizes = tiny_text_sizes()
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    text = Gemma3TextConfig(vocab_size=len(tokenizer), **sizes, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                            sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**vision, vision_use_head=False), mm_tokens_per_image=tokens,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["eoi_token"]),
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zero, which would make every image look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
