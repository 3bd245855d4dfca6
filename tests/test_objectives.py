import math

import pytest
import torch

from mllm_pib.objectives import preference_loss, sequence_logps, shift_labels


def test_sequence_logps_matches_manual_shift():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    probs = logits.softmax(-1)
    expected = [
        math.log(probs[0, 1, 3]) + math.log(probs[0, 2, 4]) + math.log(probs[0, 3, 1]),
        math.log(probs[1, 0, 2]) + math.log(probs[1, 1, 6]),
    ]
    got = sequence_logps(logits, labels)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    mean = sequence_logps(logits, labels, average=True)
    assert torch.allclose(mean, torch.tensor([expected[0] / 3, expected[1] / 2]), atol=1e-5)


def test_shift_labels_and_custom_ignore_index():
    labels = torch.tensor([[5, 6, 7]])
    assert shift_labels(labels).tolist() == [[6, 7, -100]]
    logits = torch.zeros(1, 3, 8)
    got = sequence_logps(logits, torch.tensor([[0, -1, 3]]), ignore_index=-1)
    assert torch.allclose(got, torch.tensor([math.log(1 / 8)]))


def _logsig(x):
    return -math.log1p(math.exp(-x))


PAIRS = [(-4.0, -6.0, -5.0, -5.5), (-3.0, -2.0, -3.5, -2.5), (-10.0, -9.0, -10.0, -9.0)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_losses_match_published_formulas(loss_type, smoothing):
    beta = 0.3
    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*PAIRS))
    loss, metrics = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    expected = []
    for a, b, c, d in PAIRS:
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            value = -(1 - smoothing) * _logsig(beta * h) - smoothing * _logsig(-beta * h)
        elif loss_type == "robust":
            value = (-(1 - smoothing) * _logsig(beta * h) + smoothing * _logsig(-beta * h)) / (1 - 2 * smoothing)
        elif loss_type == "ipo":
            value = (h - 1 / (2 * beta)) ** 2
        else:
            value = max(0.0, 1 - beta * h)
        expected.append(value)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    chosen = [beta * (a - c) for a, _, c, _ in PAIRS]
    rejected = [beta * (b - d) for _, b, _, d in PAIRS]
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3, rel=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3, rel=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3, rel=1e-5)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)
    assert metrics["logps/chosen"].item() == pytest.approx(sum(p[0] for p in PAIRS) / 3)
    assert metrics["logps/rejected"].item() == pytest.approx(sum(p[1] for p in PAIRS) / 3)


def test_identity_policy_gives_ln2_and_sft_term():
    logps = torch.tensor([-3.0, -4.0])
    loss, _ = preference_loss(logps, logps - 1, logps, logps - 1)
    assert loss.item() == pytest.approx(math.log(2))
    nll = torch.tensor([2.0, 4.0])
    loss_sft, _ = preference_loss(logps, logps - 1, logps, logps - 1, sft_weight=0.5, policy_chosen_nll=nll)
    assert loss_sft.item() == pytest.approx(math.log(2) + 0.5 * 3.0)
    with pytest.raises(ValueError, match="policy_chosen_nll"):
        preference_loss(logps, logps, logps, logps, sft_weight=1.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(logps, logps, logps, logps, loss_type="kto")


def test_gradient_pushes_chosen_up():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    loss, _ = preference_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()
