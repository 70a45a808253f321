"""Gradient flossing's loss and trajectories (lightning_gd.dynamics.flossing) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_gd.dynamics import RecurrentDynamics, flossing_loss, flossing_spectrum, sample_trajectories


def test_flossing_loss_is_the_weighted_mean_squared_distance_to_the_target() -> None:
    lam = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    # by hand: deviations from 0.25 are 0.25, -0.5, 0.75, -0.25; squares 1/16, 1/4, 9/16, 1/16; mean 15/64
    assert flossing_loss(lam, target=0.25, weight=2.0).item() == pytest.approx(2.0 * 15 / 64)
    assert flossing_loss(torch.zeros(3)).item() == 0.0


def _linear(W: Tensor, **kwargs) -> RecurrentDynamics:
    return RecurrentDynamics(lambda h, x: h @ W.T + x, state_size=W.shape[0], input_size=W.shape[0], **kwargs)


def test_trajectories_are_gaussian_inputs_and_small_initial_states_drawn_in_order() -> None:
    dyn = _linear(torch.eye(3))
    inputs, h0 = sample_trajectories(dyn, length=5, batch=2, generator=torch.Generator().manual_seed(7), input_std=2.0)
    gen = torch.Generator().manual_seed(7)  # the same draws by hand: inputs first, then the initial states
    assert torch.equal(inputs, 2.0 * torch.randn(5, 2, 3, generator=gen))
    assert torch.equal(h0, 0.1 * torch.randn(2, 3, generator=gen))


def test_trajectories_take_the_tasks_own_inputs() -> None:
    def ones(length: int, batch: int, generator: torch.Generator) -> Tensor:
        return torch.ones(length, batch, 3)

    inputs, h0 = sample_trajectories(_linear(torch.eye(3), sample_inputs=ones), 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, torch.ones(4, 2, 3)) and h0.shape == (2, 3)


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_flossing_spectrum_of_a_scaled_orthogonal_map_is_log_s_and_its_loss_is_known(s: float) -> None:
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    W = (s * Q).requires_grad_(True)
    lam = flossing_spectrum(_linear(W), k=4, length=12, batch=3, warmup=2, generator=torch.Generator().manual_seed(2),
                            like=W)  # fmt: skip
    assert lam.shape == (3, 4) and lam.dtype == torch.float64
    torch.testing.assert_close(lam, torch.full((3, 4), math.log(s), dtype=torch.float64), rtol=0, atol=1e-12)
    loss = flossing_loss(lam, target=0.0)
    assert loss.item() == pytest.approx(math.log(s) ** 2)
    # Along W = s Q the loss is (log s)^2, so its derivative in the direction dW = Q ds is 2 log(s) / s.
    (grad,) = torch.autograd.grad(loss, W)
    assert (grad * Q).sum().item() == pytest.approx(2 * math.log(s) / s, rel=1e-9)
