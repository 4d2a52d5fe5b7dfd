"""DRaFT+'s loss and regulariser by hand."""

from __future__ import annotations

import pytest
import torch

from alignkit.losses.diffusion import draftp_loss, noise_regularizer


def test_noise_regularizer_by_hand():
    assert noise_regularizer([torch.tensor([[1.0, 3.0]])], [torch.zeros(1, 2)]).item() == 5.0  # (1 + 9) / 2
    # two steps: the mean of the per-step means, (5 + 1) / 2
    two = noise_regularizer([torch.tensor([[1.0, 3.0]]), torch.ones(1, 2)], [torch.zeros(1, 2), torch.zeros(1, 2)])
    assert two.item() == 3.0
    assert noise_regularizer([], []).item() == 0.0
    same = torch.randn(2, 4, 3, 3)
    assert noise_regularizer([same], [same.clone()]).item() == 0.0  # the initial model: zero exactly
    with pytest.raises(ValueError):
        noise_regularizer([same, same], [same])


def test_draftp_loss_sums_and_gradients_by_hand():
    rewards = torch.tensor([0.5, 1.0], requires_grad=True)
    reg = torch.tensor(0.2, requires_grad=True)
    loss, sums = draftp_loss(rewards, reg, kl_coeff=0.5)
    assert loss.item() == pytest.approx(-1.5 + 0.5 * 0.2 * 2)
    assert sums["reward"].item() == pytest.approx(1.5) and sums["regularizer"].item() == pytest.approx(0.4)
    assert sums["loss"].item() == pytest.approx(-1.3)
    loss.backward()
    assert rewards.grad.tolist() == [-1.0, -1.0] and reg.grad.item() == pytest.approx(1.0)  # kl_coeff * B
    plain, _ = draftp_loss(torch.tensor([0.5, 1.0]), torch.tensor(7.0), kl_coeff=0.0)
    assert plain.item() == -1.5  # kl_coeff 0: plain DRaFT, the regulariser does not enter
