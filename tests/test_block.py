import itertools

import pytest
import torch

from mllm_pib.block import PIBCache, PIBConfig, PostInteractionBlock

VARIANTS = list(itertools.product(["mlp", "linear", "none"], ["cross_attention", "self_attention", "none"], [1, 2]))


def make(align="mlp", interaction="cross_attention", depth=1, vision_size=24, **kw):
    if align == "none":
        vision_size = 32
    config = PIBConfig(hidden_size=32, vision_size=vision_size, align=align, interaction=interaction,
                       depth=depth, num_heads=4, intermediate_size=64, **kw)
    return PostInteractionBlock(config)


def set_gates(block, value=0.5):
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith("_gate"):
                param.fill_(value)


@pytest.mark.parametrize("align,interaction,depth", VARIANTS)
def test_identity_at_init_bit_for_bit(align, interaction, depth):
    torch.manual_seed(0)
    block = make(align, interaction, depth)
    hidden = torch.randn(3, 7, 32) * 5
    vision = torch.randn(3, 9, block.config.vision_size)
    out = block(hidden, vision, text_mask=torch.ones(3, 7))
    assert torch.equal(out, hidden)


@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention", "none"])
def test_learns_from_first_steps(interaction):
    torch.manual_seed(0)
    block = make(interaction=interaction)
    hidden = torch.randn(8, 5, 32)
    vision = torch.randn(8, 6, 24)
    target = hidden + torch.tanh(hidden @ torch.randn(32, 32))
    optim = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(block(hidden, vision), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6
    gate_grads = [p for n, p in block.named_parameters() if n.endswith("_gate")]
    assert all(float(g.detach().abs()) > 0 for g in gate_grads)


def test_self_attention_is_causal_and_padding_aware():
    torch.manual_seed(0)
    block = make(interaction="self_attention", depth=2)
    set_gates(block)
    block.eval()
    hidden = torch.randn(2, 6, 32)
    out = block(hidden)
    changed = hidden.clone()
    changed[:, 4:] = torch.randn(2, 2, 32)
    # future tokens never change earlier outputs
    assert torch.allclose(block(changed)[:, :4], out[:, :4], atol=1e-6)
    # left padding: padded positions do not influence real ones
    padded = torch.cat([torch.randn(2, 3, 32), hidden], dim=1)
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 6)], dim=1)
    assert torch.allclose(block(padded, text_mask=mask)[:, 3:], out, atol=1e-5)


def test_self_attention_incremental_equals_full():
    torch.manual_seed(0)
    block = make(interaction="self_attention", depth=2)
    set_gates(block)
    block.eval()
    hidden = torch.randn(2, 6, 32)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = block(hidden, text_mask=mask)
    cache = PIBCache()
    parts = [block(hidden[:, :3], text_mask=mask[:, :3], cache=cache)]
    for t in range(3, 6):
        parts.append(block(hidden[:, t : t + 1], text_mask=mask[:, : t + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, 1)[1], full[1], atol=1e-5)
    assert torch.allclose(torch.cat(parts, 1)[0, 1:], full[0, 1:], atol=1e-5)


def test_cross_attention_honours_vision_mask_and_cache():
    torch.manual_seed(0)
    block = make(depth=2)
    set_gates(block)
    block.eval()
    hidden = torch.randn(2, 4, 32)
    vision = torch.randn(2, 8, 24)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8]).bool()
    out = block(hidden, vision, vision_mask=mask)
    # sample 0 with only its 5 valid tokens gives the same output
    alone = block(hidden[:1], vision[:1, :5])
    assert torch.allclose(out[:1], alone, atol=1e-5)
    # masked tokens' values are irrelevant
    noisy = vision.clone()
    noisy[0, 5:] = 100.0
    assert torch.allclose(block(hidden, noisy, vision_mask=mask), out, atol=1e-5)
    # cached vision keys/values give the same result, token by token
    cache = PIBCache()
    steps = [block(hidden[:, t : t + 1], vision, vision_mask=mask, cache=cache) for t in range(4)]
    assert torch.allclose(torch.cat(steps, 1), out, atol=1e-6)
    assert len(cache.vision) == 2


def test_vision_index_equals_one_image_per_row_with_gradients():
    """Each image projected once and shared by its rows gives the outputs and the gradients of
    the same images repeated row by row (fp32)."""
    torch.manual_seed(0)
    block = make(depth=2)
    set_gates(block)
    twin = make(depth=2)
    twin.load_state_dict(block.state_dict())
    images = torch.randn(3, 8, 24)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8, [1] * 2 + [0] * 6]).bool()
    index = torch.tensor([2, 0, 1, 2, 0, 1])  # rows read images 2, 0, 1, then again
    hidden = torch.randn(6, 4, 32, requires_grad=True)
    hidden_twin = hidden.detach().clone().requires_grad_(True)
    weights = torch.randn(6, 4, 32)

    shared = block(hidden, images, vision_mask=mask, vision_index=index)
    per_row = twin(hidden_twin, images[index], vision_mask=mask[index])
    assert torch.allclose(shared, per_row, atol=1e-6)
    (shared * weights).sum().backward()
    (per_row * weights).sum().backward()
    assert torch.allclose(hidden.grad, hidden_twin.grad, atol=1e-5)
    for (name, a), b in zip(block.named_parameters(), twin.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # the align MLP saw each image once
    seen = []
    block.align.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    block(hidden, images, vision_mask=mask, vision_index=index)
    assert seen == [3]


def test_vision_index_is_checked():
    block = make()
    with pytest.raises(ValueError, match="one integer per row"):
        block(torch.randn(4, 2, 32), torch.randn(2, 5, 24), vision_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one integer per row"):
        block(torch.randn(2, 2, 32), torch.randn(2, 5, 24), vision_index=torch.tensor([0.0, 1.0]))


def test_cross_attention_output_depends_on_vision():
    torch.manual_seed(0)
    block = make()
    set_gates(block)
    hidden = torch.randn(1, 3, 32)
    a = block(hidden, torch.randn(1, 5, 24))
    b = block(hidden, torch.randn(1, 5, 24))
    assert not torch.allclose(a, b)


def test_config_round_trip_and_validation():
    config = PIBConfig(hidden_size=64, vision_size=32, num_heads=8, depth=3, align="linear")
    assert PIBConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValueError, match="divisible"):
        PIBConfig(hidden_size=30, vision_size=32, num_heads=8)
    with pytest.raises(ValueError, match="align 'none'"):
        PIBConfig(hidden_size=64, vision_size=32, num_heads=8, align="none")
    with pytest.raises(ValueError, match="extra"):
        PIBConfig(hidden_size=64, vision_size=32, heads=8)


def test_dtype_is_preserved_and_identity_holds_in_bf16():
    block = make().to(torch.bfloat16)
    hidden = torch.randn(1, 3, 32, dtype=torch.bfloat16)
    out = block(hidden, torch.randn(1, 5, 24))
    assert out.dtype == torch.bfloat16 and torch.equal(out, hidden)
