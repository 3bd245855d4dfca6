"""Every config shipped under configs/ loads: keys, backbone options and TrainingArguments."""

from pathlib import Path

import pytest

from mllm_pib.config import load_config
from mllm_pib.evaluation.report import EvalRunConfig
from mllm_pib.plugins import get_backbone

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(REPO.glob("configs/*.yaml")) + sorted(REPO.glob("configs/tiny/*.yaml"))
EVAL_CONFIGS = sorted(REPO.glob("configs/eval/*.yaml"))
# The GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU.
ON_CPU = ["training.bf16=false", "training.use_cpu=true"]


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_backbone_has_a_published_training_config():
    published = {load_config(path).backbone for path in REPO.glob("configs/*.yaml")}
    assert published >= {"llava", "instructblip", "minigpt4", "llava_next", "llava_onevision", "gemma3",
                         "idefics3", "smolvlm"}
    variants = {load_config(path).backbone_options.get("variant") for path in REPO.glob("configs/minigpt4_*.yaml")}
    assert variants == {"v1", "llama2"}
    # smolvlm loads both published layouts: SmolVLM-Instruct (model_type idefics3) and SmolVLM2
    smolvlm = {load_config(path).model for path in REPO.glob("configs/smolvlm*.yaml")}
    assert smolvlm == {"HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=name)
def test_training_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their DeepSpeed file relative to the repository
    config = load_config(path, ON_CPU)
    get_backbone(config.backbone).check_options(config.backbone_options)
    args = config.training_arguments()
    assert args.output_dir == config.training["output_dir"]
    if args.deepspeed:
        assert Path(args.deepspeed).is_file()


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=name)
def test_eval_config_loads(path):
    config = load_config(path, model=EvalRunConfig)
    for entry in config.models:
        get_backbone(entry.backbone).check_options(entry.options)
