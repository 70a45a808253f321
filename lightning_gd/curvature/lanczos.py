"""Extreme eigenpairs of a matrix-free symmetric operator by the Lanczos method.

Lanczos (1950) tridiagonalisation with full reorthogonalisation; Ritz pairs of the tridiagonal
matrix ``T`` approximate the extreme eigenpairs, and the classical residual bound
``||A y - theta y|| = |beta_m s_m|`` (Golub & Meurant 2010, "Matrices, Moments and Quadrature
with Applications"; Parlett 1998) decides convergence without extra products. This is the
"top eigenvalue of the Hessian" (sharpness) computation of PyHessian (Yao et al. 2020), done with
Lanczos instead of power iteration, so the smallest (possibly negative) eigenvalue is as cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gd.curvature._krylov import _LanczosProcess
from lightning_gd.curvature._utils import _check_positive_int, _gaussian, _resolve_generator
from lightning_gd.curvature.base import CurvatureOperator

__all__ = ["EigResult", "lanczos"]

_WHICH = ("largest", "smallest")


@dataclass(frozen=True)
class EigResult:
    """Result of :func:`lanczos`.

    Attributes:
        eigenvalues: The ``k`` Ritz values, float64 on CPU; descending for ``"largest"``,
            ascending for ``"smallest"``.
        eigenvectors: The matching unit Ritz vectors as columns, shape ``(numel, k)``, in the
            operator's dtype and device.
        num_matvecs: Operator products spent.
        converged: Whether all ``k`` residual bounds met the tolerance (or the Krylov space
            became invariant) before ``max_iter``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_matvecs: int
    converged: bool


def lanczos(
    op: CurvatureOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
) -> EigResult:
    """Compute the ``k`` algebraically largest or smallest eigenpairs of a symmetric operator.

    Iterates until, for each wanted Ritz value ``theta_i`` with Ritz vector ``s_i`` of ``T``,
    ``|beta_m * s_i[-1]| <= tol * max(|theta_i|, eps^(2/3) ||T||)`` (a relative residual bound,
    with ARPACK's floor for eigenvalues near zero). If the Krylov space becomes invariant before ``k``
    pairs are found, Lanczos restarts from a random direction orthogonal to it.

    Memory and precision. The basis is kept for reorthogonalisation, at most ``max_basis`` vectors;
    when it is full, Lanczos thick-restarts (Wu & Simon 2000) from the best ``max(k + 1,
    max_basis // 2)`` Ritz vectors, rotated in place, so the memory stays bounded whatever ``max_iter``
    (at the price of more products if ``max_basis`` is smaller than the iterations needed). Extra memory on
    the operator's device beyond the operator's own product: ``min(max_basis, iterations)`` vectors
    (allocated 4 at a time, never beyond ``max_basis``) plus 1 residual, plus ``k`` for the returned
    eigenvectors (and 1 transient after a breakdown), all parameter-sized, in the working dtype: float32
    for float32 and half-precision operators, float64 for float64 ones. The operator is applied to
    vectors of its own dtype; Ritz values come from a float64 projected matrix.

    Args:
        op: Symmetric operator (e.g. :class:`~lightning_gd.curvature.HessianOperator`).
        k: Number of eigenpairs (``1 <= k <= op.numel``).
        which: ``"largest"`` (e.g. the sharpness ``lambda_max``) or ``"smallest"``
            (``lambda_min``, negative at a saddle).
        tol: Relative residual tolerance (> 0).
        max_iter: Maximum number of Lanczos steps, i.e. products (``>= k``; capped at ``numel``).
        init: Starting vector of shape ``(numel,)``, on any device; a warm start such as the previous
            top eigenvector converges in fewer products when the operator changed little.
        generator: Source of the random start and restarts. ``None`` uses a fresh generator
            seeded with 0 (the global RNG is left untouched).
        max_basis: Most basis vectors stored at once (``>= k + 2``); ``None`` means ``max_iter``
            (no restart).

    Returns:
        An :class:`EigResult`.

    Raises:
        ValueError: On a bad ``k``, ``which``, ``tol``, ``max_iter``, ``init`` or ``max_basis``.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, lanczos
        >>> op = DenseOperator(torch.diag(torch.tensor([5.0, 2.0, -1.0, -3.0], dtype=torch.float64)))
        >>> [round(x, 6) for x in lanczos(op, k=2).eigenvalues.tolist()]
        [5.0, 2.0]
        >>> [round(x, 6) for x in lanczos(op, which="smallest").eigenvalues.tolist()]
        [-3.0]
    """
    n = op.numel
    _check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= numel ({n}), got {k!r}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    _check_positive_int("max_iter", max_iter)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k ({k}), got {max_iter!r}")
    if max_basis is not None:
        _check_positive_int("max_basis", max_basis, k + 2)
    gen = _resolve_generator(generator)
    if init is None:
        q0 = _gaussian((n,), gen, op)
    else:
        if not isinstance(init, Tensor) or init.shape != (n,):
            shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(f"init must be a tensor of shape ({n},), got {shape}")
        if not bool(torch.isfinite(init).all()) or not bool(init.abs().sum() > 0):
            raise ValueError("init must be a finite, nonzero vector, got one that is not")
        q0 = init  # copied into the basis as is: it may stay on the host

    steps = min(max_iter, n)
    proc = _LanczosProcess(op, q0, capacity=steps, max_basis=max_basis)
    eps23 = torch.finfo(proc.dtype).eps ** (2.0 / 3.0)
    converged = False
    while True:
        beta = proc.step()
        theta, S = torch.linalg.eigh(proc.tridiagonal())
        if proc.size >= k:
            idx = _wanted(theta, k, which)
            floor = eps23 * theta.abs().max().item()
            bound = (beta * S[-1, idx]).abs()
            converged = bool((bound <= tol * theta[idx].abs().clamp_min(floor)).all())
            if converged or proc.size >= n:
                converged = True  # a full Krylov space makes the Ritz pairs exact
                break
        if proc.num_matvecs >= steps:
            break
        if proc.broke_down:
            if proc.full:
                break  # an invariant subspace filling the basis: its Ritz pairs are exact
            proc.restart(gen)
        elif proc.full:
            keep = _wanted(theta, min(proc.max_basis - 1, max(k + 1, proc.max_basis // 2)), which)
            proc.thick_restart(S[:, keep], theta[keep])
        else:
            proc.advance()

    vectors = proc.ritz_vectors(S[:, idx])
    return EigResult(
        eigenvalues=theta[idx].clone(),
        eigenvectors=vectors.to(op.dtype),
        num_matvecs=proc.num_matvecs,
        converged=converged,
    )


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted Ritz values of ascending ``theta``, in the result's order."""
    m = theta.numel()
    if which == "largest":
        return torch.arange(m - 1, m - 1 - k, -1)
    return torch.arange(k)
