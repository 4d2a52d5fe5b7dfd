"""SteerLM 2.0's importance-weighted loss against the hand-computed example of its docstring."""

import math

import pytest
import torch

from alignkit.losses.steerlm import steerlm2_loss


def example(dtype=torch.float32):
    policy = torch.tensor([[-2.0, -4.0]], dtype=dtype, requires_grad=True)
    initial = torch.tensor([[-2.0, -4.0]], dtype=dtype)  # log Q_theta = log Q' -> b' uniform
    attribute = torch.tensor([[0.0, math.log(3)]], dtype=dtype)
    prior = initial.clone()  # so log P(a) + log P(y) - log Q' = [0, log 3] -> w' = [1/4, 3/4]
    return policy, initial, attribute, prior, torch.tensor([[1, 3]])


def test_hand_computed_loss_distance_and_gradient():
    policy, initial, attribute, prior, tokens = example()
    loss, metrics = steerlm2_loss(policy, initial, attribute, prior, tokens)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    assert float(metrics["distance"]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert float(metrics["weights/max"]) == pytest.approx(0.75, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(policy.grad, torch.tensor([[0.125, -0.125]]))


def test_no_update_when_the_policy_already_matches_the_target():
    """If log Q_theta - log Q' equals log P(a) + log P(y) - log Q' up to a constant, w' = b':
    zero loss gradient and zero distance."""
    policy, initial, attribute, prior, tokens = example()
    matched = (attribute + prior).clone().requires_grad_(True)  # log Q_theta = log P(a) + log P(y)
    loss, metrics = steerlm2_loss(matched, initial, attribute, prior, tokens)
    loss.backward()
    assert float(metrics["distance"]) == pytest.approx(0, abs=1e-6)
    assert matched.grad.abs().max() < 1e-6


def test_groups_sum_and_gradcheck():
    policy, initial, attribute, prior, tokens = example(torch.float64)
    two = [torch.cat([t, t]) for t in (policy.detach(), initial, attribute, prior, tokens)]
    loss, _ = steerlm2_loss(*two)
    assert float(loss) == pytest.approx(0.5, abs=1e-9)  # one unit per group, summed
    # The weights are constants of the step (b' too, although it is computed from the policy), so
    # the gradient is exactly -(w' - b') / mean tokens; a finite-difference check would also move b'.
    torch.manual_seed(0)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q, a, y = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    n = torch.randint(1, 9, (3, 4))
    steerlm2_loss(p, q, a, y, n)[0].backward()
    w, b = torch.softmax(a + y - q, -1), torch.softmax(p.detach() - q, -1)
    torch.testing.assert_close(p.grad, -(w - b) / n.double().mean(-1, keepdim=True))


def test_attribute_likelihood_hand_computed():
    """m = 2, sigma = 1: unnormalised exp(-(k-2)^2/2) over k = 0..4 is [e^-2, e^-.5, 1, e^-.5, e^-2],
    sum 2.483732. Target 2: log(1 / 2.483732) = -0.909763; target 0: -2 - log 2.483732 = -2.909763.
    Two attributes add up."""
    from alignkit.losses.steerlm import attribute_log_likelihood

    predicted = torch.tensor([[2.0, 2.0]])
    got = attribute_log_likelihood(predicted, torch.tensor([[2, 0]]), sigma=1.0)
    torch.testing.assert_close(got, torch.tensor([-0.909763 - 2.909763]), atol=1e-5, rtol=0)
    # A sharper sigma trusts the prediction more: the matching level gains, a far one loses.
    sharp = attribute_log_likelihood(predicted, torch.tensor([[2, 0]]), sigma=0.5)
    assert sharp[0] < got[0]
    assert attribute_log_likelihood(predicted[:, :1], torch.tensor([[2]]), 0.5) > attribute_log_likelihood(
        predicted[:, :1], torch.tensor([[2]]), 1.0
    )
