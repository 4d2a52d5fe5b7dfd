"""Forward passes that compute logits only where a loss needs them.

The output projection (hidden -> vocabulary) is often the most expensive layer of a small
model and the largest activation of any model (B x T x V). Prompt and padding tokens carry
no loss, so `logits_at` runs the projection only on the selected positions: a forward
pre-hook on the output embedding replaces its input (B, T, d) by the selected rows (1, N, d).
The hook lives inside the model's own forward, so it works unchanged under DDP, FSDP2
(whose parameter gathering happens around the module call) and PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.models.loading import unwrap

__all__ = ["logits_at"]


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
