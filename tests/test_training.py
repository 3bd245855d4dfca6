"""End to end: train a PIB with DPO on generated HA-DPO data, for every installed backbone."""

import copy
import math

import pytest
import torch
import yaml

from conftest import tiny_backbones
from mllm_pib.checkpoint import export_model, load_checkpoint, load_model
from mllm_pib.cli import main
from mllm_pib.config import load_config
from mllm_pib.plugins import get_backbone
from mllm_pib.training.run import train


def write_config(tmp_path, backbone, model_dir, data_dir, **changes):
    config = {
        "backbone": backbone,
        "model": model_dir,
        "data": [
            {"format": "desc", "path": str(data_dir / "hadpo/desc_data.json"), "images": str(data_dir / "VG")},
            {"format": "pope", "path": str(data_dir / "hadpo/pope_data.json"), "images": str(data_dir / "VG")},
        ],
        "pib": {"num_heads": 4, "intermediate_size": 64},
        "loss": {"beta": 0.5},
        "max_length": 512,
        "training": {
            "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "max_steps": 16,
            "learning_rate": 2e-2, "logging_steps": 1, "save_steps": 4, "seed": 0, "use_cpu": True,
            "lr_scheduler_type": "constant",
        },
    }
    for key, value in changes.items():
        config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def frozen_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def run_training(config_path, mutate=None):
    """Train through the real entry point, returning (model-before-state, out dir, history)."""
    config = load_config(config_path)
    out = train(config)
    import json

    history = json.loads((out / "log_history.json").read_text())
    return out, [h for h in history if "loss" in h]


@torch.no_grad()
def training_set_loss(config_path, checkpoint):
    """The preference loss and metrics of a checkpoint over all the config's pairs at once."""
    from mllm_pib.data.dataset import PreferenceCollator
    from mllm_pib.data.records import BadRecordBudget
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.run import build_dataset

    config = load_config(config_path)
    model = load_checkpoint(checkpoint, get_backbone(config.backbone).load(config.model))
    dataset = build_dataset(config, model.backbone, BadRecordBudget(0))
    batch = PreferenceCollator(model.backbone)([dataset[i] for i in range(len(dataset))])
    loss, metrics = PreferenceStep(model, config.loss)(batch)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("backbone", tiny_backbones())
def test_end_to_end_training(backbone, tmp_path, tiny_model_dir, hadpo_dir):
    model_dir = tiny_model_dir(backbone)
    config_path = write_config(tmp_path, backbone, model_dir, hadpo_dir)
    out, logs = run_training(config_path)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # identity block: policy == reference
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # single logged batches are noisy: score every training pair with the trained block
    loss, metrics = training_set_loss(config_path, out)
    assert loss < math.log(2) - 0.005 and metrics["rewards/margins"] > 0.01

    base = load_model(model_dir, backbone=backbone)
    trained = load_checkpoint(out, get_backbone(backbone).load(model_dir))
    # the frozen backbone is bit-identical: only the block was saved and loaded
    for (name, a), b in zip(base.backbone.state_dict().items(), trained.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(base.pib.state_dict().values(), trained.pib.state_dict().values()))

    # checkpoint reload and export reload give identical logits
    bb = trained.backbone
    from PIL import Image

    picture = Image.open(next((hadpo_dir / "VG").rglob("*.png")))
    ids = torch.tensor([bb.prompt_ids("Is there a star in the image?", picture) + bb.answer_ids("No.")])
    inputs = bb.preprocess([picture], ["q"])
    logits = trained(ids, torch.ones_like(ids), inputs)
    assert not torch.allclose(logits, trained(ids, torch.ones_like(ids), inputs, bypass_pib=True))
    exported = export_model(out, model_dir, tmp_path / "export")
    again = load_model(str(exported))
    assert torch.equal(again(ids, torch.ones_like(ids), inputs), logits)
    # resume: the last checkpoint is there and training continues from it
    assert (out / "checkpoint-8").is_dir()


def step_and_batch(config, model):
    """The preference step of ``model`` and a batch of 4 training pairs."""
    from mllm_pib.data.dataset import PreferenceCollator
    from mllm_pib.data.records import BadRecordBudget
    from mllm_pib.training.preference import PreferenceStep
    from mllm_pib.training.run import build_dataset

    dataset = build_dataset(config, model.backbone, BadRecordBudget(0))
    return PreferenceStep(model, config.loss), PreferenceCollator(model.backbone)([dataset[i] for i in range(4)])


def optimise(step, batch, model, steps=3):
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss, _ = step(batch)
        optim.zero_grad()
        loss.backward()
        optim.step()


def test_training_leaves_backbone_bit_identical(tmp_path, tiny_model_dir, hadpo_dir):
    """Checks the in-memory model during training, not only what was saved."""
    from mllm_pib.training.run import build_model

    config = load_config(write_config(tmp_path, "llava", tiny_model_dir("llava"), hadpo_dir, freeze="stage2"))
    backbone = get_backbone("llava").load(config.model)
    model = build_model(config, backbone)
    policy = config.freeze_policy()
    report = {row.part: row for row in policy.apply(model)}
    assert report["lm_head"].trainable == report["lm_head"].total > 0
    assert report["llm"].trainable == 0 and report["pib"].trainable == report["pib"].total
    head_before = backbone.lm_head.weight.clone()
    others = {k: v.clone() for k, v in backbone.state_dict().items() if "lm_head" not in k}
    step, batch = step_and_batch(config, model)
    optimise(step, batch, model)
    assert not torch.equal(backbone.lm_head.weight, head_before)  # stage 2 trains the head
    assert torch.equal(model.ref_lm_head.weight, head_before)  # the reference keeps the original
    for name, value in backbone.state_dict().items():
        if "lm_head" not in name:
            assert torch.equal(value, others[name]), name


def test_lora_policy_trains_adapters_only(tmp_path, tiny_model_dir, hadpo_dir):
    from mllm_pib.training.run import build_model

    freeze = {"parts": {"pib": "train", "llm": "lora"}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}
    config = load_config(write_config(tmp_path, "llava", tiny_model_dir("llava"), hadpo_dir, freeze=freeze))
    backbone = get_backbone("llava").load(config.model)
    model = build_model(config, backbone)
    policy = config.freeze_policy()
    policy.apply(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("pib.") for n in trainable)
    assert not any("vision_tower" in n for n in trainable)  # adapters only in the LLM
    before = {n: p.clone() for n, p in model.named_parameters()}
    step, batch = step_and_batch(config, model)
    assert step(batch)[0].item() == pytest.approx(math.log(2), abs=1e-5)  # adapters start at zero
    optimise(step, batch, model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("pib.") for n in changed)
    assert any("lora_B" in n for n in changed)


LORA = {"parts": {"pib": "train", "llm": "lora"}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}


@pytest.mark.parametrize("freeze", [LORA, "projector", "stage2"], ids=["lora", "projector", "stage2"])
def test_reference_equals_an_untouched_copy_of_the_initial_model(freeze, tmp_path, tiny_model_dir, hadpo_dir):
    """After a few steps that change the backbone (adapters, projector, head), the model's
    reference is still the initial model: its log-probs equal those of a deep copy taken
    before training, computed from that copy's full logits."""
    from mllm_pib.objectives import sequence_logps
    from mllm_pib.training.run import build_model

    config = load_config(write_config(tmp_path, "llava", tiny_model_dir("llava"), hadpo_dir, freeze=freeze))
    model = build_model(config, get_backbone("llava").load(config.model))
    initial = copy.deepcopy(model)
    config.freeze_policy().apply(model)
    start = {name: param.clone() for name, param in model.backbone.named_parameters()}
    step, batch = step_and_batch(config, model)
    optimise(step, batch, model, steps=2)
    assert any(not torch.equal(p, start[n]) for n, p in model.backbone.named_parameters()), "the backbone should train"
    n_pairs = len(batch["pair_ids"])
    expected = []
    with torch.no_grad():
        for row in range(2 * n_pairs):
            pair = row % n_pairs
            prompt = batch["prompt_ids"][pair][batch["prompt_mask"][pair] == 1]
            answer = batch["answer_ids"][row][batch["answer_mask"][row] == 1]
            ids = torch.cat([prompt, answer])[None]
            labels = torch.cat([torch.full_like(prompt, -100), answer])[None]
            inputs = {k: v[pair:pair + 1] for k, v in batch["vision_inputs"].items()}
            expected.append(sequence_logps(initial(ids, torch.ones_like(ids), inputs), labels))
    expected = torch.cat(expected)
    assert torch.allclose(model.reference_logps(batch).logps, expected, atol=1e-4)
    policy, reference = model.answer_logps(batch)
    assert torch.allclose(reference.logps, expected, atol=1e-4)
    assert not torch.allclose(policy.logps, expected, atol=1e-3)


def test_cli_train_and_unknown_key(tmp_path, tiny_model_dir, hadpo_dir, capsys):
    path = write_config(tmp_path, "llava", tiny_model_dir("llava"), hadpo_dir)
    assert main(["train", "--config", str(path), "--set", "training.max_steps=2", "--set", "training.save_steps=100",
                 "--output-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert main(["train", "--config", str(path), "--set", "loss.betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "loss.betta" in err and "beta" in err
    assert main(["train", "--config", str(path), "--set", "training.learning_rat=0.1"]) == 2
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", tiny_backbones())
def test_tiny_config_runs_with_nothing_else(backbone, tmp_path, monkeypatch):
    """configs/tiny/<backbone>.yaml builds its own model and data (relative paths, fresh directory)."""
    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "tiny" / f"{backbone}.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--backbone", backbone, "--config", str(config), "--set", "training.max_steps=2",
                 "--set", "bootstrap.synthetic_scenes=6"]) == 0
    assert (tmp_path / f"runs/tiny/{backbone}-pib/model.safetensors").is_file()
    assert (tmp_path / "runs/tiny/data/hadpo/desc_data.json").is_file()
