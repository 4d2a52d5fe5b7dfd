"""The supervised fine-tuning loss: next-token cross-entropy on response tokens.

Gradient accumulation and data parallelism are normalised by token count: the loss returned
here is a SUM over target tokens, and the training loop divides by the number of target
tokens in the whole global batch (all micro-batches, all ranks). So micro-batch 8 x
accumulation 1 and micro-batch 2 x accumulation 4 make the same update, and every token of
the global batch weighs the same (NeMo-Aligner averages per micro-batch instead, which
over-weights tokens of short micro-batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sft_loss"]


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy.

    Args:
        logits: (N, V) logits at the N target positions.
        targets: (N,) token ids those positions must predict.

    Returns:
        loss_sum: scalar, sum over the N positions of -log p(target), in float32.
        metrics: {"loss": loss_sum detached} (a sum; the loop divides by the global token count).

    Example: V=2, logits [[0, 0]], target [1] -> loss_sum = log 2 = 0.6931.
    """
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, {"loss": loss_sum.detach()}
