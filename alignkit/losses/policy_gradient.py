"""Policy-gradient maths for RLHF: PPO (Schulman et al. 2017; Ouyang et al. 2022), RLOO (Ahmadian et al.
2024, NeMo-Aligner's REINFORCE) and GRPO (Shao et al. 2024). Pure functions on tensors; no model.

Layout: per-token tensors are (B, T) over the *response* positions of B rollouts, right-padded, with
`mask` (B, T) true on real response tokens (EOS included). Sums, not means, are returned where a
training loop normalises (see alignkit/training/loop.py: the loop divides by the global unit count).

Conventions chosen where peers differ (algorithms.md B.5 lists the peers'):
- KL estimators per token (Schulman's): k1 = logp - logp_ref; abs = |k1| (NeMo-Aligner's default);
  k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp) (non-negative, low variance).
- Whitening uses the masked mean and the *uncorrected* variance (NeMo-Aligner, OpenRLHF), eps 1e-8,
  and returns zero-mean advantages.
- RLOO's leave-one-out baseline averages the *valid* (properly ended) other samples; NeMo-Aligner
  divides by (number valid - 1) even when the sample itself is invalid.
- GRPO normalises by the unbiased group std + 1e-4 (TRL); a group of one has advantage 0.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "KL_ESTIMATORS",
    "adaptive_kl_coef",
    "gae",
    "grpo_advantages",
    "kl_per_token",
    "masked_moments",
    "ppo_policy_loss",
    "rloo_advantages",
    "token_rewards",
    "value_loss",
    "whiten",
]

Tensor = torch.Tensor
KL_ESTIMATORS = ("k1", "abs", "k3")


def kl_per_token(logps: Tensor, ref_logps: Tensor, estimator: Literal["k1", "abs", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (any shape).

    Example: logp = log 0.5, logp_ref = log 0.25: k1 = log 2 = 0.693147; abs = 0.693147;
    k3 = 0.5 - 1 + log 2 = 0.193147.
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (use one of {', '.join(KL_ESTIMATORS)})")


def token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO's per-token rewards: -kl_coef * kl at every response token, plus the sequence score on
    the last one (InstructGPT's KL-shaped reward).

    Args:
        kl: (B, T) per-token KL estimates; mask: (B, T) bool; scores: (B,) reward-model scores.

    Returns:
        (B, T) rewards, 0 outside the mask.

    Example: kl = [[0.1, 0.2, 0]], mask = [[1, 1, 0]], score 1, kl_coef 0.5 -> [[-0.05, 0.9, 0]].
    """
    rewards = -kl_coef * kl * mask
    last = mask.long().sum(-1).clamp_min(1) - 1  # (B,) index of each response's last token
    has_tokens = mask.any(-1)
    return rewards.scatter_add(1, last[:, None], (scores * has_tokens).to(rewards.dtype)[:, None])


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

        delta_t = r_t + gamma V_{t+1} - V_t   (V = 0 after the last response token)
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V

    Args:
        rewards, values: (B, T); mask: (B, T) bool, a prefix of each row.

    Returns:
        advantages, returns: (B, T), 0 outside the mask.

    Example (gamma 1, lam 0.5): r = [0, 1], V = [0.5, 0.25] -> delta = [0.25 - 0.5, 1 - 0.25] = [-0.25, 0.75],
    A = [-0.25 + 0.5 * 0.75, 0.75] = [0.125, 0.75], returns = [0.625, 1.0].
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * m


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """(3,) float64 [sum, sum of squares, count] of x over the mask: all-reduce it across processes
    to whiten with global statistics."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64) * m
    return torch.stack([x.sum(), (x * x).sum(), m.sum()])


def whiten(x: Tensor, mask: Tensor, moments: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the mask (uncorrected variance), 0 outside it. `moments`
    from `masked_moments` (summed over processes) give global statistics; default: this tensor's.

    Example: x = [1, 2, 3, (pad 9)] -> mean 2, var 2/3 -> [-1.224745, 0, 1.224745, 0].
    """
    total, total_sq, count = (moments if moments is not None else masked_moments(x, mask)).tolist()
    mean = total / max(count, 1.0)
    var = max(total_sq / max(count, 1.0) - mean * mean, 0.0)
    return ((x - mean) * (var + eps) ** -0.5) * mask


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, summed over masked tokens (eq. 7 of Schulman et al. 2017):

        rho = exp(logp - logp_old);  l_t = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))

    Args:
        logps: (B, T) current log-probs (with grad); old_logps: (B, T) at sampling time;
        advantages: (B, T); mask: (B, T) bool (tokens that count: e.g. only properly ended rollouts).

    Returns:
        loss_sum: the sum of l_t over the mask.
        metrics (sums over the mask, detached): "policy_loss", "clip_fraction" (tokens where the clipped
        branch is the active one), "ratio" (sum of rho), "approx_kl" (sum of (logp - logp_old)^2 / 2),
        "tokens".

    Example: A = 1, rho = 1.5, eps 0.2 -> max(-1.5, -1.2) = -1.2 (clipped: no gradient);
    A = -1, rho = 0.5 -> max(0.5, 0.8) = 0.8 (clipped).
    """
    m = mask.to(logps.dtype)
    log_ratio = (logps - old_logps) * m
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped) * m
    loss = per_token.sum()
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clip_fraction": ((clipped > unclipped).to(m.dtype) * m).sum(),
            "ratio": (ratio * m).sum(),
            "approx_kl": (0.5 * log_ratio.pow(2) * m).sum(),
            "tokens": m.sum(),
        }
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's clipped value loss, summed over masked tokens:

        V_clip = V_old + clip(V - V_old, -c, c);  l_t = 1/2 max((V - R)^2, (V_clip - R)^2)

    `clip=None` gives the plain 1/2 (V - R)^2.

    Example: V_old = 0, V = 1, R = 2, c = 0.2 -> V_clip = 0.2 -> 1/2 max(1, 3.24) = 1.62.
    """
    m = mask.to(values.dtype)
    loss = (values - returns).pow(2)
    if clip is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped_values - returns).pow(2))
    total = 0.5 * (loss * m).sum()
    with torch.no_grad():
        clipped_fraction = (
            (((values - old_values).abs() > clip).to(m.dtype) * m).sum()
            if clip is not None
            else torch.zeros((), device=values.device)
        )
    return total, {"value_loss": total.detach(), "value_clip_fraction": clipped_fraction}


def rloo_advantages(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """RLOO: each sample's reward minus the mean reward of the *other valid* samples of its prompt.

    Args:
        rewards: (G, n) sequence rewards of n samples per prompt; valid: (G, n) bool (properly ended),
            default all valid.

    Returns:
        (G, n) advantages; a sample with no valid other sample has advantage 0.

    Example: rewards [1, 2, 3, 6], all valid -> baselines [11/3, 10/3, 3, 2] -> [-8/3, -4/3, 0, 4];
    with the last invalid -> baselines [5/2, 2, 3/2, 2] -> [-3/2, 0, 3/2, 4].
    """
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    vr = rewards * v
    others = v.sum(-1, keepdim=True) - v.long()  # (G, n) valid samples other than i
    baseline = (vr.sum(-1, keepdim=True) - vr) / others.clamp_min(1)
    return torch.where(others > 0, rewards - baseline, torch.zeros_like(rewards))


def grpo_advantages(rewards: Tensor, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO: rewards normalised within each prompt's group, (R - mean) / (std + eps) with the
    unbiased std (`scale=False`: R - mean, Dr. GRPO). A group of one gets 0.

    Example: rewards [1, 2, 3] -> mean 2, std 1 -> [-1/(1 + 1e-4), 0, 1/(1 + 1e-4)].
    """
    centred = rewards - rewards.mean(-1, keepdim=True)
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    return centred / (rewards.std(-1, keepdim=True) + eps) if scale else centred


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, steps: int) -> float:
    """Ziegler et al. (2019)'s adaptive KL controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * steps / horizon).

    Example: coef 0.1, kl 6, target 4, horizon 100, steps 10 -> error clip(0.5) = 0.2 -> 0.1 * 1.02 = 0.102.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)
