"""Annealed noise and the perturbed-GD ball kick (lightning_gd.dynamics.noise) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gd.dynamics import DeviceGenerators, add_gaussian_, noise_std, uniform_ball_


@pytest.mark.parametrize("step", [0, 1, 9, 99])
def test_polynomial_schedule_has_variance_eta_over_one_plus_t_to_the_gamma(step: int) -> None:
    # Neelakantan et al. 2015: sigma_t^2 = eta / (1 + t)^gamma
    assert noise_std("polynomial", 0.3, 0.55, step) ** 2 == pytest.approx(0.3 / (1 + step) ** 0.55)


@pytest.mark.parametrize("period", [0, 1, 3])
def test_step_schedule_shrinks_the_std_by_gamma_every_period(period: int) -> None:
    # Zhou et al. 2019: sigma_t^2 = eta * gamma^(2 j)
    assert noise_std("step", 0.04, 0.5, step=1000, period=period) == pytest.approx(0.2 * 0.5**period)
    with pytest.raises(ValueError, match="'cosine'"):
        noise_std("cosine", 0.04, 0.5, step=0)  # type: ignore[arg-type]


def test_gaussian_noise_is_std_times_the_generators_draws() -> None:
    a, b = torch.zeros(3, 2), torch.ones(4)
    add_gaussian_([a, b], 0.5, DeviceGenerators(11))
    gen = torch.Generator().manual_seed(11)  # one generator per device, drawn in order
    assert torch.equal(a, 0.5 * torch.randn(3, 2, generator=gen))
    assert torch.equal(b, 1.0 + 0.5 * torch.randn(4, generator=gen))


def test_ball_kick_is_radius_times_u_to_the_one_over_d_along_a_gaussian_direction() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(4)
    uniform_ball_([a, b], 0.2, DeviceGenerators(5))
    gen = torch.Generator().manual_seed(5)  # the draws by hand: directions (float64), then U on the CPU
    v = torch.cat([torch.randn(2, 3, generator=gen, dtype=torch.float64).flatten(),
                   torch.randn(4, generator=gen, dtype=torch.float64)])  # fmt: skip
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    expected = 0.2 * u ** (1 / 10) * v / v.norm()
    torch.testing.assert_close(torch.cat([a.flatten(), b]).double(), expected, rtol=1e-6, atol=1e-7)


def test_ball_kicks_fill_the_ball_uniformly() -> None:
    # Uniform in the d-ball: P(|kick| <= r/2) = (1/2)^d; d = 2 gives 1/4.
    inside = 0
    n = 4000
    for seed in range(n):
        x = torch.zeros(2, dtype=torch.float64)
        uniform_ball_([x], 1.0, DeviceGenerators(seed))
        assert x.norm() <= 1.0
        inside += bool(x.norm() <= 0.5)
    assert inside / n == pytest.approx(0.25, abs=4 * math.sqrt(0.25 * 0.75 / n))
