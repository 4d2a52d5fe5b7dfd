"""Preference-optimisation losses: DPO and its variants (cDPO, IPO, hinge, robust, NeMo-Aligner's
RPO), SimPO, ORPO and KTO.

Every function takes (B,) sequence log-probabilities, one value per pair (or per example for
KTO), already reduced over response tokens by the caller: a SUM over tokens, or a per-token MEAN
when the recipe's `average_logprobs` is on (SimPO and ORPO always want the mean). The functions
never see tokens, models or configs.

Sum convention (see alignkit/training/loop.py): the unit of these sequence-level losses is one
pair (one example for KTO), so `loss_sum` is the SUM over the batch of per-pair losses and every
metric is a detached SUM over the batch; the loop divides both by the global number of pairs in
the optimizer step. Filler rows (PAD_SLOT) must be dropped by the caller before calling.

Maths runs in float32 (float64 inputs stay float64, for gradcheck). Notation: sigma = sigmoid,
rho = policy_logps - reference_logps (the implicit reward before beta),
Delta = rho_chosen - rho_rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "simpo_loss", "orpo_loss", "kto_loss", "kto_reference_point"]

Tensor = torch.Tensor


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16/float32 -> float32; float64 stays float64 (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sigma(x) - eps log sigma(-x): the sigmoid loss against a label flipped with prob eps."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# --------------------------------------------------------------------------- DPO variants
# Each takes Delta (B,), beta, eps = label_smoothing and gt = eta * (r_c - r_r) (B,) or None,
# and returns the per-pair loss (B,).


def _dpo(delta: Tensor, beta: float, eps: float, gt: Tensor | None) -> Tensor:
    # DPO, Rafailov et al. 2023 eq. 7: -log sigma(beta Delta). With eps > 0 this is conservative
    # DPO (cDPO, Mitchell 2023): the preference label is assumed flipped with probability eps.
    return _smoothed_sigmoid(beta * delta, eps)


def _ipo(delta: Tensor, beta: float, eps: float, gt: Tensor | None) -> Tensor:
    # IPO, Azar et al. 2023 eq. 17: (h - 1/(2 tau))^2 with tau = beta. Delta is NOT scaled by beta.
    return (delta - 1 / (2 * beta)) ** 2


def _hinge(delta: Tensor, beta: float, eps: float, gt: Tensor | None) -> Tensor:
    # SLiC-style hinge (Zhao et al. 2023), as TRL's "hinge": relu(1 - beta Delta).
    return F.relu(1 - beta * delta)


def _robust(delta: Tensor, beta: float, eps: float, gt: Tensor | None) -> Tensor:
    # Robust DPO (rDPO), Chowdhury et al. 2024: an unbiased estimate of the clean-label DPO loss
    # under label-flip rate eps: [(1-eps) l(beta Delta) - eps l(-beta Delta)] / (1 - 2 eps),
    # with l(x) = -log sigma(x).
    logits = beta * delta
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def _rpo_sq(delta: Tensor, beta: float, eps: float, gt: Tensor) -> Tensor:
    # NeMo-Aligner rpo_sq: regress the implicit reward gap on the scaled ground-truth gap.
    return (beta * delta - gt) ** 2


def _bernoulli_kl(log_a: Tensor, log_1ma: Tensor, log_b: Tensor, log_1mb: Tensor) -> Tensor:
    """KL(Bern(a) || Bern(b)) from log-probabilities (log-sigmoid space keeps it finite)."""
    return log_a.exp() * (log_a - log_b) + log_1ma.exp() * (log_1ma - log_1mb)


def _rpo_bwd_kl(delta: Tensor, beta: float, eps: float, gt: Tensor) -> Tensor:
    # NeMo-Aligner rpo_bwd_kl: KL(q || p), q = sigma(gt) the ground-truth preference probability,
    # p = sigma(beta Delta) the model's (Bradley-Terry on implicit rewards).
    x = beta * delta
    return _bernoulli_kl(F.logsigmoid(gt), F.logsigmoid(-gt), F.logsigmoid(x), F.logsigmoid(-x))


def _rpo_fwd_kl(delta: Tensor, beta: float, eps: float, gt: Tensor) -> Tensor:
    # NeMo-Aligner rpo_fwd_kl: KL(p || q), same p and q as above.
    x = beta * delta
    return _bernoulli_kl(F.logsigmoid(x), F.logsigmoid(-x), F.logsigmoid(gt), F.logsigmoid(-gt))


_DPO_LOSSES = {
    "dpo": _dpo,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "rpo_sq": _rpo_sq,
    "rpo_bwd_kl": _rpo_bwd_kl,
    "rpo_fwd_kl": _rpo_fwd_kl,
}
_NEEDS_GT = ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")


# Implicit rewards closer than this are a tie. At step 0 the policy is the reference and every
# margin is 0 up to fp32 rounding (~1e-7 x |logp|, different with the batch's shapes), so a strict
# `>` would turn rounding noise into accuracy that differs between runs and process counts.
TIE_TOLERANCE = 1e-5


def _wins(gap: Tensor) -> Tensor:
    """(B,) 1 where gap > tolerance, 0.5 for a tie (|gap| <= tolerance), else 0."""
    return (gap > TIE_TOLERANCE).to(gap.dtype) + 0.5 * (gap.abs() <= TIE_TOLERANCE).to(gap.dtype)


def _pair_metrics(
    loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """The shared DPO-family metrics, each a detached sum over the batch."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracy": _wins(chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
    chosen_rewards_gt: Tensor | None = None,
    rejected_rewards_gt: Tensor | None = None,
    gt_reward_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed DPO-family loss over B preference pairs.

    With rho = policy - reference log-probs and Delta = rho_chosen - rho_rejected, eps =
    label_smoothing, g = gt_reward_scale * (chosen_rewards_gt - rejected_rewards_gt),
    p = sigma(beta Delta), q = sigma(g), the per-pair loss is::

        dpo         -(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta)   (eps>0: cDPO)
        ipo         (Delta - 1/(2 beta))^2
        hinge       relu(1 - beta Delta)
        robust      [-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps)
        rpo_sq      (beta Delta - g)^2
        rpo_bwd_kl  KL(q || p) = q log(q/p) + (1-q) log((1-q)/(1-p))
        rpo_fwd_kl  KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))

    Length convention: Delta is built from whatever log-probs are passed. TRL's "ipo" always
    divides each sequence log-prob by its token count; NeMo-Aligner and alignkit leave that to
    the caller, and alignkit's DPO recipe passes per-token-averaged log-probs when
    `average_logprobs` is on (for all loss types), summed log-probs otherwise. So IPO matches
    TRL's only with `average_logprobs` on; beta plays IPO's tau.

    Differences from peers: TRL >= 0.29 dropped label smoothing from "sigmoid"; here it stays
    (cDPO). NeMo-Aligner logs rewards without beta; here rewards are beta * rho, as in TRL.

    Args:
        policy_chosen_logps: (B,) log pi_theta(y_chosen | x), sum or mean over response tokens.
        policy_rejected_logps: (B,) log pi_theta(y_rejected | x), same reduction.
        reference_chosen_logps: (B,) log pi_ref(y_chosen | x); treated as constant (detached).
        reference_rejected_logps: (B,) log pi_ref(y_rejected | x); detached.
        beta: inverse strength of the KL regularisation (IPO's tau).
        loss_type: one of "dpo", "ipo", "hinge", "robust", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl".
        label_smoothing: eps, the assumed label-flip rate; only "dpo" (in [0, 0.5]) and "robust"
            (in [0, 0.5)) use it, any other type requires 0.
        chosen_rewards_gt: (B,) ground-truth reward of the chosen response; needed by rpo_*.
        rejected_rewards_gt: (B,) ground-truth reward of the rejected response; needed by rpo_*.
        gt_reward_scale: eta, multiplies the ground-truth reward gap (rpo_* only).

    Returns:
        loss_sum: float32 scalar, the sum over the B pairs of the per-pair loss.
        metrics: detached sums over the B pairs: "loss" (= loss_sum), "rewards/chosen"
            (beta * rho_chosen), "rewards/rejected" (beta * rho_rejected), "rewards/margin",
            "rewards/accuracy" (count of pairs with rewards/chosen > rewards/rejected; a tie,
            |margin| <= TIE_TOLERANCE, counts 0.5), "logps/chosen" and "logps/rejected" (policy log-probs).

    Raises:
        ValueError: unknown loss_type (the message lists the valid ones), rpo_* without
            ground-truth rewards, or label_smoothing outside the range its loss_type allows.

    Example: beta = 0.1, rho_chosen = 1, rho_rejected = -1 -> Delta = 2, and
    dpo = -log sigma(0.2) = 0.598139; ipo = (2 - 5)^2 = 9; hinge = relu(1 - 0.2) = 0.8.
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(_DPO_LOSSES)}")
    eps = label_smoothing
    if not {"dpo": 0 <= eps <= 0.5, "robust": 0 <= eps < 0.5}.get(loss_type, eps == 0):
        raise ValueError(
            f"label_smoothing={eps} is not allowed for loss_type {loss_type!r} "
            "(dpo: [0, 0.5], robust: [0, 0.5), other types: 0)"
        )
    gt = None
    if loss_type in _NEEDS_GT:
        if chosen_rewards_gt is None or rejected_rewards_gt is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_rewards_gt and rejected_rewards_gt")
        gt = gt_reward_scale * (_upcast(chosen_rewards_gt) - _upcast(rejected_rewards_gt)).detach()  # (B,)

    policy_chosen, policy_rejected = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
    chosen_rho = policy_chosen - _upcast(reference_chosen_logps).detach()  # (B,)
    rejected_rho = policy_rejected - _upcast(reference_rejected_logps).detach()  # (B,)
    losses = _DPO_LOSSES[loss_type](chosen_rho - rejected_rho, beta, eps, gt)  # (B,)
    loss_sum = losses.sum()
    return loss_sum, _pair_metrics(loss_sum, beta * chosen_rho, beta * rejected_rho, policy_chosen, policy_rejected)


# --------------------------------------------------------------------------- SimPO


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed SimPO loss over B pairs (Meng et al. 2024, eq. 6); reference-free.

    Per pair, with x = beta * (mean logp_chosen - mean logp_rejected) - gamma::

        -(1-eps) log sigma(x) - eps log sigma(-x)

    gamma is the paper's target reward margin gamma, in reward units (TRL's `simpo_gamma`). The
    SimPO repository's `gamma_beta_ratio` is gamma / beta; the defaults beta = 2.0, gamma = 1.0
    are its defaults (beta 2.0, ratio 0.5). (TRL's default simpo_gamma is 0.5 with beta 0.1.)

    Args:
        policy_chosen_logps: (B,) per-token MEAN log-prob of the chosen response (length-
            normalised, as eq. 6 requires; the caller averages).
        policy_rejected_logps: (B,) per-token mean log-prob of the rejected response.
        beta: reward scale.
        gamma: target reward margin.
        label_smoothing: eps in [0, 0.5]: the cDPO-style smoothing TRL's CPOTrainer applies.

    Returns:
        loss_sum: float32 scalar, sum over pairs.
        metrics: detached sums as in :func:`dpo_loss`, with rewards = beta * mean logp (there is
            no reference model), so rewards/accuracy counts pairs with mean logp_c > mean logp_r.

    Example: beta = 2, gamma = 1, mean logps -1 and -2 -> x = 2 * 1 - 1 = 1,
    loss = -log sigma(1) = 0.313262.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}; allowed: [0, 0.5]")
    chosen, rejected = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
    loss_sum = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing).sum()
    return loss_sum, _pair_metrics(loss_sum, beta * chosen, beta * rejected, chosen, rejected)


# --------------------------------------------------------------------------- ORPO

# log(1 - e^x) is -inf at x = 0 (a response with probability 1 has infinite odds); mean log-probs
# are clamped to at most this value so the odds ratio stays finite.
_MAX_MEAN_LOGP = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps_avg: Tensor,
    policy_rejected_logps_avg: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The summed odds-ratio term of ORPO (Hong et al. 2024, eq. 6-7); reference-free.

    With p = mean log-prob per token and odds(y) = P / (1 - P) for P = e^p (eq. 6)::

        log_odds_ratio = (p_c - log(1 - e^{p_c})) - (p_r - log(1 - e^{p_r}))
        per-pair loss  = -beta * log sigma(log_odds_ratio)          (lambda * L_OR, eq. 7)

    The caller adds the SFT term of eq. 6, the NLL of the chosen response, in the same per-pair
    unit: -policy_chosen_logps_avg summed over the pairs (the chosen response's per-token NLL).
    TRL instead takes that NLL as a token mean over the micro-batch (prompt included for
    decoder-only models) and averages the odds-ratio term over the micro-batch.

    Args:
        policy_chosen_logps_avg: (B,) per-token MEAN log-prob of the chosen response (< 0;
            clamped to <= -1e-6 so that log(1 - e^p) stays finite).
        policy_rejected_logps_avg: (B,) per-token mean log-prob of the rejected response.
        beta: lambda, the weight of the odds-ratio term.

    Returns:
        loss_sum: float32 scalar, sum over pairs of -beta * log sigma(log_odds_ratio) (no NLL).
        metrics: detached sums as in :func:`dpo_loss`, with rewards = beta * mean logp (no
            reference model), plus "log_odds_ratio" (sum of log_odds_ratio over pairs).

    Example: p_c = log 0.5 (odds 1), p_r = log 0.2 (odds 0.25) -> log_odds_ratio = log 4,
    loss = -0.1 * log sigma(log 4) = -0.1 * log 0.8 = 0.0223144.
    """
    chosen = _upcast(policy_chosen_logps_avg).clamp(max=_MAX_MEAN_LOGP)
    rejected = _upcast(policy_rejected_logps_avg).clamp(max=_MAX_MEAN_LOGP)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))  # (B,)
    loss_sum = -beta * F.logsigmoid(log_odds).sum()
    metrics = _pair_metrics(loss_sum, beta * chosen, beta * rejected, chosen, rejected)
    metrics["log_odds_ratio"] = log_odds.detach().sum()
    return loss_sum, metrics


# --------------------------------------------------------------------------- KTO


def kto_reference_point(policy_mismatched_logps: Tensor, reference_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z_0 = max(0, mean(rho)) over MISMATCHED (x_i, y_j) pairs; detached.

    The mismatched responses (e.g. each prompt paired with the next example's response) estimate
    KL(pi_theta || pi_ref) (Ethayarajh et al. 2024). Under data parallelism TRL and NeMo-Aligner
    average over the whole global batch: then all-reduce the mean of rho across ranks yourself
    and pass it to :func:`kto_loss`, which clamps and detaches again.

    Args:
        policy_mismatched_logps: (M,) log pi_theta(y_j | x_i), summed over response tokens.
        reference_mismatched_logps: (M,) log pi_ref(y_j | x_i).

    Returns:
        float32 scalar, clamp_min(mean(policy - reference), 0), detached.

    Example: rho = [1, -3] -> mean -1 -> z_0 = 0;  rho = [1, 3] -> z_0 = 2.
    """
    rho = _upcast(policy_mismatched_logps) - _upcast(reference_mismatched_logps)  # (M,)
    return rho.mean().clamp_min(0).detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl_reference_point: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed KTO loss over B unpaired examples (Ethayarajh et al. 2024, as in TRL and NeMo-Aligner).

    With rho = policy - reference log-probs and z = kl_reference_point::

        desirable    lambda_D * (1 - sigma(beta (rho - z)))
        undesirable  lambda_U * (1 - sigma(beta (z - rho)))

    TRL takes the mean over the micro-batch; here the unit is one example and the loop divides
    the sum by the global number of examples (the same value when micro-batches are equal).

    Args:
        policy_logps: (B,) log pi_theta(y | x), summed over response tokens.
        reference_logps: (B,) log pi_ref(y | x); detached.
        labels: (B,) bool, True for a desirable example.
        kl_reference_point: scalar z, from :func:`kto_reference_point`; detached and clamped at 0
            here as well, so a raw (all-reduced) mean may be passed.
        beta: temperature of the value function.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.

    Returns:
        loss_sum: float32 scalar, sum over the B examples.
        metrics: detached sums: "loss"; "rewards/chosen" and "logps/chosen" (beta * rho and policy
            log-prob summed over desirable examples), "rewards/rejected" and "logps/rejected" (over
            undesirable ones); "count/chosen" and "count/rejected" (how many of each, to turn those
            sums into means); "kl" (z * B, so that it reads z after division by the example count).

    Example: beta = 0.1, z = 1, desirable rho = 3 -> 1 - sigma(0.2) = 0.450166;
    undesirable rho = 3 -> 1 - sigma(-0.2) = 0.549834.
    """
    policy = _upcast(policy_logps)
    rho = policy - _upcast(reference_logps).detach()  # (B,)
    z = torch.as_tensor(kl_reference_point, dtype=rho.dtype, device=rho.device).detach().clamp_min(0)
    labels = labels.bool()
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - rho))),
    )  # (B,)
    loss_sum = losses.sum()
    rewards, policy = (beta * rho).detach(), policy.detach()
    metrics = {
        "loss": loss_sum.detach(),
        "rewards/chosen": rewards[labels].sum(),
        "rewards/rejected": rewards[~labels].sum(),
        "logps/chosen": policy[labels].sum(),
        "logps/rejected": policy[~labels].sum(),
        "count/chosen": labels.sum().to(rho.dtype),
        "count/rejected": (~labels).sum().to(rho.dtype),
        "kl": z * rho.numel(),
    }
    return loss_sum, metrics
