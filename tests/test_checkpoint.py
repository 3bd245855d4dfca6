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
