import json

import pytest
import torch

from mllm_pib.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from mllm_pib.errors import UserError
from mllm_pib.freezing import FreezePolicy
from mllm_pib.model import PIBModel
from toy_backbone import ToyBackbone, toy_batch


def trained_toy(policy="stage1"):
    model = PIBModel(ToyBackbone(), pib_config={"num_heads": 4, "intermediate_size": 32})
    policy = FreezePolicy.preset(policy)
    policy.apply(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model, policy


def logits(model):
    batch = toy_batch(model.backbone, pairs=2)
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"][:2]], 1)  # the chosen rows
    return model(ids, torch.ones_like(ids), batch["vision_inputs"])


@pytest.mark.parametrize("policy", ["stage1", "stage2"])
def test_round_trip_gives_identical_logits_and_only_trained_weights(tmp_path, policy):
    model, freeze = trained_toy(policy)
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    config, state, meta = read_checkpoint(tmp_path / "ckpt")
    assert config == model.pib.config
    parts = {key.split(".")[0] for key in state}
    assert parts == ({"pib"} if policy == "stage1" else {"pib", "lm_head"})
    assert meta["base_model"]["backbone"] == "toy" and meta["freeze_policy"]["parts"] == freeze.parts
    loaded = load_checkpoint(tmp_path / "ckpt", ToyBackbone())
    assert torch.equal(logits(loaded), logits(model))
    if policy == "stage2":  # the reference head of a reloaded stage-2 model is the original one
        assert torch.equal(loaded.ref_lm_head.weight, ToyBackbone().head.weight)


def test_save_keeps_other_files_and_overwrites_atomically(tmp_path):
    model, freeze = trained_toy()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["model.safetensors", "pib_checkpoint.json", "pib_config.json", "trainer_state.json"]


def test_refuses_other_backbone_and_hidden_size(tmp_path):
    model, freeze = trained_toy()
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    with pytest.raises(UserError, match="hidden_size 16"):
        load_checkpoint(tmp_path / "ckpt", ToyBackbone(hidden=32))
    other = ToyBackbone()
    other.name = "llava"
    with pytest.raises(UserError, match="backbone 'toy'"):
        load_checkpoint(tmp_path / "ckpt", other)


def test_refuses_truncated_and_pickle_files(tmp_path):
    model, freeze = trained_toy()
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        read_checkpoint(tmp_path / "ckpt")
    pickle = tmp_path / "pib.bin"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(UserError, match="never unpickled"):
        read_checkpoint(pickle)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="pib_config.json is missing"):
        read_checkpoint(tmp_path / "empty")


def test_refuses_weights_that_do_not_match(tmp_path):
    model, freeze = trained_toy()
    save_checkpoint(tmp_path / "ckpt", model, freeze)
    config = json.loads((tmp_path / "ckpt" / "pib_config.json").read_text())
    config["depth"] = 2
    (tmp_path / "ckpt" / "pib_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="pib weights do not match"):
        load_checkpoint(tmp_path / "ckpt", ToyBackbone())


# --- the base a PIB was trained on ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_llava(tmp_path_factory) -> str:
    """A second tiny LLaVA: the same widths as the ``llava`` fixture, other random weights."""
    from mllm_pib.plugins import get_backbone

    out = tmp_path_factory.mktemp("tiny-llava-seed1")
    get_backbone("llava").write_tiny(str(out), seed=1)
    return str(out)


def test_pib_is_refused_on_another_base_of_the_same_widths(llava, other_llava, pib):
    from safetensors.torch import load_file

    from mllm_pib.checkpoint import load_model

    ours, other = load_model(llava, backbone="llava").backbone, load_model(other_llava, backbone="llava").backbone
    assert (ours.hidden_size, ours.pib_vision_size) == (other.hidden_size, other.pib_vision_size)
    with pytest.raises(UserError, match=r"trained on another base model \(fingerprint: [0-9a-f]{16} → [0-9a-f]{16}; "
                                        r"model_id: .*--allow-base-mismatch"):
        load_model(other_llava, backbone="llava", pib=pib)
    # the override loads it: the block holds the checkpoint's weights
    model = load_model(other_llava, backbone="llava", pib=pib, allow_base_mismatch=True)
    saved = load_file(f"{pib}/model.safetensors")
    assert all(torch.equal(model.pib.state_dict()[k.removeprefix("pib.")], v) for k, v in saved.items())
    load_model(llava, backbone="llava", pib=pib)  # its own base: accepted


def test_cli_commands_refuse_another_base_unless_allowed(llava, other_llava, pib, tmp_path, capsys):
    from PIL import Image

    from mllm_pib.cli import main

    Image.new("RGB", (32, 32), (200, 30, 10)).save(tmp_path / "red.png")
    command = ["generate", "--backbone", "llava", "--model", other_llava, "--pib", pib, "--image",
               str(tmp_path / "red.png"), "--prompt", "Is there a star?", "--max-new-tokens", "2", "--json"]
    capsys.readouterr()
    assert main(command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert error.startswith("error: ") and "trained on another base model (fingerprint:" in error
    assert main([*command, "--allow-base-mismatch"]) == 0


def test_base_is_recognised_in_another_precision(llava, other_llava, pib):
    from mllm_pib.checkpoint import load_model

    # loading in bfloat16 gives the bfloat16 rounding of the float32 sample the checkpoint recorded
    full = load_model(llava, backbone="llava").backbone.identity()
    half = load_model(llava, backbone="llava", dtype="bfloat16").backbone.identity()
    assert half["dtype"] == "bfloat16" and full["dtype"] == "float32"
    assert half["fingerprint"] == full["fingerprints"]["bfloat16"] != full["fingerprint"]
    load_model(llava, backbone="llava", pib=pib, dtype="bfloat16")  # trained in float32: accepted
    with pytest.raises(UserError, match=r"compared in bfloat16"):
        load_model(other_llava, backbone="llava", pib=pib, dtype="bfloat16")


@pytest.mark.parametrize("saved,loaded", [("bfloat16", "float32"), ("float32", "float16"), ("bfloat16", "bfloat16")])
def test_toy_base_check_across_precisions(tmp_path, saved, loaded):
    model = PIBModel(ToyBackbone().to(getattr(torch, saved)), pib_config={"num_heads": 4, "intermediate_size": 32})
    save_checkpoint(tmp_path / "ckpt", model, FreezePolicy.preset("stage2"))
    load_checkpoint(tmp_path / "ckpt", ToyBackbone().to(getattr(torch, loaded)))
    with pytest.raises(UserError, match="fingerprint"):
        load_checkpoint(tmp_path / "ckpt", ToyBackbone(seed=1).to(getattr(torch, loaded)))


def test_half_precisions_cannot_be_compared_and_say_so(tmp_path, caplog):
    model = PIBModel(ToyBackbone().to(torch.bfloat16), pib_config={"num_heads": 4, "intermediate_size": 32})
    save_checkpoint(tmp_path / "ckpt", model, FreezePolicy.preset("stage1"))
    with caplog.at_level("WARNING", logger="mllm_pib"):
        load_checkpoint(tmp_path / "ckpt", ToyBackbone(seed=1).to(torch.float16))
    assert "cannot be compared across these precisions" in caplog.text


def test_trained_parts_and_adapters_are_not_part_of_the_base(llava, tmp_path):
    """A stage-2 head or LoRA adapters change the backbone's weights; the checkpoint carries
    them, and the base it records (and is checked against) is the untouched one."""
    from mllm_pib.checkpoint import load_model

    fresh = load_model(llava, backbone="llava").backbone.identity()
    model = load_model(llava, backbone="llava")
    policy = FreezePolicy.model_validate({"parts": {"pib": "train", "llm": "lora", "lm_head": "train"},
                                         "lora": {"rank": 2, "alpha": 4, "dropout": 0.0}})
    policy.apply(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lm_head" in name or name.endswith("_gate"):
                param.add_(0.5)
    save_checkpoint(tmp_path / "ckpt", model, policy)
    recorded = read_checkpoint(tmp_path / "ckpt")[2]["base_model"]
    assert recorded["fingerprint"] != fresh["fingerprint"]  # the head is left out of the recorded one
    assert recorded == load_model(llava, backbone="llava").backbone.identity(exclude=["lm_head"])
    loaded = load_model(llava, backbone="llava", pib=str(tmp_path / "ckpt"))
    assert torch.equal(loaded.backbone.lm_head.weight, model.backbone.lm_head.weight)


def test_train_resume_refuses_a_checkpoint_of_another_base(llava, other_llava, hadpo_dir, tmp_path, capsys):
    from mllm_pib.cli import main
    from test_training import write_config

    config = write_config(tmp_path, "llava", llava, hadpo_dir)
    common = ["train", "--config", str(config), "--set", "training.save_steps=1", "--output-dir", str(tmp_path / "run")]
    assert main([*common, "--set", "training.max_steps=2"]) == 0
    resume = [*common, "--set", "training.max_steps=3", "--set", f"model={other_llava}", "--resume"]
    capsys.readouterr()
    assert main(resume) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-2: this PIB was trained on another base model (fingerprint:" in error
    assert main([*resume, "--allow-base-mismatch"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
