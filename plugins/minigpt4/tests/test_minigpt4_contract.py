"""The backbone contract kit, run against both MiniGPT-4 variants' tiny checkpoints."""

from mllm_pib.testing import BackboneContractTests


class TestMiniGPT4Contract(BackboneContractTests):
    backbone_name = "minigpt4"


class TestMiniGPT4Llama2Contract(BackboneContractTests):
    backbone_name = "minigpt4"
    tiny_options = {"variant": "llama2"}

    def features(self, backbone):
        return ("vit", "projected")  # the llama2 variant has no Q-Former
