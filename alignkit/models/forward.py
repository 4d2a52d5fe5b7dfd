"""Forward passes that compute logits only where a loss needs them.

The output projection (hidden -> vocabulary) is often the most expensive layer of a small
model and the largest activation of any model (B x T x V). Prompt and padding tokens carry
no loss, so `logits_at` runs the projection only on the selected positions: a forward
pre-hook on the output embedding replaces its input (B, T, d) by the selected rows (1, N, d).
The hook lives inside the model's own forward, so it works unchanged under DDP, FSDP2
(whose parameter gathering happens around the module call) and PEFT.

On those logits: `sequence_logps` sums each sequence's target log-probabilities (the preference
and SteerLM 2.0 recipes), and `sft_token_loss` is the next-token loss of SFT and every recipe
that fine-tunes on demonstrations (rejection sampling, SteerLM).
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.data.tokenize import IGNORE
from alignkit.losses.sft import sft_loss
from alignkit.models.loading import unwrap

__all__ = ["logits_at", "sequence_logps", "sft_token_loss"]


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    select: torch.Tensor,
) -> torch.Tensor:
    """Logits at the positions where `select` is true.

    Args:
        input_ids: (B, T) token ids; rows may hold several packed sequences.
        position_ids: (B, T) positions restarting at 0 at each packed sequence.
        select: (B, T) bool; which positions' logits to compute.

    Returns:
        (N, V) logits, N = select.sum(), in row-major order of `select`.
    """
    flat_index = select.reshape(-1).nonzero().squeeze(-1)  # (N,)

    def keep_selected(_module, args):
        hidden = args[0]  # (B, T, d)
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index).unsqueeze(0), *args[1:])

    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(keep_selected)
    try:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return out.logits.squeeze(0)  # (N, V)


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, seq_index: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Summed log-probabilities per sequence from the logits at its target positions.

    Args:
        logits: (N, V) logits at the target positions (`logits_at` with `target_ids != IGNORE`).
        targets: (N,) the target token at each of those positions.
        seq_index: (N,) which sequence each position belongs to.
        num_sequences: S, the number of sequences.

    Returns:
        (S,) float32: sum over each sequence's targets of log p(target).
    """
    token_logps = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    out = torch.zeros(num_sequences, dtype=token_logps.dtype, device=logits.device)
    return out.index_add_(0, seq_index, token_logps)


def sft_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT's loss on a micro-batch (`collate_rows`): -log p of each target token, logits computed
    at the target positions only. Returns `sft_loss`'s (summed loss, metric sums)."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select)  # (N, V)
    return sft_loss(logits, batch["target_ids"][select])
