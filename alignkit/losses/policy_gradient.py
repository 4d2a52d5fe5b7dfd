"""Policy-gradient maths for RLHF: PPO (Schulman et al. 2017; Ouyang et al. 2022), RLOO (Ahmadian et al.
2024, NeMo-Aligner's REINFORCE), GRPO (Shao et al. 2024) and its successors: DAPO's clip-higher and
overlong penalty (Yu et al. 2025), GSPO (Zheng et al. 2025), CISPO (MiniMax 2025), REINFORCE++
(Hu 2025), with the loss aggregations they differ by. Pure functions on tensors; no model.

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
    "LOSS_AGGREGATIONS",
    "adaptive_kl_coef",
    "cispo_policy_loss",
    "gae",
    "grpo_advantages",
    "gspo_policy_loss",
    "kl_per_token",
    "masked_moments",
    "overlong_penalty",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reverse_kl_advantages",
    "rloo_advantages",
    "sequence_mean",
    "token_rewards",
    "token_weights",
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
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, summed over masked tokens (eq. 7 of Schulman et al. 2017):

        rho = exp(logp - logp_old);  l_t = max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high))

    `clip_eps_high` (default `clip_eps`) is DAPO's clip-higher: a larger upper bound lets
    unlikely tokens with positive advantage gain more per update (against entropy collapse).
    `weights` (same shape) scales each token's term: the loss aggregation (`token_weights`).

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
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return _clipped_surrogate((logps - old_logps) * m, advantages, m, clip_eps, high, weights)


def _clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, m: Tensor, low: float, high: float, weights: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """max(-A rho, -A clip(rho, 1 - low, 1 + high)) per token for rho = exp(log_ratio) (a token's
    ratio, or its sequence's in GSPO): the weighted sum over the mask `m`, and the metrics."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    return _weighted(per_token, m, weights), _ratio_metrics(per_token, m, log_ratio, clipped > unclipped)


def _weighted(per_token: Tensor, m: Tensor, weights: Tensor | None) -> Tensor:
    return (per_token * m * (1.0 if weights is None else weights)).sum()


def _ratio_metrics(per_token: Tensor, m: Tensor, log_ratio: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """Sums over the mask (detached): the loss, the tokens whose clipped branch is active, the
    ratio, approx. KL to the old policy (sum of (logp - logp_old)^2 / 2), the token count."""
    with torch.no_grad():
        return {
            "policy_loss": (per_token * m).sum(),
            "clip_fraction": (clipped.to(m.dtype) * m).sum(),
            "ratio": (torch.exp(log_ratio) * m).sum(),
            "approx_kl": (0.5 * log_ratio.pow(2) * m).sum(),
            "tokens": m.sum(),
        }


def sequence_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Each sequence's mean of the flat (N,) per-token `x`, repeated at its tokens: (N,).
    `lengths` (S,) are the sequences' token counts in order, summing to N. Differentiable."""
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    sums = torch.zeros(len(lengths), dtype=x.dtype, device=x.device).index_add(0, ids, x)
    return (sums / lengths.clamp_min(1).to(x.dtype))[ids]


def gspo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    lengths: Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float = 4e-4,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its
    tokens' ratios, clipped per sequence:

        s_i = exp(mean_t (logp - logp_old));  l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high))

    on flat (N,) tokens of sequences of `lengths` (S,). Every token of sequence i carries l_i, so
    with the "seq-mean-token-mean" aggregation (weights 1/L_i, one unit per sequence) the loss is
    the paper's mean over sequences. The mean is over all of a sequence's tokens (the mask only
    decides which sequences train). The paper's clip range is (3e-4, 4e-4): sequence ratios sit
    much closer to 1 than token ratios.

    Example: token log-ratios [log 2, 0] (one sequence, A = 1): s = sqrt(2) = 1.4142 -> clipped to
    1.0004 -> l = -1.0004 at both tokens (no gradient: the clipped branch is active).
    """
    log_ratio = sequence_mean(logps - old_logps, lengths)  # (N,) log s_i at each token of sequence i
    return _clipped_surrogate(log_ratio, advantages, mask.to(logps.dtype), clip_eps, clip_eps_high, weights)


def cispo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_high: float = 0.2,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, detached importance weight, so no token's
    gradient is dropped (PPO's clip zeroes the gradient of tokens outside the trust region, often
    the rare "fork" tokens of a reasoning chain):

        l_t = -sg(min(rho, 1 + eps_high)) A logp,  rho = exp(logp - logp_old)

    Example: rho = 1.5, eps_high 0.2, A = 1 -> weight 1.2 -> dl/dlogp = -1.2 (PPO: 0, clipped).
    """
    m = mask.to(logps.dtype)
    log_ratio = (logps - old_logps) * m
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(max=1.0 + clip_eps_high)
    per_token = -weight * advantages * logps
    return _weighted(per_token, m, weights), _ratio_metrics(
        (-ratio * advantages).detach(), m, log_ratio, ratio.detach() > 1.0 + clip_eps_high
    )


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def token_weights(lengths: Tensor, mode: str, horizon: int) -> tuple[Tensor, Tensor]:
    """How a loss summed over tokens is normalised, as a weight per sequence's token and the units
    each sequence adds to the normaliser (the loop divides the weighted sum by the global units):

        token-mean           w = 1,       unit = L_i   (every token counts alike; DAPO)
        seq-mean-token-mean  w = 1 / L_i, unit = 1     (every sequence counts alike; GRPO's paper)
        seq-mean-token-sum   w = 1 / H,   unit = 1     (Dr. GRPO: a constant H = max_new_tokens, no
                                                        length bias)

    Args: lengths (S,) response tokens per sequence. Returns (S,) weights and (S,) units.

    Example: lengths [1, 3], token losses [a], [b, c, d]: token-mean (a + b + c + d) / 4;
    seq-mean-token-mean (a + (b + c + d) / 3) / 2; seq-mean-token-sum with H = 4 (a + b + c + d) / 8.
    """
    lengths = lengths.to(torch.float64)
    ones = torch.ones_like(lengths)
    if mode == "token-mean":
        return ones, lengths
    if mode == "seq-mean-token-mean":
        return 1.0 / lengths.clamp_min(1.0), ones
    if mode == "seq-mean-token-sum":
        return ones / horizon, ones
    raise ValueError(f"unknown loss aggregation {mode!r} (use one of {', '.join(LOSS_AGGREGATIONS)})")


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_tokens - buffer tokens,
    then falling linearly to -1 at max_tokens (a response cut there gets -1).

    Example: max 10, buffer 4: lengths [6, 8, 10] -> [0, -0.5, -1].
    """
    start = max_tokens - buffer
    return -((lengths.to(torch.float32) - start) / max(buffer, 1)).clamp(0.0, 1.0)


def reverse_kl_advantages(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """On-policy distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025): on the student's
    own samples, each token's advantage is the negated per-token reverse KL estimate,

        A_t = log pi_teacher(y_t) - log pi_student(y_t),

    with no sum over later tokens (discount 0). The policy gradient of sum_t A_t log pi(y_t) is then
    the gradient of the sampled reverse KL(student || teacher): the student is pushed toward what
    the teacher would have said at the states the student actually visits.

    Example: student log-probs [log 0.5, log 0.5], teacher [log 0.25, log 1] -> [-log 2, log 2].
    """
    return teacher_logps - student_logps


def reinforce_pp_advantages(
    scores: Tensor, kl: list[Tensor], kl_coef: float, baseline: Tensor | None = None
) -> list[Tensor]:
    """REINFORCE++ (Hu 2025), before its batch whitening: per-token rewards r_t = -beta kl_t with
    the (baseline-subtracted) score on the last token, summed to go (gamma = 1):

        G_t = (score - baseline) - beta sum_{s >= t} kl_s

    Args: scores (S,); kl: S tensors (L_i,) of per-token KL; baseline (S,) (the -baseline variant:
    the group's mean score) or None. Returns S tensors (L_i,). The caller whitens them over the
    whole batch, every process's tokens (`masked_moments`, `whiten`): a batch baseline, not a group's.

    Example: score 1, kl [0.1, 0.2], beta 0.5 -> [1 - 0.15, 1 - 0.1] = [0.85, 0.9].
    """
    out = []
    for i, k in enumerate(kl):
        to_go = torch.flip(torch.cumsum(torch.flip(k, [0]), 0), [0])  # sum_{s >= t} kl_s
        centred = scores[i] - (baseline[i] if baseline is not None else 0.0)
        out.append(centred - kl_coef * to_go)
    return out


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
