"""Losses for SFT with knowledge distillation from a teacher's stored top-K logits.

The method is knowledge distillation (Hinton et al., 2015, "Distilling the
Knowledge in a Neural Network") restricted to the teacher's K largest logits, as
in NeMo-Aligner's ``_TopKLogitsCrossEntropy``: the teacher's top-K logits and
their vocabulary ids are precomputed and stored once, and at training time both
the teacher and the student distributions are renormalised over those same K
ids before taking the KL divergence. Convention: every function here takes
already-flattened target positions (``N`` = number of positions that carry loss,
``V`` = vocabulary size, ``K`` = number of stored teacher logits), computes in
float32 whatever the input dtype, and returns per-position values of shape
``(N,)``; :func:`distill_loss` returns SUMS over positions, and the caller divides
by the global number of target tokens so that gradient accumulation is
normalised by token count rather than by micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["topk_kd_loss", "token_cross_entropy", "distill_loss"]

_KL_KINDS = ("forward", "reverse")


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    kl: str = "forward",
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
) -> torch.Tensor:
    """Per-position KL divergence between teacher and student over the teacher's top-K ids.

    Both distributions are renormalised over the teacher's K ids::

        p_T = softmax_K(teacher_scale * z_T)
        p_S = softmax_K(student_scale * z_S[ids])
        forward KL = sum_k p_T * (log p_T - log p_S)   # KL(p_T || p_S), mean-seeking
        reverse KL = sum_k p_S * (log p_S - log p_T)   # KL(p_S || p_T), mode-seeking

    The scales are inverse temperatures (``scale = 1 / T``). No ``T**2`` factor
    is applied; multiply the result yourself if you want Hinton's gradient
    rescaling.

    Args:
        student_logits: ``(N, V)`` float, the student's full-vocabulary logits at
            the N target positions (already flattened; only positions that carry
            loss). Any float dtype; upcast to float32 internally.
        teacher_topk_logits: ``(N, K)`` float, the teacher's K largest logits at
            each position, sorted in descending order. Treated as data (detached).
        teacher_topk_ids: ``(N, K)`` long, the vocabulary ids of those logits.
        kl: ``"forward"`` or ``"reverse"``.
        student_scale: multiplies the student logits before the softmax.
        teacher_scale: multiplies the teacher logits before the softmax.

    Returns:
        ``(N,)`` float32 tensor of per-position KL values, differentiable with
        respect to ``student_logits`` only. The gradient is exactly zero on
        vocabulary entries outside the teacher's top-K.

    Raises:
        ValueError: for an unknown ``kl``, mismatched shapes, non-long ids or
            ``K > V``.

    Example:
        K = 2, teacher logits ``[0, 0]`` -> ``p_T = [0.5, 0.5]``; student logits
        at those ids ``[ln 1, ln 3]`` -> ``p_S = [0.25, 0.75]``::

            forward KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) ~= 0.14384

        >>> import math, torch
        >>> s = torch.tensor([[0.0, math.log(3.0), 7.0]])  # V = 3; id 2 is ignored
        >>> t = torch.tensor([[0.0, 0.0]])
        >>> ids = torch.tensor([[0, 1]])
        >>> round(topk_kd_loss(s, t, ids).item(), 5)
        0.14384
    """
    if kl not in _KL_KINDS:
        raise ValueError(f"kl must be one of {_KL_KINDS}, got {kl!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(student_logits.shape)}")
    if teacher_topk_logits.dim() != 2 or teacher_topk_logits.shape != teacher_topk_ids.shape:
        raise ValueError(
            "teacher_topk_logits and teacher_topk_ids must both be (N, K) with the same shape, "
            f"got {tuple(teacher_topk_logits.shape)} and {tuple(teacher_topk_ids.shape)}"
        )
    n, vocab = student_logits.shape
    if teacher_topk_ids.shape[0] != n:
        raise ValueError(
            f"student_logits has N={n} positions but the teacher tensors have N={teacher_topk_ids.shape[0]}"
        )
    k = teacher_topk_ids.shape[1]
    if k > vocab:
        raise ValueError(f"K={k} teacher logits exceeds the student vocabulary size V={vocab}")
    if teacher_topk_ids.dtype != torch.long:
        # torch.gather requires int64 indices; fail here with a readable message.
        raise ValueError(f"teacher_topk_ids must be torch.long, got {teacher_topk_ids.dtype}")

    # Gather the student's logits at the teacher's ids: (N, V) -> (N, K). The
    # backward of gather scatters into zeros, so non-top-K entries get zero grad.
    student_k = torch.gather(student_logits.float(), 1, teacher_topk_ids)
    # log_softmax over the K ids (last dim) renormalises each distribution to the
    # top-K support without forming exp() of unbounded logits.
    log_p_s = F.log_softmax(student_scale * student_k, dim=-1)  # (N, K)
    log_p_t = F.log_softmax(teacher_scale * teacher_topk_logits.detach().float(), dim=-1)  # (N, K)

    if kl == "forward":
        per_k = log_p_t.exp() * (log_p_t - log_p_s)
    else:
        per_k = log_p_s.exp() * (log_p_s - log_p_t)
    return per_k.sum(dim=-1)  # (N,)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy over the full vocabulary, computed in float32.

    Args:
        logits: ``(N, V)`` float logits at the N target positions.
        targets: ``(N,)`` long target ids in ``[0, V)``. (PyTorch's
            ``ignore_index=-100`` applies: such a target yields 0, but callers are
            expected to pass only positions that carry loss.)

    Returns:
        ``(N,)`` float32 tensor, ``-log softmax(logits)[n, targets[n]]``.

    Raises:
        ValueError: if the shapes are not ``(N, V)`` and ``(N,)``.
    """
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits.float(), targets, reduction="none")


def distill_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    kd_weight: float = 1.0,
    sft_weight: float = 0.0,
    kl: str = "forward",
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed SFT + top-K distillation loss over N target positions.

    Per position: ``kd_weight * KD + sft_weight * CE``, where KD is
    :func:`topk_kd_loss` and CE is :func:`token_cross_entropy` (the
    unscaled student logits against the ground-truth targets).

    Sum convention: everything returned is a SUM over the N positions, not a
    mean. The caller divides ``loss_sum`` (and the metrics, for logging) by the
    global number of target tokens in the optimizer step, so that gradient
    accumulation over micro-batches of different lengths is normalised by token
    count.

    Args:
        student_logits: ``(N, V)`` float student logits at the target positions.
        targets: ``(N,)`` long ground-truth token ids.
        teacher_topk_logits: ``(N, K)`` float teacher top-K logits (descending).
        teacher_topk_ids: ``(N, K)`` long vocabulary ids of those logits.
        kd_weight: weight of the distillation term.
        sft_weight: weight of the cross-entropy term.
        kl: ``"forward"`` or ``"reverse"``, see :func:`topk_kd_loss`.
        student_scale: inverse temperature of the student in the KD term.
        teacher_scale: inverse temperature of the teacher in the KD term.

    Returns:
        ``(loss_sum, metrics)``: ``loss_sum`` is a float32 scalar, differentiable
        w.r.t. ``student_logits``; ``metrics`` holds detached float32 scalars
        ``"kd_loss"`` (sum of the unweighted KD over positions) and
        ``"sft_loss"`` (sum of the unweighted CE over positions).
    """
    kd = topk_kd_loss(
        student_logits,
        teacher_topk_logits,
        teacher_topk_ids,
        kl=kl,
        student_scale=student_scale,
        teacher_scale=teacher_scale,
    )  # (N,)
    ce = token_cross_entropy(student_logits, targets)  # (N,)
    loss_sum = (kd_weight * kd + sft_weight * ce).sum()
    metrics = {"kd_loss": kd.detach().sum(), "sft_loss": ce.detach().sum()}
    return loss_sum, metrics
