"""Unit tests for alignkit.losses.distill (top-K knowledge distillation losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses.distill import distill_loss, token_cross_entropy, topk_kd_loss

N, V, K = 7, 50, 5
SCALES = [(1.0, 1.0), (0.5, 2.0), (2.0, 0.7), (1.3, 1.3)]


def _make_batch(seed: int, n: int = N, v: int = V, k: int = K):
    """Random student logits and a teacher's sorted top-K taken from its full logits."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 2.0
    teacher_full = torch.randn(n, v, generator=g) * 2.0
    t_logits, t_ids = torch.topk(teacher_full, k, dim=-1)  # sorted descending
    targets = torch.randint(0, v, (n,), generator=g)
    return student, t_logits, t_ids, targets


def _naive_kd(student, t_logits, t_ids, kl, s_scale, t_scale):
    """Reference in float64: full-vocabulary distributions with non-top-K set to -inf.

    Normalised with plain exp / sum (no log_softmax), KL summed with explicit
    loops over positions and vocabulary entries, skipping zero-probability ones.
    """
    student = student.double()
    n, v = student.shape
    mask = torch.zeros(n, v, dtype=torch.bool)
    mask.scatter_(1, t_ids, True)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    teacher_full = torch.full((n, v), float("-inf"), dtype=torch.float64)
    teacher_full.scatter_(1, t_ids, t_logits.double())
    s_masked = torch.where(mask, s_scale * student, neg_inf)
    t_masked = torch.where(mask, t_scale * teacher_full, neg_inf)
    p_s = torch.exp(s_masked) / torch.exp(s_masked).sum(dim=1, keepdim=True)
    p_t = torch.exp(t_masked) / torch.exp(t_masked).sum(dim=1, keepdim=True)
    out = []
    for i in range(n):
        total = torch.zeros((), dtype=torch.float64)
        for j in range(v):
            if not mask[i, j]:
                continue
            if kl == "forward":
                total = total + p_t[i, j] * torch.log(p_t[i, j] / p_s[i, j])
            else:
                total = total + p_s[i, j] * torch.log(p_s[i, j] / p_t[i, j])
        out.append(total)
    return torch.stack(out)


# ---------------------------------------------------------------- hand-computed


def _hand_example():
    # N=1, V=3, K=2. The student's id-2 logit is large but outside the top-K,
    # so it must not influence the result.
    student = torch.tensor([[math.log(1.0), math.log(3.0), 9.0]])
    t_logits = torch.tensor([[0.0, 0.0]])
    t_ids = torch.tensor([[0, 1]])
    return student, t_logits, t_ids


def test_hand_computed_forward_kl():
    student, t_logits, t_ids = _hand_example()
    # p_T = [0.5, 0.5], p_S = [0.25, 0.75]
    # forward = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3)
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert expected == pytest.approx(0.14384103622589045, abs=1e-12)
    out = topk_kd_loss(student, t_logits, t_ids, kl="forward")
    assert out.shape == (1,)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_reverse_kl():
    student, t_logits, t_ids = _hand_example()
    # reverse = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.25 ln 2 + 0.75 ln 1.5
    #         = -0.1732868 + 0.3040988 = 0.1308120
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert expected == pytest.approx(0.130812035, abs=1e-8)
    out = topk_kd_loss(student, t_logits, t_ids, kl="reverse")
    assert out.item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- naive reference


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("seed,s_scale,t_scale", [(i, *sc) for i, sc in enumerate(SCALES)])
def test_matches_naive_reference_values_and_grads(kl, seed, s_scale, t_scale):
    student, t_logits, t_ids, _ = _make_batch(seed=seed)
    # Random upstream weights so that per-position gradients are checked, not just
    # the gradient of an unweighted sum.
    w = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5

    s32 = student.clone().requires_grad_(True)
    out = topk_kd_loss(s32, t_logits, t_ids, kl=kl, student_scale=s_scale, teacher_scale=t_scale)
    (grad,) = torch.autograd.grad((out * w).sum(), s32)

    s64 = student.double().requires_grad_(True)
    ref = _naive_kd(s64, t_logits, t_ids, kl, s_scale, t_scale)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), s64)

    assert out.shape == (N,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=0)

    # Gradient is exactly zero outside the teacher's top-K ids.
    outside = torch.ones(N, V, dtype=torch.bool)
    outside.scatter_(1, t_ids, False)
    assert torch.all(grad[outside] == 0)
    assert torch.any(grad[~outside] != 0)


def test_teacher_tensors_get_no_gradient():
    student, t_logits, t_ids, _ = _make_batch(seed=3)
    t_logits = t_logits.clone().requires_grad_(True)
    s = student.clone().requires_grad_(True)
    out = topk_kd_loss(s, t_logits, t_ids)
    out.sum().backward()
    assert s.grad is not None
    assert t_logits.grad is None


# ---------------------------------------------------------------- zero / positive


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_zero_when_student_matches_teacher(kl, scale):
    student, t_logits, t_ids, _ = _make_batch(seed=11)
    # Copy the teacher's logits into the student at the top-K ids; plus a per-row
    # shift, to which a softmax is invariant. Non-top-K entries stay random.
    shift = torch.randn(N, 1)
    matched = student.scatter(1, t_ids, t_logits + shift)
    out = topk_kd_loss(matched, t_logits, t_ids, kl=kl, student_scale=scale, teacher_scale=scale)
    torch.testing.assert_close(out, torch.zeros(N), atol=1e-6, rtol=0)

    mismatched = topk_kd_loss(student, t_logits, t_ids, kl=kl, student_scale=scale, teacher_scale=scale)
    assert torch.all(mismatched > 1e-4)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_bf16_inputs_give_float32_outputs(kl):
    student, t_logits, t_ids, targets = _make_batch(seed=5)
    s_bf = student.bfloat16().requires_grad_(True)
    t_bf = t_logits.bfloat16()

    out = topk_kd_loss(s_bf, t_bf, t_ids, kl=kl)
    assert out.dtype == torch.float32
    # Loose: against fp32 on the un-rounded inputs (bf16 rounding of the inputs).
    fp32 = topk_kd_loss(student, t_logits, t_ids, kl=kl)
    torch.testing.assert_close(out, fp32, atol=3e-2, rtol=3e-2)
    # Tight: against fp32 on the bf16-rounded inputs, i.e. the maths runs in fp32.
    upcast = topk_kd_loss(s_bf.detach().float(), t_bf.float(), t_ids, kl=kl)
    torch.testing.assert_close(out, upcast, atol=1e-6, rtol=0)

    (grad,) = torch.autograd.grad(out.sum(), s_bf)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()

    ce = token_cross_entropy(s_bf, targets)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, F.cross_entropy(s_bf.detach().float(), targets, reduction="none"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- distill_loss


def test_token_cross_entropy_matches_torch():
    student, _, _, targets = _make_batch(seed=8)
    out = token_cross_entropy(student, targets)
    assert out.shape == (N,) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(student, targets, reduction="none"))


def test_distill_loss_pure_sft_equals_summed_cross_entropy():
    student, t_logits, t_ids, targets = _make_batch(seed=21)
    loss_sum, _ = distill_loss(student, targets, t_logits, t_ids, kd_weight=0.0, sft_weight=1.0)
    expected = F.cross_entropy(student, targets, reduction="sum")
    assert loss_sum.shape == ()
    torch.testing.assert_close(loss_sum, expected)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_distill_loss_weighted_sum_and_metrics(kl):
    student, t_logits, t_ids, targets = _make_batch(seed=22)
    kd_w, sft_w, s_scale, t_scale = 0.3, 0.7, 1.5, 0.8
    s = student.clone().requires_grad_(True)
    loss_sum, metrics = distill_loss(
        s,
        targets,
        t_logits,
        t_ids,
        kd_weight=kd_w,
        sft_weight=sft_w,
        kl=kl,
        student_scale=s_scale,
        teacher_scale=t_scale,
    )
    kd = topk_kd_loss(student, t_logits, t_ids, kl=kl, student_scale=s_scale, teacher_scale=t_scale)
    ce = F.cross_entropy(student, targets, reduction="none")

    torch.testing.assert_close(loss_sum, kd_w * kd.sum() + sft_w * ce.sum())
    assert loss_sum.requires_grad

    assert set(metrics) == {"kd_loss", "sft_loss"}
    for value in metrics.values():
        assert value.shape == () and not value.requires_grad
    # Metrics are unweighted sums over positions, not means.
    torch.testing.assert_close(metrics["kd_loss"], kd.sum())
    torch.testing.assert_close(metrics["sft_loss"], ce.sum())

    # The gradient of the summed loss is the weighted sum of the parts' gradients.
    (grad,) = torch.autograd.grad(loss_sum, s)
    s_kd = student.clone().requires_grad_(True)
    (g_kd,) = torch.autograd.grad(
        topk_kd_loss(s_kd, t_logits, t_ids, kl=kl, student_scale=s_scale, teacher_scale=t_scale).sum(),
        s_kd,
    )
    s_ce = student.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s_ce, targets, reduction="sum"), s_ce)
    torch.testing.assert_close(grad, kd_w * g_kd + sft_w * g_ce)


# ---------------------------------------------------------------- errors


def test_unknown_kl_raises():
    student, t_logits, t_ids, targets = _make_batch(seed=30)
    with pytest.raises(ValueError, match="kl must be one of"):
        topk_kd_loss(student, t_logits, t_ids, kl="jsd")
    with pytest.raises(ValueError, match="kl must be one of"):
        distill_loss(student, targets, t_logits, t_ids, kl="Forward")


def test_shape_mismatches_raise():
    student, t_logits, t_ids, targets = _make_batch(seed=31)
    # Teacher logits vs ids disagree on K.
    with pytest.raises(ValueError, match="same shape"):
        topk_kd_loss(student, t_logits[:, :3], t_ids)
    # Teacher has a different number of positions than the student.
    with pytest.raises(ValueError, match="positions"):
        topk_kd_loss(student[:-1], t_logits, t_ids)
    # Student not 2-D.
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        topk_kd_loss(student[None], t_logits, t_ids)
    # K larger than the vocabulary.
    small = torch.randn(N, 3)
    with pytest.raises(ValueError, match="exceeds"):
        topk_kd_loss(small, t_logits, torch.zeros(N, K, dtype=torch.long))
    # Cross-entropy targets of the wrong length.
    with pytest.raises(ValueError, match="targets"):
        token_cross_entropy(student, targets[:-1])
    with pytest.raises(ValueError, match="targets"):
        distill_loss(student, targets[:-1], t_logits, t_ids)


def test_non_long_ids_raise():
    student, t_logits, t_ids, _ = _make_batch(seed=32)
    with pytest.raises(ValueError, match="torch.long"):
        topk_kd_loss(student, t_logits, t_ids.int())
