"""Reward-model losses: Bradley-Terry ranking (plain, margin, scaled) and SteerLM attribute regression.

Bradley-Terry (Bradley and Terry 1952; Ouyang et al. 2022 eq. 1) trains a scalar reward r(x, y) so
that sigma(r_chosen - r_rejected) is the probability that the chosen response is preferred. The
margin and scaled variants are NeMo-Aligner's HelpSteer2-Preference losses (Wang et al. 2024):
`margin_bt` is -log sigma(r_c - r_r - |l|), `scaled_bt` is |l| * -log sigma(r_c - r_r), with l the
annotated preference strength; the caller turns l into `margin` or `scale`. The regression loss
is SteerLM's attribute model (Dong et al. 2023): masked MSE over the attributes a sample has.

Sum convention (see alignkit/training/loop.py): losses and metrics are SUMS; the loop divides by
the global number of units, which is one pair for Bradley-Terry and one present (sample,
attribute) entry for regression. Maths runs in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "regression_loss", "soft_bradley_terry_loss"]

Tensor = torch.Tensor


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16/float32 -> float32; float64 stays float64 (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    scale: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed Bradley-Terry loss over B pairs, with optional margin and per-pair scale.

    Per pair::

        scale * -log sigma(r_c - r_r - margin)

    margin = scale = None is NeMo-Aligner's `regular_bt` (and TRL's RewardTrainer loss);
    margin = |l| is `margin_bt` (TRL's `margin` column); scale = |l| is `scaled_bt`.

    Args:
        chosen_rewards: (B,) reward of the preferred response.
        rejected_rewards: (B,) reward of the other response.
        margin: (B,) or scalar m the reward gap must exceed; treated as data (detached).
        scale: (B,) or scalar per-pair weight, e.g. preference strength; detached.

    Returns:
        loss_sum: float32 scalar, the sum over the B pairs.
        metrics: detached sums over the pairs: "loss", "accuracy" (pairs with r_c > r_r, margin
            ignored, ties count 0), "rewards/chosen", "rewards/rejected", "rewards/margin"
            (r_c - r_r).

    Example: r_c = 1, r_r = 0 -> -log sigma(1) = 0.313262; with margin 1 -> log 2 = 0.693147;
    with scale 2 -> 0.626523.
    """
    chosen, rejected = _upcast(chosen_rewards), _upcast(rejected_rewards)
    gap = chosen - rejected  # (B,)
    logits = gap if margin is None else gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device).detach()
    losses = -F.logsigmoid(logits)  # (B,)
    if scale is not None:
        losses = losses * torch.as_tensor(scale, dtype=gap.dtype, device=gap.device).detach()
    loss_sum = losses.sum()
    gap = gap.detach()
    metrics = {
        "loss": loss_sum.detach(),
        "accuracy": (gap > 0).to(gap.dtype).sum(),
        "rewards/chosen": chosen.detach().sum(),
        "rewards/rejected": rejected.detach().sum(),
        "rewards/margin": gap.sum(),
    }
    return loss_sum, metrics


def soft_bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, target: Tensor | float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed Bradley-Terry loss with soft targets over B pairs (Constitutional AI's preference
    model, Bai et al. 2022 section 4.1: the feedback model's normalised probability of each option
    is the label, not a 0/1 choice).

    Per pair, with d = r_c - r_r and p the probability that the first response is preferred::

        -[p log sigma(d) + (1 - p) log sigma(-d)]

    the cross-entropy of sigma(d) against p: p = 1 is the plain Bradley-Terry loss, p = 0.5 pulls
    d towards 0, and the minimum over d is at sigma(d) = p (d = log(p / (1 - p))), so a confident
    label moves the reward gap further than a hesitant one. The same function trains a DPO policy
    on soft labels when d is DPO's implicit reward gap beta * (log-ratio_c - log-ratio_r): cDPO's
    label smoothing with a per-pair epsilon = 1 - p.

    Args:
        chosen_rewards: (B,) reward of the first response of each pair.
        rejected_rewards: (B,) reward of the second.
        target: (B,) or scalar p in [0, 1]; treated as data (detached).

    Returns:
        loss_sum: float32 scalar, the sum over the B pairs.
        metrics: detached sums: "loss", "accuracy" (pairs where sign(d) agrees with p > 0.5; p = 0.5
            counts 0), "rewards/chosen", "rewards/rejected", "rewards/margin" (d).

    Example: d = 1, p = 0.75 -> 0.75 * 0.313262 + 0.25 * 1.313262 = 0.563262; p = 1 -> 0.313262
    (bradley_terry_loss); d = 0 -> log 2 = 0.693147 whatever p.
    """
    chosen, rejected = _upcast(chosen_rewards), _upcast(rejected_rewards)
    gap = chosen - rejected  # (B,)
    p = torch.as_tensor(target, dtype=gap.dtype, device=gap.device).detach().expand_as(gap)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"soft targets must lie in [0, 1], got min {float(p.min())}, max {float(p.max())}")
    losses = -(p * F.logsigmoid(gap) + (1 - p) * F.logsigmoid(-gap))  # (B,)
    loss_sum = losses.sum()
    gap = gap.detach()
    agree = ((gap > 0) & (p > 0.5)) | ((gap < 0) & (p < 0.5))
    metrics = {
        "loss": loss_sum.detach(),
        "accuracy": agree.to(gap.dtype).sum(),
        "rewards/chosen": chosen.detach().sum(),
        "rewards/rejected": rejected.detach().sum(),
        "rewards/margin": gap.sum(),
    }
    return loss_sum, metrics


def regression_loss(predicted: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed squared error over the present attributes (SteerLM attribute regression).

    NeMo-Aligner's loss is sum_j m_j (a_hat_j - a_j)^2 / sum_j m_j over the micro-batch; here the
    numerator is returned and the unit count is the number of present entries, `mask.sum()`,
    which the recipe counts into its batch's `num_units` so the loop divides by the global count.
    Masked entries (missing attributes, stored as -1 or -100 in the data) contribute exactly 0 to
    the loss and its gradient, whatever their target value (even NaN).

    Args:
        predicted: (B, A) attribute predictions of the reward head.
        targets: (B, A) attribute labels; any value where mask is False.
        mask: (B, A) bool, True where the attribute is present.

    Returns:
        loss_sum: float32 scalar, sum of (predicted - targets)^2 over present entries.
        metrics: detached sums: "loss"; "mse/<i>", the squared-error sum of attribute column i,
            and "count/<i>", its number of present entries (attribute i's MSE is their ratio;
            the recipe maps indices to attribute names).

    Example: predicted [[1, 5]], targets [[3, -100]], mask [[True, False]] -> (1 - 3)^2 = 4,
    metrics mse/0 = 4, count/0 = 1, mse/1 = 0, count/1 = 0.
    """
    if not predicted.shape == targets.shape == mask.shape or predicted.dim() != 2:
        raise ValueError(
            f"predicted, targets and mask must all be (B, A), got {tuple(predicted.shape)}, "
            f"{tuple(targets.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.bool()
    pred = _upcast(predicted)
    # where (not multiply): a NaN or inf target in a masked slot must not leak into loss or grads.
    err = torch.where(mask, pred - _upcast(targets).to(pred.dtype), torch.zeros((), dtype=pred.dtype)) ** 2
    loss_sum = err.sum()
    per_attr, counts = err.detach().sum(0), mask.sum(0).to(pred.dtype)  # (A,)
    metrics = {"loss": loss_sum.detach()}
    for i in range(err.shape[1]):
        metrics[f"mse/{i}"] = per_attr[i]
        metrics[f"count/{i}"] = counts[i]
    return loss_sum, metrics
