"""DRaFT+'s objective for reward fine-tuning of diffusion models (see `alignkit.recipes.draftp`).

DRaFT backpropagates a differentiable reward R(image, prompt) through the last K sampling steps;
DRaFT+ adds a regulariser that keeps the fine-tuned noise predictions near the initial model's at
those steps:

    reg = mean over the K graph steps of  mean over elements of (eps_theta - eps_init)^2
        = mean_K ||eps_theta - eps_init||^2 / D          (D = elements of one prediction batch)
    L   = -mean R + kl_coeff * reg                       (kl_coeff 0: plain DRaFT)

Like the other losses here, `draftp_loss` returns a SUM over the micro-batch's images (the
regulariser weighted by the number of images), so the recipe divides by the global batch and
micro-batching or processes do not change the update.
"""

from __future__ import annotations

import torch

__all__ = ["draftp_loss", "noise_regularizer"]


def noise_regularizer(eps_theta: list[torch.Tensor], eps_init: list[torch.Tensor]) -> torch.Tensor:
    """() the "+" term from the K graph steps' guided noise predictions, each (B, C, h, w); eps_init
    carries no graph. No steps -> 0.

    Example: one step, eps_theta [[1, 3]], eps_init [[0, 0]] -> (1 + 9) / 2 = 5."""
    if not eps_theta:
        return torch.zeros(())
    penalties = [(a.float() - b.float()).pow(2).mean() for a, b in zip(eps_theta, eps_init, strict=True)]
    return torch.stack(penalties).mean()


def draftp_loss(
    rewards: torch.Tensor, regularizer: torch.Tensor, kl_coeff: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DRaFT+ loss of a micro-batch.

    Args:
        rewards: (B,) differentiable rewards of the B images.
        regularizer: () `noise_regularizer` of the batch (one value for its B images).
        kl_coeff: the regulariser's weight.

    Returns:
        loss_sum: () -sum R + kl_coeff * reg * B (divide by the global batch for the mean loss).
        metrics: sums over the B images of "reward", "regularizer" and "loss" (detached).

    Example: rewards [0.5, 1.0], reg 0.2, kl_coeff 0.5 -> -1.5 + 0.5 * 0.2 * 2 = -1.3."""
    n = rewards.shape[0]
    loss_sum = -rewards.float().sum() + kl_coeff * regularizer.float() * n
    metrics = {
        "reward": rewards.detach().float().sum(),
        "regularizer": regularizer.detach().float() * n,
        "loss": loss_sum.detach(),
    }
    return loss_sum, metrics
