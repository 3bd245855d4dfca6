"""The backbone contract kit, run against the llava backbone's tiny checkpoint."""

from mllm_pib.testing import BackboneContractTests


class TestLlavaContract(BackboneContractTests):
    backbone_name = "llava"
