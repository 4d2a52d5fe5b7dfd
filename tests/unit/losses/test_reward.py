"""Unit tests for alignkit.losses.reward (Bradley-Terry and SteerLM attribute regression).

Handy values: -log sigma(1) = log(1 + e^-1) = 0.313262; -log sigma(-1) = 0.313262 + 1 = 1.313262.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.reward import bradley_terry_loss, regression_loss, soft_bradley_terry_loss

L1 = 0.3132616875182228  # -log sigma(1)


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_hand_computed_value_and_metrics():
    """Pair 1: r_c = 1, r_r = 0 -> -log sigma(1) = 0.313262 (correct).
    Pair 2: r_c = 0, r_r = 1 -> -log sigma(-1) = 1.313262 (wrong).
    Sum 1.626523; accuracy 1; rewards/chosen 1, rewards/rejected 1, rewards/margin 1 - 1 = 0."""
    loss, m = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * L1 + 1, abs=1e-6)
    assert m["loss"].item() == pytest.approx(1.626523, abs=1e-6)
    assert m["accuracy"].item() == 1.0
    assert m["rewards/chosen"].item() == 1.0 and m["rewards/rejected"].item() == 1.0
    assert m["rewards/margin"].item() == 0.0


def test_margin_bt_hand_computed():
    """r_c - r_r = 1, margin |l| = 1 -> -log sigma(0) = log 2; margin 2 -> -log sigma(-1) = 1.313262."""
    loss, m = bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx(math.log(2) + L1 + 1, abs=1e-6)
    assert m["accuracy"].item() == 2.0  # accuracy ignores the margin


def test_scaled_bt_hand_computed():
    """scale |l| = [2, 0.5], both pairs r_c - r_r = 1: 2 * 0.313262 + 0.5 * 0.313262 = 0.783154."""
    loss, _ = bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]), scale=torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx(2.5 * L1, abs=1e-6)


def test_bt_accuracy_counts_strict_wins_only():
    """Gaps [2, 0, -0.5, 0.1] -> wins at 2 and 0.1; a tie is not a win."""
    chosen = torch.tensor([2.0, 1.0, 0.0, 0.1])
    _, m = bradley_terry_loss(chosen, torch.tensor([0.0, 1.0, 0.5, 0.0]))
    assert m["accuracy"].item() == 2.0


def test_bt_gradient_hand_computed():
    """d/dr_c [-log sigma(r_c - r_r - m)] = -sigma(-(r_c - r_r - m)); r_c - r_r = 1, m = 0.5, scale 2:
    -2 * sigma(-0.5) = -2 * 0.377541 = -0.755082; d/dr_r = +0.755082."""
    rc, rr = torch.tensor([1.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(rc, rr, margin=0.5, scale=2.0)
    loss.backward()
    assert rc.grad.item() == pytest.approx(-0.755082, abs=1e-6)
    assert rr.grad.item() == pytest.approx(0.755082, abs=1e-6)


def test_bt_gradcheck():
    rc = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b, margin, scale)[0], (rc, rr))


# ---------------------------------------------------------------- soft-target Bradley-Terry


def test_soft_bt_hand_computed_value_and_metrics():
    """-[p log sigma(d) + (1 - p) log sigma(-d)]:
    d = 1, p = 0.75 -> 0.75 * 0.313262 + 0.25 * 1.313262 = 0.563262 (agrees: d > 0, p > 0.5);
    d = 1, p = 1 -> 0.313262, the plain Bradley-Terry loss (agrees);
    d = -1, p = 0.8 -> 0.8 * 1.313262 + 0.2 * 0.313262 = 1.113262 (disagrees);
    d = 0, p = 0.3 -> log 2 = 0.693147 whatever p (a tie agrees with nothing).
    Sum 2.682933; accuracy 2; margin 1 + 1 - 1 + 0 = 1."""
    chosen, rejected = torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.0, 2.0])
    loss, m = soft_bradley_terry_loss(chosen, rejected, torch.tensor([0.75, 1.0, 0.8, 0.3]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.563262 + L1 + 1.113262 + math.log(2), abs=1e-5)
    assert m["accuracy"].item() == 2.0 and m["rewards/margin"].item() == 1.0
    hard, _ = bradley_terry_loss(chosen[:2], rejected[:2])
    soft_one, _ = soft_bradley_terry_loss(chosen[:2], rejected[:2], 1.0)
    assert soft_one.item() == pytest.approx(hard.item(), abs=1e-6)


def test_soft_bt_gradient_is_zero_where_sigma_d_equals_p():
    """d/dd = sigma(d) - p: with p = 0.75 and d = log 3 (sigma = 0.75) the gradient vanishes; at d = 0
    it is 0.5 - 0.75 = -0.25 on the chosen reward and +0.25 on the rejected."""
    rc = torch.tensor([math.log(3), 0.0], requires_grad=True)
    rr = torch.zeros(2, requires_grad=True)
    loss, _ = soft_bradley_terry_loss(rc, rr, 0.75)
    loss.backward()
    assert rc.grad.tolist() == pytest.approx([0.0, -0.25], abs=1e-6)
    assert rr.grad.tolist() == pytest.approx([0.0, 0.25], abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_bradley_terry_loss(rc, rr, 1.5)


def test_soft_bt_gradcheck():
    rc = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: soft_bradley_terry_loss(a, b, p)[0], (rc, rr))


# ---------------------------------------------------------------- regression


def _attrs():
    """2 samples x 3 attributes; sample 2 lacks attribute 1 (label -100)."""
    predicted = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 4.0]], requires_grad=True)
    targets = torch.tensor([[3.0, 2.0, 0.0], [1.0, -100.0, 4.0]])
    mask = targets != -100
    return predicted, targets, mask


def test_regression_hand_computed_value_and_metrics():
    """Squared errors of present entries: sample 1: (1-3)^2 = 4, 0, (3-0)^2 = 9; sample 2: (0-1)^2 = 1,
    [masked], 0. Sum 14 over 5 present entries (the unit count). Per attribute: mse/0 = 5 (count 2),
    mse/1 = 0 (count 1), mse/2 = 9 (count 2)."""
    predicted, targets, mask = _attrs()
    loss, m = regression_loss(predicted, targets, mask)
    assert loss.item() == pytest.approx(14.0)
    assert [m[f"mse/{i}"].item() for i in range(3)] == [5.0, 0.0, 9.0]
    assert [m[f"count/{i}"].item() for i in range(3)] == [2.0, 1.0, 2.0]
    assert m["loss"].item() == 14.0 and not any(v.requires_grad for v in m.values())


def test_regression_ignores_masked_entries():
    """Changing the masked target (to 7, to NaN) changes neither the loss nor the gradients, and the
    masked prediction gets zero gradient. Present-entry grads are 2 (pred - target)."""
    results = []
    for masked_value in (-100.0, 7.0, float("nan")):
        predicted, targets, mask = _attrs()
        targets[1, 1] = masked_value
        loss, _ = regression_loss(predicted, targets, mask)
        loss.backward()
        results.append((loss.detach(), predicted.grad.clone()))
    for loss, grad in results:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
    torch.testing.assert_close(results[0][1], torch.tensor([[-4.0, 0.0, 6.0], [-2.0, 0.0, 0.0]]))


def test_regression_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B, A\)"):
        regression_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
