"""Stochastic trace estimation of a matrix-free symmetric operator.

* Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines": ``tr(A) = E[z^T A z]`` for Rademacher probes ``z``.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic trace
  estimation"): the trace of a low-rank sketch ``Q = qr(A S)`` is taken exactly and Hutchinson
  only estimates the trace of the deflated remainder ``(I - QQ^T) A (I - QQ^T)``, which needs
  ``O(1/eps)`` instead of ``O(1/eps^2)`` products when the spectrum decays.
* XTrace (Epperly, Tropp & Webber 2024, "XTrace: Making the most of every sample in stochastic trace
  estimation", SIMAX): half the products sketch ``Y = A Omega``, half give ``A Q`` for ``Q = qr(Y)``; then every
  probe ``omega_i`` serves twice, exchangeably: estimate ``i`` is Hutch++ with the low-rank part built from all
  the other probes and ``omega_i`` as its Hutchinson probe, ``tr(Q_i^T A Q_i) + omega_i^T (I - Q_i Q_i^T) A
  (I - Q_i Q_i^T) omega_i``, and the estimate is their mean. ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with ``s_i``
  the normalised ``i``-th column of ``R^{-T}`` (the direction of ``span(Y)`` that only ``A omega_i`` spans), so
  all of them cost ``O(n s^2)`` bookkeeping, no extra product.

The Hessian trace is the curvature summary used by PyHessian (Yao et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_gd.curvature._utils import (
    _allreduce,
    _check_positive_int,
    _colsum,
    _matmat,
    _qr,
    _rademacher,
    _resolve_generator,
    _work_dtype,
)
from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.utils.checks import check_choice

__all__ = ["MIN_PROBES", "TraceEstimate", "TraceMethod", "hutchinson_trace"]

TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
_METHODS: tuple[str, ...] = get_args(TraceMethod)
MIN_PROBES: dict[str, int] = {"hutchinson": 1, "hutch++": 3, "xtrace": 4}  # products one estimate needs at least


@dataclass(frozen=True)
class TraceEstimate:
    """Result of :func:`hutchinson_trace`.

    Attributes:
        value: The trace estimate.
        stderr: Standard error of the stochastic part (``nan`` with a single stochastic probe).
        num_matvecs: Operator products spent.
        per_param: Trace of each parameter's diagonal block, keyed by parameter name, or ``None``.
    """

    value: float
    stderr: float
    num_matvecs: int
    per_param: dict[str, float] | None = None


def hutchinson_trace(
    op: CurvatureOperator,
    num_probes: int = 100,
    method: TraceMethod = "hutchinson",
    generator: torch.Generator | None = None,
    per_param: bool = False,
    probes_per_matmat: int = 10,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with Rademacher probes.

    With ``method="hutchinson"`` the estimate is the mean of ``z^T A z`` over ``num_probes``
    probes and ``stderr`` their sample standard deviation over ``sqrt(num_probes)``. With
    ``method="hutch++"`` the ``num_probes`` products are split in thirds: a sketch ``S``, the
    exact trace of ``Q^T A Q`` for ``Q = qr(A S)``, and Hutchinson on the deflated remainder
    (which also gets the rounding leftover); ``stderr`` comes from the remainder's probes. With
    ``method="xtrace"`` the products are split in halves (an odd one left unused), and ``stderr`` is the
    exchangeable estimates' standard deviation over ``sqrt(s)`` (Epperly et al. 2024's error estimate).

    Args:
        op: Symmetric operator (e.g. :class:`~lightning_gd.curvature.HessianOperator`).
        num_probes: Number of operator products to spend (>= 1; >= 3 for ``"hutch++"``; >= 4 for ``"xtrace"``).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        generator: Source of the probes. ``None`` uses a fresh generator seeded with 0, so
            results are reproducible and the global RNG is left untouched.
        per_param: Also estimate each parameter's diagonal-block trace (needs an operator with
            ``param_names`` and ``param_numels``); they sum to ``value``.
        probes_per_matmat: Probes pushed through one ``op.matmat`` call (memory/speed trade-off, see below).

    Memory and precision. Probes, products and reductions are in the working dtype (float32 for float32
    and half-precision operators, float64 for float64 ones); the operator receives its own dtype; the
    estimate is reduced in float64. With ``p = min(probes_per_matmat, num_probes)``, the extra memory on the
    operator's device beyond the operator's own product is at most ``2 p`` parameter-sized vectors for
    ``"hutchinson"`` (probes and products; ``+ 2`` with ``per_param``), and ``3 k + 4 p + 2`` for
    ``"hutch++"`` with ``k = num_probes // 3`` (the sketch ``Q``, ``A Q`` and the QR's copy): Hutch++
    grows with ``num_probes``, Hutchinson does not; ``"xtrace"`` holds ``4 s + 2`` with ``s = num_probes // 2``
    (the probes, their products, ``Q`` and ``A Q``), ``+ 4`` with ``per_param``. On a sharded operator (see
    :class:`~lightning_gd.curvature.CurvatureOperator`) these are vectors of each rank's part, the probes are the
    global probes an unsharded operator gets from the same generator, the QR is Gram-Schmidt with all-reduced
    coefficients, and every rank returns the same estimate.

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        ValueError: On an unknown ``method``, too few ``num_probes``, a bad
            ``probes_per_matmat``, or ``per_param=True`` for an operator without parameter names.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, hutchinson_trace
        >>> op = DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> hutchinson_trace(op, num_probes=4).value  # exact for a diagonal matrix
        15.0
    """
    check_choice("method", method, _METHODS)
    _check_positive_int("num_probes", num_probes, MIN_PROBES[method])
    _check_positive_int("probes_per_matmat", probes_per_matmat)
    slices = _param_slices(op) if per_param else None
    gen = _resolve_generator(generator)
    if method == "hutchinson":
        return _hutchinson(op, num_probes, gen, slices, probes_per_matmat)
    if method == "hutch++":
        return _hutch_plus_plus(op, num_probes, gen, slices, probes_per_matmat)
    return _xtrace(op, num_probes, gen, slices, probes_per_matmat)


def _hutchinson(
    op: CurvatureOperator,
    num_probes: int,
    gen: torch.Generator,
    slices: dict[str, slice] | None,
    chunk: int,
) -> TraceEstimate:
    samples, diag = [], None
    for start in range(0, num_probes, chunk):
        Z = _rademacher((min(chunk, num_probes - start), op.numel), gen, op).T
        ZAZ = _matmat(op, Z).to(Z.dtype).mul_(Z)  # column j holds z_j * (A z_j) elementwise (in place)
        del Z
        samples.append(_colsum(op, ZAZ))
        if slices is not None:
            diag = ZAZ.sum(dim=1) if diag is None else diag.add_(ZAZ.sum(dim=1))  # running, not one per chunk
        del ZAZ
    values = torch.cat(samples).double()
    per_param = None
    if diag is not None:
        per_param = _slice_sums(op, diag.double() / num_probes, slices)
    return TraceEstimate(
        value=values.mean().item(),
        stderr=_stderr(values),
        num_matvecs=num_probes,
        per_param=per_param,
    )


def _hutch_plus_plus(
    op: CurvatureOperator,
    num_probes: int,
    gen: torch.Generator,
    slices: dict[str, slice] | None,
    chunk: int,
) -> TraceEstimate:
    k = num_probes // 3
    r = num_probes - 2 * k  # the remainder probes also take the rounding leftover
    S = _rademacher((k, op.numel), gen, op).T
    AS = _chunked_matmat(op, S, chunk).to(S.dtype)
    del S
    Q, _ = _qr(op, AS)  # reduced: (n, min(n, k))
    del AS
    AQ = _chunked_matmat(op, Q, chunk).to(Q.dtype)
    M = _allreduce(op, Q.T @ AQ)
    low_rank = torch.trace(M).item()

    samples, rest = [], None
    for start in range(0, r, chunk):
        G = _rademacher((min(chunk, r - start), op.numel), gen, op).T
        W = G - Q @ _allreduce(op, Q.T @ G)  # probes projected onto the complement of the sketch
        AW = _matmat(op, W).to(W.dtype)
        samples.append(_allreduce(op, torch.linalg.vecdot(W, AW, dim=0)))
        del W
        if slices is not None:
            # diag((I-P) A (I-P)) is estimated by g * ((I-P) A (I-P) g), block by block.
            block = AW.sub_(Q @ _allreduce(op, Q.T @ AW)).mul_(G).sum(dim=1)
            rest = block if rest is None else rest.add_(block)
        del G, AW
    values = torch.cat(samples).double()

    per_param = None
    if rest is not None:
        # tr_b(A) = tr_b(P A P) + 2 tr_b(P A (I-P)) + tr_b((I-P) A (I-P)) for P = QQ^T: the first
        # two are exact from A Q, the cross terms vanish in the total but not block by block.
        exact = (Q * (Q @ M)).sum(dim=1) + 2 * (Q * (AQ - Q @ M)).sum(dim=1)
        per_param = _slice_sums(op, (exact + rest / r).double(), slices)
    return TraceEstimate(
        value=low_rank + values.mean().item(),
        stderr=_stderr(values),
        num_matvecs=2 * k + r,
        per_param=per_param,
    )


def _xtrace(
    op: CurvatureOperator,
    num_probes: int,
    gen: torch.Generator,
    slices: dict[str, slice] | None,
    chunk: int,
) -> TraceEstimate:
    s = num_probes // 2
    Om = _rademacher((s, op.numel), gen, op).T  # (n, s)
    Y = _chunked_matmat(op, Om, chunk).to(Om.dtype)
    Q, R = _qr(op, Y)
    Z = _chunked_matmat(op, Q, chunk).to(Q.dtype)  # A Q
    H = _allreduce(op, Q.T @ Z)
    H = 0.5 * (H + H.T)  # symmetric up to rounding
    W = _allreduce(op, Q.T @ Om)  # coefficients of each probe in span(Y)
    T = _allreduce(op, Z.T @ Om)  # Q^T A omega_i, by symmetry of A
    d1 = _allreduce(op, torch.linalg.vecdot(Om, Y, dim=0))  # omega_i^T A omega_i
    # s_i: the unit direction of span(Y) orthogonal to every A omega_j but the i-th: columns of R^{-T}, normalised.
    Rinv_T = torch.linalg.solve_triangular(R, torch.eye(s, dtype=R.dtype, device=R.device), upper=True).T
    S = Rinv_T / torch.linalg.vector_norm(Rinv_T, dim=0, keepdim=True)
    c = (S * W).sum(dim=0)  # s_i^T w_i
    HS, HW = H @ S, H @ W
    sHs = (S * HS).sum(dim=0)
    # Estimate i: tr(Q^T A Q) - s_i^T H s_i  +  u_i^T A u_i with u_i = omega_i - Q (w_i - c_i s_i), expanded over
    # the small matrices (A u_i = A omega_i - Z w_i + c_i Z s_i).
    quad = (
        d1 - (T * W).sum(dim=0) + c * (T * S).sum(dim=0)
        - (W * R).sum(dim=0) + (W * HW).sum(dim=0) - c * (W * HS).sum(dim=0)
        + c * (S * R).sum(dim=0) - c * (S * HW).sum(dim=0) + c * c * sHs
    )  # fmt: skip
    values = (torch.trace(H) - sHs + quad).double()
    per_param = None
    if slices is not None:
        per_param = _slice_sums(op, _xtrace_diagonal(Om, Y, Q, Z, S, W, c), slices)
    return TraceEstimate(value=values.mean().item(), stderr=_stderr(values), num_matvecs=2 * s, per_param=per_param)


def _xtrace_diagonal(Om: Tensor, Y: Tensor, Q: Tensor, Z: Tensor, S: Tensor, W: Tensor, c: Tensor) -> Tensor:
    """Mean over ``i`` of unbiased diagonal estimates whose sums are XTrace's estimates ``i``.

    ``diag(A) = diag(P A) + diag((I - P) A)`` for ``P = Q_i Q_i^T``: the first exactly from ``Q`` and ``A Q``, the
    second by ``u_i * (A u_i)`` with ``u_i = (I - P) omega_i``, whose expectation is ``diag((I - P)(I - P) A)``
    (``E[(M w) * (N w)] = diag(M N^T)`` for isotropic ``w``). Summed: ``tr(P A) + u_i^T A u_i``, estimate ``i``.
    ``O(n s)`` per ``i``.
    """
    base_pa = (Q * Z).sum(dim=1)  # diag(Q Q^T A), A symmetric
    out = torch.zeros(Q.shape[0], dtype=torch.float64, device=Q.device)
    for i in range(S.shape[1]):
        si = S[:, i]
        coef = W[:, i] - c[i] * si
        u = Om[:, i] - Q @ coef
        au = Y[:, i] - Z @ coef
        out += (base_pa - (Q @ si) * (Z @ si) + u * au).double()
    return out / S.shape[1]


def _chunked_matmat(op: CurvatureOperator, V: Tensor, chunk: int) -> Tensor:
    """``A V`` in the working dtype, ``chunk`` columns per product call, written into one preallocated result."""
    out = torch.empty(V.shape[0], V.shape[1], dtype=_work_dtype(op.dtype), device=V.device)
    for i in range(0, V.shape[1], chunk):
        out[:, i : i + chunk] = _matmat(op, V[:, i : i + chunk])
    return out


def _slice_sums(op: CurvatureOperator, diag: Tensor, slices: dict[str, slice]) -> dict[str, float]:
    """Sum of a diagonal estimate over each parameter's slice (over every rank's part for a sharded operator)."""
    if len(slices) == 0:
        return {}
    sums = torch.stack([diag[s].sum() for s in slices.values()])
    return dict(zip(slices, _allreduce(op, sums).tolist(), strict=True))


def _stderr(values: Tensor) -> float:
    if values.numel() < 2:
        return math.nan
    return (values.std(unbiased=True) / math.sqrt(values.numel())).item()


def _param_slices(op: CurvatureOperator) -> dict[str, slice]:
    names = getattr(op, "param_names", None)
    numels = getattr(op, "param_numels", None)
    if names is None or numels is None:
        raise ValueError(f"per_param=True needs an operator with param_names and param_numels, got {type(op).__name__}")
    slices, offset = {}, 0
    for name, n in zip(names, numels, strict=True):
        slices[name] = slice(offset, offset + n)
        offset += n
    return slices
