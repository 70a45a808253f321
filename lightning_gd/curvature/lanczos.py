"""Extreme eigenpairs of a matrix-free symmetric operator by the (block) Lanczos method.

Lanczos (1950) tridiagonalisation with full reorthogonalisation; Ritz pairs of the tridiagonal
matrix ``T`` approximate the extreme eigenpairs, and the classical residual bound
``||A y - theta y|| = |beta_m s_m|`` (Golub & Meurant 2010, "Matrices, Moments and Quadrature
with Applications"; Parlett 1998) decides convergence without extra products. This is the
"top eigenvalue of the Hessian" (sharpness) computation of PyHessian (Yao et al. 2020), done with
Lanczos instead of power iteration, so the smallest (possibly negative) eigenvalue is as cheap.

Repeated eigenvalues. The Krylov space of one start vector holds a single vector of each eigenspace, so
single-vector Lanczos returns one copy of a repeated eigenvalue and, for ``k > 1``, the next distinct value in
place of the second copy (``Linear(32, 2)`` with cross-entropy: eigenvalues in exact pairs, ``eig_2`` 33% off).
For ``k > 1`` the default is therefore **block Lanczos** with a block of ``k`` vectors (Golub & Underwood 1977;
Ruhe 1979's band form, see ``_krylov``), which returns every copy up to the block size. Chosen by measurement
over restarted single-vector Lanczos with locking and deflation (lock each converged pair, restart from a random
vector orthogonal to the locked ones; PyHessian's deflation with Lanczos in place of power iteration):
``benchmarks/curvature_block_lanczos.py``, figures in ``benchmarks/RESULTS.md`` ("Block Lanczos"). Both find
every copy; the block method needs fewer products on the Hessians measured there, a block's ``k`` products share
one forward and first backward of the model, and it warm-starts from the previous check's ``k`` eigenvectors at
once. ``k = 1`` is the single-vector method, operation for operation as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_gd.curvature._krylov import _LanczosProcess
from lightning_gd.curvature._utils import _allreduce, _check_positive_int, _dim, _gaussian, _resolve_generator
from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.utils.checks import check_choice, check_number

__all__ = ["EigResult", "Which", "lanczos"]

Which = Literal["largest", "smallest"]
_WHICH: tuple[str, ...] = get_args(Which)


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
    which: Which = "largest",
    tol: float = 1e-6,
    max_iter: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
    block_size: int | None = None,
) -> EigResult:
    """Compute the ``k`` algebraically largest or smallest eigenpairs of a symmetric operator.

    Iterates until, for each wanted Ritz value ``theta_i`` with Ritz vector ``s_i`` of ``T``, the residual
    ``||A y_i - theta_i y_i||`` (``|beta_m * s_i[-1]|`` for one vector, ``||E s_i||`` for a block) is at most
    ``tol * max(|theta_i|, eps^(2/3) ||T||)`` (a relative residual bound, with ARPACK's floor for eigenvalues near
    zero). If the Krylov space becomes invariant before ``k`` pairs are found, Lanczos restarts from a random
    direction orthogonal to it. With a block of ``b`` vectors every copy of an eigenvalue of multiplicity up to
    ``b`` is returned; its ``b`` products are computed in one ``op.matmat`` call.

    Memory and precision. The basis is kept for reorthogonalisation, at most ``max_basis`` vectors;
    when it is full, Lanczos thick-restarts (Wu & Simon 2000) from the best ``max(k + 1,
    max_basis // 2)`` Ritz vectors, rotated in place, so the memory stays bounded whatever ``max_iter``
    (at the price of more products if ``max_basis`` is smaller than the iterations needed). Extra memory on
    the operator's device beyond the operator's own product: ``min(max_basis, iterations)`` vectors
    (allocated 4 at a time, never beyond ``max_basis``) plus ``b`` for the block's products (one of them the
    residual), plus ``k`` for the returned eigenvectors (and 1 transient after a breakdown), all parameter-sized,
    in the working dtype: float32
    for float32 and half-precision operators, float64 for float64 ones. The operator is applied to
    vectors of its own dtype; Ritz values come from a float64 projected matrix. On a sharded operator (see
    :class:`~lightning_gd.curvature.CurvatureOperator`) each rank stores the same number of vectors, each its own
    part (``op.numel`` entries), ``init`` and the eigenvectors are this rank's parts, ``k`` and ``max_iter`` are
    bounded by the global dimension, and every rank returns the same eigenvalues.

    Args:
        op: Symmetric operator (e.g. :class:`~lightning_gd.curvature.HessianOperator`).
        k: Number of eigenpairs (``1 <= k <= op.numel``).
        which: ``"largest"`` (e.g. the sharpness ``lambda_max``) or ``"smallest"``
            (``lambda_min``, negative at a saddle).
        tol: Relative residual tolerance (> 0).
        max_iter: Maximum number of products (``>= k``; capped at ``numel``).
        init: Starting vector of shape ``(numel,)``, or up to ``b`` starting vectors of shape ``(numel, c)``
            (the rest of the block is random), on any device; a warm start such as the previous check's
            eigenvectors converges in fewer products when the operator changed little.
        generator: Source of the random start and restarts. ``None`` uses a fresh generator
            seeded with 0 (the global RNG is left untouched).
        max_basis: Most basis vectors stored at once (``>= k + b + 1``); ``None`` means ``max_iter + b - 1``
            (no restart).
        block_size: Vectors in the block ``b`` (``1 <= b <= numel``); ``None`` means ``k``: every copy of an
            eigenvalue repeated up to ``k`` times is found, and ``k = 1`` is single-vector Lanczos.

    Returns:
        An :class:`EigResult`.

    Raises:
        ValueError: On a bad ``k``, ``which``, ``tol``, ``max_iter``, ``init``, ``max_basis`` or ``block_size``.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, lanczos
        >>> op = DenseOperator(torch.diag(torch.tensor([5.0, 2.0, -1.0, -3.0], dtype=torch.float64)))
        >>> [round(x, 6) for x in lanczos(op, k=2).eigenvalues.tolist()]
        [5.0, 2.0]
        >>> [round(x, 6) for x in lanczos(op, which="smallest").eigenvalues.tolist()]
        [-3.0]
        >>> twice = DenseOperator(torch.diag(torch.tensor([5.0, 5.0, 2.0, 1.0], dtype=torch.float64)))
        >>> [round(x, 6) for x in lanczos(twice, k=2).eigenvalues.tolist()]  # both copies: a block of 2
        [5.0, 5.0]
    """
    n = _dim(op)  # the space's dimension (sharded operators: over every rank)
    _check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= numel ({n}), got {k!r}")
    check_choice("which", which, _WHICH)
    check_number("tol", tol, 0, low_open=True)
    _check_positive_int("max_iter", max_iter)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k ({k}), got {max_iter!r}")
    b = k if block_size is None else _check_positive_int("block_size", block_size)
    if b > n:
        raise ValueError(f"block_size must be <= numel ({n}), got {block_size!r}")
    if max_basis is not None:
        _check_positive_int("max_basis", max_basis, k + b + 1)
    gen = _resolve_generator(generator)
    q0 = _start_block(op, init, b, gen)

    steps = min(max_iter, n)
    proc = _LanczosProcess(op, q0, capacity=steps, max_basis=max_basis, generator=gen)
    eps23 = torch.finfo(proc.dtype).eps ** (2.0 / 3.0)
    converged = False
    while True:
        beta = proc.step()
        theta, S = torch.linalg.eigh(proc.projected())
        if proc.size >= k:
            idx = _wanted(theta, k, which)
            floor = eps23 * theta.abs().max().item()
            bound = proc.residual_norms(S[:, idx]) if b > 1 else (beta * S[-1, idx]).abs()
            converged = bool((bound <= tol * theta[idx].abs().clamp_min(floor)).all())
            if converged or proc.size >= n:
                converged = True  # a full Krylov space makes the Ritz pairs exact
                break
        if proc.num_matvecs >= steps and not proc.has_pending:
            break
        if proc.broke_down:
            if proc.full:
                break  # an invariant subspace filling the basis: its Ritz pairs are exact
            proc.restart(gen)
        elif proc.full:
            keep = _wanted(theta, min(proc.max_basis - b, max(k + 1, proc.max_basis // 2)), which)
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


def _start_block(op: CurvatureOperator, init: Tensor | None, b: int, gen: torch.Generator) -> Tensor:
    """The start vector (``b = 1``) or block: ``init``'s columns first, random Gaussian columns after (a sharded
    operator's ``init`` is this rank's part, checked over every rank)."""
    n = op.numel
    if init is None:
        return _gaussian((n,), gen, op) if b == 1 else _gaussian((b, n), gen, op).T
    if not isinstance(init, Tensor) or init.ndim not in (1, 2) or init.shape[0] != n:
        shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
        raise ValueError(f"init must be a tensor of shape ({n},) or ({n}, c), got {shape}")
    columns = init.unsqueeze(1) if init.ndim == 1 else init
    if columns.shape[1] > b:
        raise ValueError(f"init must have at most block_size={b} columns, got {columns.shape[1]}")
    bad = (~torch.isfinite(columns)).sum(dim=0).to(columns.dtype)
    mass = _allreduce(op, torch.cat([bad, columns.abs().sum(dim=0)]).double())  # one decision for every rank
    if bool(mass[: columns.shape[1]].any()) or not bool((mass[columns.shape[1] :] > 0).all()):
        raise ValueError("init must be finite, with no zero column, got one that is not")
    if b == 1:
        return columns[:, 0]  # copied into the basis as is: it may stay on the host
    extra = b - columns.shape[1]
    if extra == 0:
        return columns
    rand = _gaussian((extra, n), gen, op).T.to(device=columns.device, dtype=columns.dtype)
    return torch.cat([columns, rand], dim=1)


def _wanted(theta: Tensor, k: int, which: Which) -> Tensor:
    """Indices of the wanted Ritz values of ascending ``theta``, in the result's order."""
    m = theta.numel()
    if which == "largest":
        return torch.arange(m - 1, m - 1 - k, -1)
    return torch.arange(k)
