"""Policy-gradient maths (PPO, RLOO, GRPO, DAPO, GSPO, CISPO, REINFORCE++) against hand-computed values
(the docstrings of alignkit/losses/policy_gradient.py)."""

import math

import pytest
import torch

from alignkit.losses.policy_gradient import (
    adaptive_kl_coef,
    cispo_policy_loss,
    gae,
    grpo_advantages,
    gspo_policy_loss,
    kl_per_token,
    masked_moments,
    overlong_penalty,
    ppo_policy_loss,
    reinforce_pp_advantages,
    reverse_kl_advantages,
    rloo_advantages,
    sequence_mean,
    token_rewards,
    token_weights,
    value_loss,
    whiten,
)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0
    )


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_per_token(logp, ref, "k1"), [math.log(2)])
    close(kl_per_token(ref, logp, "abs"), [math.log(2)])
    close(kl_per_token(logp, ref, "k3"), [0.5 - 1 + math.log(2)])
    assert float(kl_per_token(ref, logp, "k3")) >= 0  # k3 is never negative
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_per_token(logp, ref, "k9")


def test_equal_policies_have_zero_kl_and_ratio_one():
    logp = torch.randn(3, 5)
    for estimator in ("k1", "abs", "k3"):
        assert kl_per_token(logp, logp.clone(), estimator).abs().max() == 0
    mask = torch.ones(3, 5, dtype=torch.bool)
    _, metrics = ppo_policy_loss(logp.requires_grad_(), logp.detach(), torch.randn(3, 5), mask)
    assert float(metrics["ratio"]) == 15.0 and float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = token_rewards(kl, torch.tensor([1.0, -2.0]), mask, kl_coef=0.5)
    close(out, [[-0.05, 0.9, 0.0], [-2.15, 0.0, 0.0]])


def test_gae_by_hand_and_lambda_one_is_the_monte_carlo_return():
    rewards, values = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[True, True, False]])  # the padded value 9 must not leak in
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.125, 0.75, 0.0]])
    close(ret, [[0.625, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[1.0, 1.0, 0.0]])  # returns = sum of future rewards
    adv, _ = gae(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=0.5, lam=1.0)
    close(adv, [[1.5, 1.0]])  # 1 + 0.5 * 1


def test_whitening_by_hand_and_with_global_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    s = math.sqrt(3 / 2)
    close(whiten(x, mask), [[-s, 0.0, s, 0.0]], tol=1e-5)
    # two "processes" holding halves give the same result with summed moments
    a, b = x[:, :2], x[:, 2:]
    ma, mb = mask[:, :2], mask[:, 2:]
    moments = masked_moments(a, ma) + masked_moments(b, mb)
    close(torch.cat([whiten(a, ma, moments), whiten(b, mb, moments)], 1), whiten(x, mask))


def test_clipped_surrogate_by_hand_and_its_gradient():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, metrics = ppo_policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), clip_eps=0.2)
    close(loss, -1.2 + 0.8 - 1.1)  # clipped, clipped, inside the trust region
    assert float(metrics["clip_fraction"]) == 2.0
    loss.backward()
    close(logp.grad, [[0.0, 0.0, -1.1]])  # d(-A rho)/d logp = -A rho where unclipped, 0 where clipped


def test_masked_tokens_do_not_count():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, metrics = ppo_policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]), torch.tensor([[True, False]])
    )
    close(loss, -1.0)
    assert float(metrics["tokens"]) == 1.0


def test_value_loss_by_hand():
    loss, metrics = value_loss(
        torch.tensor([[1.0]]),
        torch.tensor([[0.0]]),
        torch.tensor([[2.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        clip=0.2,
    )
    close(loss, 1.62)
    assert float(metrics["value_clip_fraction"]) == 1.0
    plain, _ = value_loss(
        torch.tensor([[1.0]]),
        torch.tensor([[0.0]]),
        torch.tensor([[2.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        clip=None,
    )
    close(plain, 0.5)


def test_rloo_leave_one_out_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    close(rloo_advantages(rewards), [[-8 / 3, -4 / 3, 0.0, 4.0]])
    close(rloo_advantages(rewards, torch.tensor([[True, True, True, False]])), [[-1.5, 0.0, 1.5, 4.0]])
    close(rloo_advantages(torch.tensor([[5.0, 1.0]]), torch.tensor([[True, False]])), [[0.0, -4.0]])
    assert float(rloo_advantages(torch.randn(3, 4)).sum(-1).abs().max()) < 1e-5  # zero-sum when all valid


def test_grpo_group_normalisation():
    close(grpo_advantages(torch.tensor([[1.0, 2.0, 3.0]])), [[-1 / 1.0001, 0.0, 1 / 1.0001]])
    close(grpo_advantages(torch.tensor([[1.0, 2.0, 3.0]]), scale=False), [[-1.0, 0.0, 1.0]])
    close(grpo_advantages(torch.tensor([[4.0, 4.0]])), [[0.0, 0.0]])  # all equal: no signal
    close(grpo_advantages(torch.tensor([[7.0]])), [[0.0]])


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, kl=6, target=4, horizon=100, steps=10) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, kl=1, target=4, horizon=100, steps=10) == pytest.approx(0.098)
    assert adaptive_kl_coef(0.1, kl=4, target=4, horizon=100, steps=10) == pytest.approx(0.1)


def test_clip_higher_widens_only_the_upper_bound():
    logp = torch.log(torch.tensor([1.25, 0.75])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = ppo_policy_loss(logp, torch.zeros(2), adv, torch.ones(2, dtype=torch.bool), 0.2, clip_eps_high=0.28)
    close(loss, -1.25 + 0.8)  # 1.25 < 1.28: inside; 0.75 < 0.8: clipped below as before
    assert float(metrics["clip_fraction"]) == 1.0
    loss.backward()
    close(logp.grad, [-1.25, 0.0])


def test_weights_scale_each_tokens_term():
    logp = torch.zeros(3, requires_grad=True)
    loss, _ = ppo_policy_loss(
        logp,
        torch.zeros(3),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.ones(3, dtype=torch.bool),
        weights=torch.tensor([1.0, 0.5, 0.0]),
    )
    close(loss, -(1.0 + 1.0 + 0.0))


def test_sequence_mean_repeats_each_sequences_mean_at_its_tokens():
    x = torch.tensor([1.0, 2.0, 4.0, 10.0], requires_grad=True)
    out = sequence_mean(x, torch.tensor([3, 1]))
    close(out, [7 / 3, 7 / 3, 7 / 3, 10.0])
    out.sum().backward()
    close(x.grad, [1.0, 1.0, 1.0, 1.0])  # each token reaches its 3 copies of the mean, 1/3 each


def test_gspo_ratio_is_the_geometric_mean_per_sequence_by_hand():
    # the docstring's example: token log-ratios [log 2, 0] -> s = sqrt 2, clipped to 1.0004
    logp = torch.tensor([math.log(2.0), 0.0], requires_grad=True)
    mask = torch.ones(2, dtype=torch.bool)
    loss, metrics = gspo_policy_loss(logp, torch.zeros(2), torch.ones(2), mask, torch.tensor([2]))
    close(loss, -2 * 1.0004)
    assert float(metrics["clip_fraction"]) == 2.0
    loss.backward()
    close(logp.grad, [0.0, 0.0])
    # inside the range: l = -A s at each token, d/dlogp_t of sum = -A s * 2 * (1/L) with L = 2
    logp = torch.tensor([1e-4, 0.0], requires_grad=True)
    loss, _ = gspo_policy_loss(logp, torch.zeros(2), torch.ones(2), mask, torch.tensor([2]))
    s = math.exp(0.5e-4)
    close(loss, -2 * s)
    loss.backward()
    close(logp.grad, [-s, -s])


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_capped_weight():
    logp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0])
    loss, metrics = cispo_policy_loss(logp, torch.zeros(2), adv, torch.ones(2, dtype=torch.bool), clip_eps_high=0.2)
    close(loss, -(1.2 * math.log(1.5) + 0.5 * math.log(0.5)))
    assert float(metrics["clip_fraction"]) == 1.0
    loss.backward()
    close(logp.grad, [-1.2, -0.5])  # PPO would give 0 for the first token


@pytest.mark.parametrize(
    "mode, expected", [("token-mean", 10 / 4), ("seq-mean-token-mean", (1 + 9 / 3) / 2), ("seq-mean-token-sum", 10 / 8)]
)
def test_loss_aggregations_by_hand(mode, expected):
    lengths = torch.tensor([1, 3])
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0])  # a = 1; b, c, d = 2, 3, 4
    weights, units = token_weights(lengths, mode, horizon=4)
    w = torch.repeat_interleave(weights, lengths)
    close(float((w * per_token).sum() / units.sum()), expected)


def test_overlong_penalty_by_hand():
    close(overlong_penalty(torch.tensor([6, 8, 10, 12]), max_tokens=10, buffer=4), [0.0, -0.5, -1.0, -1.0])


def test_reinforce_pp_returns_to_go_by_hand():
    out = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), [torch.tensor([0.1, 0.2]), torch.tensor([0.0])], 0.5)
    close(out[0], [0.85, 0.9])
    close(out[1], [0.0])
    based = reinforce_pp_advantages(
        torch.tensor([1.0, 0.0]), [torch.zeros(2), torch.zeros(1)], 0.5, torch.tensor([0.5, 0.5])
    )
    close(based[0], [0.5, 0.5])
    close(based[1], [-0.5])


def test_reverse_kl_advantages_by_hand():
    student, teacher = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 1.0]))
    close(reverse_kl_advantages(student, teacher), [-math.log(2), math.log(2)])
