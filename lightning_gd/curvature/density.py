"""Spectral density of a matrix-free symmetric operator by stochastic Lanczos quadrature.

For a unit probe ``v``, ``m`` Lanczos steps give the Gauss quadrature rule of the spectral
measure ``sum_i (v^T u_i)^2 delta(lambda - lambda_i)``: nodes are the Ritz values of the
tridiagonal ``T``, weights the squared first components of its eigenvectors (Golub & Meurant
2010). Averaging over random probes, whose expected measure is the normalised spectral density,
and smoothing with a Gaussian kernel gives the Hessian eigenvalue density of Ghorbani, Krishnan
& Xiao (2019), "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density",
as implemented in PyHessian (Yao et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gd.curvature._krylov import _LanczosProcess
from lightning_gd.curvature._utils import _check_positive_int, _rademacher, _resolve_generator
from lightning_gd.curvature.base import CurvatureOperator

__all__ = ["SpectralDensity", "spectral_density"]

# Default kernel width, as a fraction of the spread of the quadrature nodes.
_RELATIVE_SIGMA = 0.01
# The grid extends this many kernel widths beyond the extreme nodes, so no mass is cut off.
_GRID_MARGIN = 5.0


@dataclass(frozen=True)
class SpectralDensity:
    """Result of :func:`spectral_density` (all tensors float64 on CPU).

    Attributes:
        grid: Evaluation points, shape ``(grid_size,)``, evenly spaced.
        density: Smoothed density at ``grid``; integrates to ~1 (trapezoid rule) when the
            kernel width spans several grid cells.
        nodes: Quadrature nodes (Ritz values), shape ``(num_runs, num_steps)``; a run that
            stopped early on an invariant Krylov space is padded with zero-weight nodes.
        weights: Quadrature weights, same shape; each run's weights sum to 1.
        num_matvecs: Operator products spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_matvecs: int


def spectral_density(
    op: CurvatureOperator,
    num_runs: int = 1,
    num_steps: int = 100,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator (stochastic Lanczos quadrature).

    Args:
        op: Symmetric operator (e.g. :class:`~lightning_gd.curvature.HessianOperator`).
        num_runs: Number of independent normalised Rademacher probes (>= 1).
        num_steps: Lanczos steps (operator products) per run (>= 1).
        grid_size: Number of grid points (>= 2).
        sigma: Width of the Gaussian smoothing kernel; ``None`` means 1% of the spread of the
            nodes (or of their magnitude when they all coincide).
        generator: Source of the probes. ``None`` uses a fresh generator seeded with 0 (the
            global RNG is left untouched).
        max_basis: Most Lanczos vectors stored at once (``>= 2``); ``None`` means ``num_steps``
            (full reorthogonalisation). With fewer, each new vector is orthogonalised against the
            latest ``max_basis`` only: the quadrature stays exact for the probe's measure up to
            rounding, and a ghost copy of a converged Ritz value only splits that node's weight.

    Memory and precision: extra memory on the operator's device beyond the operator's own product is
    ``min(max_basis, num_steps)`` parameter-sized vectors (allocated 4 at a time, never beyond
    ``max_basis``) plus 1 residual, in the working dtype (float32 for float32 and half-precision
    operators, float64 for float64 ones); nodes and weights come from a float64 projected matrix. On a sharded
    operator each rank holds its part of these vectors and of the global probes, and gets the same density.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: On a non-positive ``num_runs``, ``num_steps`` or ``sigma``, ``grid_size < 2``, or
            ``max_basis < 2``.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, spectral_density
        >>> op = DenseOperator(torch.diag(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)))
        >>> d = spectral_density(op, num_steps=3, sigma=0.1)
        >>> round(torch.trapezoid(d.density, d.grid).item(), 3)
        1.0
    """
    _check_positive_int("num_runs", num_runs)
    _check_positive_int("num_steps", num_steps)
    _check_positive_int("grid_size", grid_size, 2)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0):
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}")
    if max_basis is not None:
        _check_positive_int("max_basis", max_basis, 2)
    gen = _resolve_generator(generator)

    nodes = torch.zeros(num_runs, num_steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, num_steps, dtype=torch.float64)
    num_matvecs = 0
    for run in range(num_runs):
        proc = _LanczosProcess(
            op, _rademacher((op.numel,), gen, op), capacity=num_steps, max_basis=max_basis, window=True
        )
        # No restart on breakdown: the quadrature rule of this probe's measure is then exact.
        while True:
            proc.step()
            if proc.size >= num_steps or proc.broke_down:
                break
            proc.advance()
        num_matvecs += proc.num_matvecs
        theta, S = torch.linalg.eigh(proc.projected())
        m = theta.numel()
        nodes[run, :m] = theta
        nodes[run, m:] = theta[0]  # padding, with zero weight
        weights[run, :m] = S[0] ** 2

    live = nodes[weights > 0] if bool((weights > 0).any()) else nodes.reshape(-1)
    lo, hi = live.min().item(), live.max().item()
    if sigma is None:
        spread = hi - lo
        sigma = _RELATIVE_SIGMA * (spread if spread > 0 else max(abs(hi), 1.0))
    grid = torch.linspace(lo - _GRID_MARGIN * sigma, hi + _GRID_MARGIN * sigma, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1) / num_runs
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights, num_matvecs=num_matvecs)
