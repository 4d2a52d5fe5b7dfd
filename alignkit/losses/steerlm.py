"""SteerLM 2.0's importance-weighted objective (Wang et al. 2024, "HelpSteer2 / SteerLM 2.0";
NeMo-Aligner's `gpt_steerlm_model.py`).

SteerLM 2.0 fits Q_theta(y | a, x) to the ideal P(y | a, x) ∝ P(a | x, y) P(y | x) by minimising
KL(P || Q_theta) with samples y_1..y_n drawn from the initial SteerLM model Q'. Per prompt (with
target attributes a) and its n samples:

    w'_i = softmax_i( log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x) )    importance weights of P
    b'_i = softmax_i( log Q_theta(y_i|a,x) - log Q'(y_i|a,x) )              the same for Q_theta (baseline)
    L    = sum_i (w'_i - b'_i) * NLL_theta(y_i) / mean_i(tokens of y_i)

so the gradient is -sum_i (w'_i - b'_i) grad log Q_theta(y_i) / n_tok: samples that P favours more than
Q_theta does are pushed up, the others down, and it vanishes when Q_theta = P on the samples. Both
weight vectors are constants (no gradient); b' uses the current policy, recomputed each step.
Logged `distance` = sum_i w'_i log(w'_i / b'_i), the KL between the two weightings.

Sum convention (alignkit/training/loop.py): the unit is one prompt group; the loss and metrics are
sums over groups, divided by the loop by the number of groups in the optimizer step.
"""

from __future__ import annotations

import torch

__all__ = ["attribute_log_likelihood", "steerlm2_loss"]

Tensor = torch.Tensor


def steerlm2_loss(
    policy_logps: Tensor, initial_logps: Tensor, attribute_logps: Tensor, prior_logps: Tensor, response_tokens: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """SteerLM 2.0's loss over G prompt groups of n sampled responses each.

    Args:
        policy_logps: (G, n) log Q_theta(y_i | a, x), summed over the response tokens (with grad).
        initial_logps: (G, n) log Q'(y_i | a, x) of the model that sampled the responses.
        attribute_logps: (G, n) log P(a | x, y_i), the attribute model's likelihood of the targets.
        prior_logps: (G, n) log P(y_i | x), the (unconditioned) SFT model's.
        response_tokens: (G, n) tokens per response.

    Returns:
        loss_sum: float32 scalar, the sum over groups.
        metrics: detached sums over groups: "loss", "distance", "weights/max" (the largest w'_i,
            how peaked the importance weights are).

    Example (one group, n = 2): log P(a) + log P(y) - log Q' = [0, log 3] -> w' = [1/4, 3/4];
    log Q_theta = log Q' -> b' = [1/2, 1/2]; NLL = [2, 4], tokens [1, 3] (mean 2) ->
    L = (-1/4 * 2 + 1/4 * 4) / 2 = 0.25; distance = 1/4 log(1/2) + 3/4 log(3/2) = 0.130812;
    dL/d log Q_theta = -(w' - b') / 2 = [1/8, -1/8].
    """
    policy = policy_logps if policy_logps.dtype == torch.float64 else policy_logps.float()
    initial = initial_logps.to(policy.dtype)
    with torch.no_grad():
        log_w = torch.log_softmax(attribute_logps.to(policy.dtype) + prior_logps.to(policy.dtype) - initial, dim=-1)
        log_b = torch.log_softmax(policy.detach() - initial, dim=-1)
        weights = log_w.exp() - log_b.exp()  # (G, n)
        mean_tokens = response_tokens.to(policy.dtype).mean(-1).clamp_min(1)  # (G,)
    loss_per_group = (weights * -policy).sum(-1) / mean_tokens  # (G,)
    loss_sum = loss_per_group.sum()
    distance = (log_w.exp() * (log_w - log_b)).sum(-1)  # (G,)
    metrics = {"loss": loss_sum.detach(), "distance": distance.sum(), "weights/max": log_w.exp().max(-1).values.sum()}
    return loss_sum, metrics


def attribute_log_likelihood(predicted: Tensor, targets: Tensor, sigma: float) -> Tensor:
    """log P(a | x, y) of target levels under a regression attribute model, the likelihood
    SteerLM 2.0 needs from a model that predicts a number per attribute, not a distribution.

    Each attribute's level is modelled as a discretised Gaussian around the prediction,
    normalised over the levels 0..4, attributes independent:

        P(a_j = l | x, y) = exp(-(l - m_j)^2 / (2 sigma^2)) / sum_{k=0..4} exp(-(k - m_j)^2 / (2 sigma^2))

    where m_j is the predicted score. sigma is how much the model is trusted (about its
    validation RMSE); a smaller sigma makes the importance weights sharper.

    Args:
        predicted: (N, A) predicted attribute scores m.
        targets: (N, A) integer target levels 0..4.
        sigma: > 0.

    Returns:
        (N,) sum over attributes of log P(a_j | x, y).

    Example: m = 2, l = 2, sigma = 1: exp(-(k-2)^2/2) over k=0..4 is [e^-2, e^-.5, 1, e^-.5, e^-2],
    sum 2.483732 -> log P = -log 2.483732 = -0.909763.
    """
    levels = torch.arange(5, dtype=torch.float32, device=predicted.device)  # (5,)
    logits = -((levels - predicted.float().unsqueeze(-1)) ** 2) / (2 * sigma**2)  # (N, A, 5)
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).sum(-1)  # (N,)
