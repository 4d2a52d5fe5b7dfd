"""Unit tests for alignkit.losses.preference: every loss type against hand-computed values.

Shared example unless a test says otherwise: beta = 0.1 and one pair with
    policy chosen -10, reference chosen -11  -> rho_c = +1
    policy rejected -14, reference rejected -13 -> rho_r = -1
so Delta = rho_c - rho_r = 2 and beta * Delta = 0.2. Handy values:
    -log sigma(0.2)  = log(1 + e^-0.2) = 0.598139
    -log sigma(-0.2) = 0.598139 + 0.2  = 0.798139   (since -log sigma(-x) = -log sigma(x) + x)
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.preference import dpo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss

BETA = 0.1
L02 = 0.5981388693815918  # -log sigma(0.2)
ALL_TYPES = ["dpo", "ipo", "hinge", "robust", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"]


def _pair(dtype=torch.float32):
    """(policy_c, policy_r, ref_c, ref_r) for the shared example: Delta = 2."""
    return tuple(torch.tensor([v], dtype=dtype) for v in (-10.0, -14.0, -11.0, -13.0))


def _gt(c=1.0, r=0.5):
    return {"chosen_rewards_gt": torch.tensor([c]), "rejected_rewards_gt": torch.tensor([r])}


def _random_pairs(b: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((-10 + 3 * torch.randn(b, generator=g)).to(dtype) for _ in range(4))


def _value(loss_type, **kw):
    loss, _ = dpo_loss(*_pair(), beta=BETA, loss_type=loss_type, **kw)
    return loss.item()


# ---------------------------------------------------------------- hand-computed, DPO family


def test_dpo_hand_computed_value_and_metrics():
    """Two pairs, beta = 0.1.
    Pair 1 is the shared example: Delta = 2 -> -log sigma(0.2) = 0.598139.
    Pair 2: policy (-5, -5), reference (-4, -6) -> rho_c = -1, rho_r = +1, Delta = -2
            -> -log sigma(-0.2) = 0.798139.
    loss_sum = 1.396278. Rewards beta * rho: chosen 0.1 + -0.1 = 0, rejected -0.1 + 0.1 = 0,
    margin 0.2 + -0.2 = 0; accuracy = 1 (pair 1) + 0 = 1; logps/chosen = -15, logps/rejected = -19.
    """
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-14.0, -5.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-13.0, -6.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(L02 + L02 + 0.2, abs=1e-6)
    assert m["loss"].item() == pytest.approx(1.396278, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -15.0 and m["logps/rejected"].item() == -19.0
    assert not any(v.requires_grad for v in m.values())


def test_dpo_metrics_single_pair():
    """Shared example: rewards/chosen = 0.1 * 1 = 0.1, rejected = 0.1 * -1 = -0.1, margin 0.2."""
    pc = torch.tensor([-10.0], requires_grad=True)
    _, m = dpo_loss(pc, *_pair()[1:], beta=BETA)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margin"].item() == pytest.approx(0.2)
    assert m["rewards/accuracy"].item() == 1.0
    assert not any(v.requires_grad for v in m.values())


def test_dpo_at_zero_margin_is_log2_per_pair():
    """Delta = 0 -> -log sigma(0) = log 2 for every pair; B = 5 -> 5 log 2. Ties score accuracy
    0.5 each: 2.5."""
    pc, pr, rc, rr = _random_pairs(5, seed=0)
    loss, m = dpo_loss(pc, pr, pc + 1.0, pr + 1.0, beta=0.7)  # rho_c = rho_r = -1
    assert loss.item() == pytest.approx(5 * math.log(2), abs=1e-5)
    assert m["rewards/accuracy"].item() == 2.5


def test_accuracy_counts_rounding_noise_as_a_tie():
    """beta = 1, margins [1e-7, -1e-7, 2e-5, -2e-5]: the first two are within the tie tolerance
    (1e-5: fp32 noise at step 0, where policy == reference) and count 0.5 each; 2e-5 wins, -2e-5
    loses: accuracy 0.5 + 0.5 + 1 + 0 = 2."""
    zeros = torch.zeros(4, dtype=torch.float64)
    margins = torch.tensor([1e-7, -1e-7, 2e-5, -2e-5], dtype=torch.float64)
    _, m = dpo_loss(margins, zeros, zeros, zeros, beta=1.0)
    assert m["rewards/accuracy"].item() == 2.0


def test_cdpo_hand_computed():
    """eps = 0.1: 0.9 * 0.598139 + 0.1 * 0.798139 = 0.598139 + 0.1 * 0.2 = 0.618139."""
    assert _value("dpo", label_smoothing=0.1) == pytest.approx(0.618139, abs=1e-6)


def test_cdpo_is_dpo_mixed_with_the_flipped_pair():
    """cDPO (Mitchell 2023): with label-flip rate eps, the loss is (1 - eps) x DPO on the pair plus
    eps x DPO on the pair with chosen and rejected swapped. At eps = 0.5 the label carries no
    information: swapping chosen and rejected leaves the loss unchanged."""
    pc, pr, rc, rr = _random_pairs(6, seed=1)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    flipped, _ = dpo_loss(pr, pc, rr, rc, beta=0.3)
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, 0.8 * plain + 0.2 * flipped)
    assert abs(float(smoothed - plain)) > 1e-3  # the smoothing term is really there
    half, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.5)
    half_swapped, _ = dpo_loss(pr, pc, rr, rc, beta=0.3, label_smoothing=0.5)
    torch.testing.assert_close(half, half_swapped)


def test_ipo_hand_computed():
    """(Delta - 1/(2 beta))^2 = (2 - 1/0.2)^2 = (2 - 5)^2 = 9. Delta is not multiplied by beta."""
    assert _value("ipo") == pytest.approx(9.0, abs=1e-5)


def test_ipo_uses_the_logps_as_passed():
    """Convention: no internal length normalisation. Per-token averages (the recipe's
    average_logprobs, = TRL's ipo) are the caller's job: sums 2x larger give a different loss.
    Shared example halved (Delta = 1): (1 - 5)^2 = 16."""
    halved = [t / 2 for t in _pair()]
    loss, _ = dpo_loss(*halved, beta=BETA, loss_type="ipo")
    assert loss.item() == pytest.approx(16.0, abs=1e-5)


def test_hinge_hand_computed():
    """Pair 1: relu(1 - 0.1 * 2) = 0.8. Pair 2: Delta = 20 -> relu(1 - 2) = 0. Sum 0.8."""
    pc, pr = torch.tensor([-10.0, -1.0]), torch.tensor([-14.0, -20.0])
    rc, rr = torch.tensor([-11.0, -1.0]), torch.tensor([-13.0, -0.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="hinge")
    assert loss.item() == pytest.approx(0.8, abs=1e-6)


def test_robust_hand_computed():
    """eps = 0.1: [0.9 * 0.598139 - 0.1 * 0.798139] / 0.8 = (0.8 * 0.598139 - 0.02) / 0.8
    = 0.598139 - 0.025 = 0.573139."""
    assert _value("robust", label_smoothing=0.1) == pytest.approx(0.573139, abs=1e-6)


def test_robust_with_zero_eps_equals_dpo():
    pc, pr, rc, rr = _random_pairs(6, seed=2)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    robust, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(plain, robust)


def test_rpo_sq_hand_computed():
    """gt rewards 1 and 0.5, eta = 1 -> g = 0.5; (beta Delta - g)^2 = (0.2 - 0.5)^2 = 0.09.
    eta = 2 -> g = 1: (0.2 - 1)^2 = 0.64."""
    assert _value("rpo_sq", **_gt()) == pytest.approx(0.09, abs=1e-6)
    assert _value("rpo_sq", gt_reward_scale=2.0, **_gt()) == pytest.approx(0.64, abs=1e-6)


def test_rpo_bwd_kl_hand_computed():
    """p = sigma(0.2) = 0.549834 (model), q = sigma(0.5) = 0.622459 (ground truth).
    KL(q||p) = 0.622459 * log(0.622459/0.549834) + 0.377541 * log(0.377541/0.450166)
             = 0.622459 * 0.124062 + 0.377541 * (-0.175938) = 0.077223 - 0.066424 = 0.010800."""
    assert _value("rpo_bwd_kl", **_gt()) == pytest.approx(0.0107997, abs=1e-6)


def test_rpo_fwd_kl_hand_computed():
    """KL(p||q) = 0.549834 * log(0.549834/0.622459) + 0.450166 * log(0.450166/0.377541)
    = 0.549834 * (-0.124062) + 0.450166 * 0.175938 = -0.068213 + 0.079201 = 0.010988."""
    assert _value("rpo_fwd_kl", **_gt()) == pytest.approx(0.0109879, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
def test_rpo_losses_vanish_when_implicit_gap_matches_ground_truth(loss_type):
    """gt gap 0.2 = beta * Delta -> p = q -> every RPO loss is 0."""
    assert _value(loss_type, **_gt(1.0, 0.8)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("loss_type", ["rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"])
def test_rpo_gradcheck(loss_type):
    pc, pr, rc, rr = (t.requires_grad_() for t in _random_pairs(3, seed=3, dtype=torch.float64))
    gc, gr = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)

    def f(pc, pr):
        return dpo_loss(
            pc,
            pr,
            rc.detach(),
            rr.detach(),
            beta=0.2,
            loss_type=loss_type,
            chosen_rewards_gt=gc,
            rejected_rewards_gt=gr,
            gt_reward_scale=1.5,
        )[0]

    assert torch.autograd.gradcheck(f, (pc, pr))


def test_dpo_gradient_raises_chosen_lowers_rejected_and_skips_reference():
    """d/d pi_c [-log sigma(beta Delta)] = -beta * sigma(-beta Delta) = -0.1 * 0.450166 = -0.0450166;
    d/d pi_r = +0.0450166; the reference is a constant."""
    pc, pr, rc, rr = (t.requires_grad_() for t in _pair())
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.0450166, abs=1e-6)
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_sum_convention_splits_over_micro_batches(loss_type):
    """The loop divides by the global pair count, so loss(batch) = loss(half 1) + loss(half 2)."""
    pc, pr, rc, rr = _random_pairs(6, seed=4)
    gt = {"chosen_rewards_gt": torch.rand(6), "rejected_rewards_gt": torch.rand(6)}
    kw = {"beta": 0.2, "loss_type": loss_type}
    whole, mw = dpo_loss(pc, pr, rc, rr, **gt, **kw)
    parts = [
        dpo_loss(pc[s], pr[s], rc[s], rr[s], **{k: v[s] for k, v in gt.items()}, **kw)
        for s in (slice(0, 2), slice(2, 6))
    ]
    torch.testing.assert_close(whole, parts[0][0] + parts[1][0])
    for key in mw:
        torch.testing.assert_close(mw[key], parts[0][1][key] + parts[1][1][key])


def test_bf16_inputs_give_float32_loss():
    loss, m = dpo_loss(*_pair(torch.bfloat16), beta=BETA)
    assert loss.dtype == torch.float32 and m["rewards/chosen"].dtype == torch.float32
    assert loss.item() == pytest.approx(L02, abs=1e-6)


# ---------------------------------------------------------------- errors


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="sigmoid") as err:
        dpo_loss(*_pair(), loss_type="sigmoid")
    for name in ALL_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
def test_rpo_without_ground_truth_rewards_raises(loss_type):
    with pytest.raises(ValueError, match="chosen_rewards_gt"):
        dpo_loss(*_pair(), loss_type=loss_type)
    with pytest.raises(ValueError, match="rejected_rewards_gt"):
        dpo_loss(*_pair(), loss_type=loss_type, chosen_rewards_gt=torch.tensor([1.0]))


@pytest.mark.parametrize("loss_type, eps", [("ipo", 0.1), ("hinge", 0.1), ("robust", 0.5), ("dpo", 0.6), ("dpo", -0.1)])
def test_label_smoothing_outside_its_range_raises(loss_type, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_pair(), loss_type=loss_type, label_smoothing=eps)


# ---------------------------------------------------------------- SimPO


def test_simpo_hand_computed_without_reference():
    """beta = 2, gamma = 1, mean logps -1 (chosen) and -2 (rejected):
    x = 2 * (-1 - -2) - 1 = 1 -> -log sigma(1) = log(1 + e^-1) = 0.313262.
    Rewards are beta * mean logp: chosen -2, rejected -4, margin 2, accuracy 1."""
    loss, m = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-2.0)
    assert m["rewards/rejected"].item() == pytest.approx(-4.0)
    assert m["rewards/margin"].item() == pytest.approx(2.0)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -2.0


def test_simpo_label_smoothing_hand_computed():
    """eps = 0.1, x = 1: 0.9 * 0.313262 + 0.1 * (-log sigma(-1) = 1.313262) = 0.413262."""
    loss, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_simpo_margin_gamma_shifts_the_logit():
    """Equal mean logps, gamma = 0 -> log 2; gamma = 1 -> -log sigma(-1) = 1.313262."""
    x = torch.tensor([-1.5])
    assert simpo_loss(x, x, gamma=0.0)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert simpo_loss(x, x, gamma=1.0)[0].item() == pytest.approx(1.313262, abs=1e-6)


# ---------------------------------------------------------------- ORPO


def test_orpo_hand_computed_without_reference():
    """p_c = log 0.5 -> odds 0.5/0.5 = 1; p_r = log 0.2 -> odds 0.2/0.8 = 0.25.
    log odds ratio = log(1 / 0.25) = log 4 = 1.386294;
    loss = -0.1 * log sigma(log 4) = -0.1 * log(4/5) = 0.0223144.
    Rewards = 0.1 * p: chosen -0.0693147, rejected -0.160944."""
    loss, m = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.1)
    assert loss.item() == pytest.approx(0.0223144, abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * math.log(0.2), abs=1e-6)
    assert m["rewards/accuracy"].item() == 1.0


def test_orpo_gradcheck():
    g = torch.Generator().manual_seed(5)
    # Mean log-probs on both sides of -log 2, where log(1 - e^x) switches formula.
    pc = torch.tensor([-0.05, -0.5, -1.2, -3.0], dtype=torch.float64).requires_grad_()
    pr = (-torch.rand(4, generator=g, dtype=torch.float64) * 3 - 0.01).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, beta=0.3)[0], (pc, pr))


def test_orpo_stays_finite_at_the_extremes():
    """Mean logp 0 (probability 1: infinite odds) and -80 (odds ~ e^-80) give finite loss and grads."""
    pc = torch.tensor([0.0, -80.0, -1e-9], requires_grad=True)
    pr = torch.tensor([-80.0, 0.0, -1e-9], requires_grad=True)
    loss, _ = orpo_loss(pc, pr)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# ---------------------------------------------------------------- KTO


def test_kto_hand_computed_value_and_metrics():
    """beta = 0.1, z = 1, weights lambda_D = 2, lambda_U = 1. Policy/reference logps:
    ex 1 desirable   -5 / -8 -> rho = 3: 2 * (1 - sigma(0.1 * (3 - 1))) = 2 * 0.450166 = 0.900332
    ex 2 undesirable -5 / -8 -> rho = 3: 1 * (1 - sigma(0.1 * (1 - 3))) = 0.549834
    ex 3 undesirable -9 / -8 -> rho = -1: 1 - sigma(0.1 * (1 + 1)) = 0.450166
    sum = 1.900332. rewards/chosen = 0.3, rewards/rejected = 0.3 - 0.1 = 0.2,
    logps/chosen = -5, logps/rejected = -14, counts 1 and 2, kl = z * B = 3."""
    policy, reference = torch.tensor([-5.0, -5.0, -9.0]), torch.tensor([-8.0, -8.0, -8.0])
    labels = torch.tensor([True, False, False])
    loss, m = kto_loss(policy, reference, labels, torch.tensor(1.0), beta=0.1, desirable_weight=2.0)
    assert loss.item() == pytest.approx(1.900332, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.3, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(0.2, abs=1e-6)
    assert m["logps/chosen"].item() == -5.0 and m["logps/rejected"].item() == -14.0
    assert m["count/chosen"].item() == 1.0 and m["count/rejected"].item() == 2.0
    assert m["kl"].item() == pytest.approx(3.0)
    assert not any(v.requires_grad for v in m.values())


def test_kto_reference_point_is_mean_rho_clamped_at_zero_and_detached():
    """rho = [1, -3] -> mean -1 -> z = 0;  rho = [1, 3] -> z = 2."""
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    z = kto_reference_point(policy, torch.tensor([-5.0, -3.0]))
    assert z.item() == 0.0 and not z.requires_grad
    z = kto_reference_point(policy, torch.tensor([-5.0, -9.0]))
    assert z.item() == pytest.approx(2.0) and not z.requires_grad


def test_kto_loss_clamps_a_negative_reference_point_and_passes_no_gradient_to_it():
    """A raw negative mean behaves as z = 0: desirable rho = 0 -> 1 - sigma(0) = 0.5."""
    z = torch.tensor(-4.0, requires_grad=True)
    loss, _ = kto_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([True]), z)
    assert loss.item() == pytest.approx(0.5)
    assert not loss.requires_grad  # no policy grad requested; z must not make it differentiable


def test_kto_gradient_pushes_desirable_up_and_undesirable_down():
    policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, _ = kto_loss(policy, torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), torch.tensor(0.0))
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]
