"""Ill-conditioned quadratics on which the curvature-aware optimizers must beat SGD and Adam at equal steps.

Every baseline gets the best of a small learning-rate grid; the winners get one fixed setting.
"""

import math

import pytest
import torch

from lightning_gd.optim import MFAC, Conda


def _rotated_spectrum(d, cond, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q, torch.logspace(-math.log10(cond), 0, d, dtype=torch.float64)  # eigenvalues in [1/cond, 1]


def _matrix_regression(make, steps=150, seed=0):
    """Full-batch least squares 0.5 |W X^T - Y|^2 / n for W (24 x 16); the inputs' covariance has a rotated
    spectrum from 1e-4 to 1. Returns the final excess loss."""
    gen = torch.Generator().manual_seed(seed)
    q, lam = _rotated_spectrum(16, 1e4, gen)
    x = torch.randn(256, 16, generator=gen, dtype=torch.float64) @ (q * lam.sqrt()).T
    w_star = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    y = x @ w_star.T
    w = torch.nn.Parameter(torch.zeros(24, 16, dtype=torch.float64))
    opt = make([w])
    for _ in range(steps):
        loss = 0.5 * ((x @ w.T - y) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (0.5 * ((x @ w.T - y) ** 2).sum(1).mean()).item()


def _noisy_regression(make, steps=300, seed=0):
    """Stochastic least squares (batches of 16, label noise 3) in 16 dimensions, Hessian with a rotated spectrum
    from 1e-3 to 1 and the same initial loss in every eigen-direction. Returns the final excess loss."""
    gen = torch.Generator().manual_seed(seed)
    q, lam = _rotated_spectrum(16, 1e3, gen)
    root = q * lam.sqrt()
    x_star = q @ (torch.randn(16, generator=gen, dtype=torch.float64).sign() / lam.sqrt())
    x = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
    opt = make([x])
    for _ in range(steps):
        a = torch.randn(16, 16, generator=gen, dtype=torch.float64) @ root.T
        y = a @ x_star + 3.0 * torch.randn(16, generator=gen, dtype=torch.float64)
        loss = 0.5 * ((a @ x - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = x.detach() - x_star
    return (0.5 * err @ (root @ root.T) @ err).item()


def _best(run, factories):
    return min((r if math.isfinite(r) else math.inf) for r in (run(f) for f in factories))


def _baselines(lrs_sgd, lrs_adam):
    sgd = [lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9) for lr in lrs_sgd]
    adam = [lambda p, lr=lr: torch.optim.Adam(p, lr=lr) for lr in lrs_adam]
    return sgd, adam


@pytest.mark.slow
def test_conda_beats_sgd_and_adam_on_an_ill_conditioned_matrix_quadratic():
    sgd, adam = _baselines([1e-5, 3e-5, 1e-4, 3e-4], [0.03, 0.1, 0.3, 1.0])  # lambda_max of the loss is about 1e4
    best_sgd = _best(_matrix_regression, sgd)
    best_adam = _best(_matrix_regression, adam)
    conda = _matrix_regression(lambda p: Conda(p, lr=1.0, update_proj_gap=1))
    start = _matrix_regression(lambda p: torch.optim.SGD(p, lr=0.0))
    assert conda < 0.1 * min(best_sgd, best_adam) and min(best_sgd, best_adam) < start


@pytest.mark.slow
def test_mfac_beats_sgd_and_adam_on_an_ill_conditioned_noisy_quadratic():
    sgd, adam = _baselines([0.03, 0.1, 0.19], [0.1, 0.3, 1.0])
    best_sgd = _best(_noisy_regression, sgd)
    best_adam = _best(_noisy_regression, adam)
    mfac = _noisy_regression(lambda p: MFAC(p, lr=0.03, num_grads=64, damp=1e-3))
    assert mfac < 0.5 * min(best_sgd, best_adam) and min(best_sgd, best_adam) < 8.0  # 8.0: the starting loss
