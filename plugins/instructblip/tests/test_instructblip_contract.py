"""The backbone contract kit, run against the instructblip backbone's tiny checkpoint."""

from mllm_pib.testing import BackboneContractTests


class TestInstructBlipContract(BackboneContractTests):
    backbone_name = "instructblip"
