"""Stochastic Lanczos quadrature spectral density."""

from __future__ import annotations

import pytest
import torch

from lightning_gd.curvature import DenseOperator, HessianOperator, SpectralDensity, spectral_density


def spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), dtype=torch.float64, generator=g))
    return (Q * eigs) @ Q.T


def mass(d: SpectralDensity, lo: float, hi: float) -> float:
    inside = (d.grid >= lo) & (d.grid <= hi)
    return torch.trapezoid(d.density[inside], d.grid[inside]).item()


def test_density_sits_on_known_spectrum():
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([-1.0 + 0.01 * torch.randn(120, generator=g), 3.0 + 0.01 * torch.randn(80, generator=g)])
    op = DenseOperator(spectrum_matrix(eigs.double()))
    d = spectral_density(op, num_runs=8, num_steps=30, grid_size=2000, sigma=0.1)
    assert d.nodes.shape == d.weights.shape == (8, 30) and d.num_matvecs == 240
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.trapezoid(d.density, d.grid).item() == pytest.approx(1.0, abs=1e-3)
    assert mass(d, -1.5, -0.5) == pytest.approx(0.6, abs=0.1)
    assert mass(d, 2.5, 3.5) == pytest.approx(0.4, abs=0.1)
    assert mass(d, -0.5, 2.5) < 0.01
    # Extreme nodes converge to the extreme eigenvalues.
    assert d.nodes.max().item() == pytest.approx(eigs.max().item(), abs=1e-6)
    assert d.nodes.min().item() == pytest.approx(eigs.min().item(), abs=1e-6)


def test_early_breakdown_is_padded_and_exact():
    eigs = torch.tensor([-2.0, 0.5, 1.0, 4.0, 7.0], dtype=torch.float64)
    d = spectral_density(DenseOperator(spectrum_matrix(eigs)), num_runs=2, num_steps=10, sigma=0.05)
    assert d.nodes.shape == (2, 10) and d.num_matvecs == 10
    assert torch.all(d.weights[:, 5:] == 0)
    torch.testing.assert_close(d.nodes[:, :5], eigs.expand(2, 5), rtol=0, atol=1e-10)
    assert torch.trapezoid(d.density, d.grid).item() == pytest.approx(1.0, abs=1e-3)


def test_hessian_density_default_sigma(mlp, mlp_hessian):
    op = HessianOperator(mlp.model, mlp.loss_fn, mlp.batch)
    rng = torch.get_rng_state()
    d = spectral_density(op, num_runs=2, num_steps=15)
    assert torch.equal(torch.get_rng_state(), rng)
    assert d.num_matvecs == op.num_matvecs == 30
    assert torch.trapezoid(d.density, d.grid).item() == pytest.approx(1.0, abs=1e-3)
    eigs = torch.linalg.eigvalsh(mlp_hessian)
    assert d.nodes.max().item() == pytest.approx(eigs[-1].item(), rel=1e-6)


def test_bad_arguments():
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    for kwargs, pattern in [
        ({"num_runs": 0}, "num_runs.*0"),
        ({"num_steps": -1}, "num_steps.*-1"),
        ({"grid_size": 1}, "grid_size.*1"),
        ({"sigma": 0.0}, "sigma.*0.0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            spectral_density(op, **kwargs)
