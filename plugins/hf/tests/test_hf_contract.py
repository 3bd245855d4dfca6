"""The backbone contract kit, run against each of this distribution's tiny checkpoints."""

from mllm_pib.testing import BackboneContractTests


class TestLlavaNextContract(BackboneContractTests):
    backbone_name = "llava_next"


class TestLlavaOnevisionContract(BackboneContractTests):
    backbone_name = "llava_onevision"


class TestGemma3Contract(BackboneContractTests):
    backbone_name = "gemma3"

    def native_logits(self, backbone, input_ids, attention_mask, vision_inputs):
        # the model attends both ways over the image only where token_type_ids mark it
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        token_types = (input_ids == backbone.image_token_id).long()
        return backbone.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              token_type_ids=token_types, **vision_inputs).logits


class TestQwen2VLContract(BackboneContractTests):
    backbone_name = "qwen2_vl"

    def native_logits(self, backbone, input_ids, attention_mask, vision_inputs):
        # no position ids: the model derives its 3-D rotary positions from the image tokens
        # (mm_token_type_ids 1), the grids and the mask
        image_tokens = (input_ids == backbone.image_token_id).long()
        return backbone.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=image_tokens,
                              **vision_inputs).logits


class TestQwen25VLContract(TestQwen2VLContract):
    backbone_name = "qwen2_5_vl"


class TestIdefics3Contract(BackboneContractTests):
    backbone_name = "idefics3"

    def native_logits(self, backbone, input_ids, attention_mask, vision_inputs):
        # the model's forward reads the tile pixels and their pixel_attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return backbone.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              pixel_values=vision_inputs["pixel_values"],
                              pixel_attention_mask=vision_inputs["pixel_attention_mask"]).logits


class TestSmolVLM2Contract(TestIdefics3Contract):
    """SmolVLM2's layout: SmolVLMForConditionalGeneration + SmolVLMProcessor (model_type smolvlm)."""

    backbone_name = "smolvlm"


class TestSmolVLMInstructContract(TestSmolVLM2Contract):
    """SmolVLM-Instruct's layout: the Idefics3 classes, model_type idefics3 (which idefics3 claims)."""

    tiny_options = {"layout": "idefics3"}
    claimed_by = "idefics3"
