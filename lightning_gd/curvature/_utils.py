"""Private helpers shared by the curvature estimators (probes, generators, batched products, sharded vectors).

Sharded operators. An operator whose vectors are split across ranks (each rank holds the entries of the
parameters it owns, e.g. :class:`~lightning_gd.curvature.FiniteDifferenceOperator` on FSDP2 shards) says so with
three attributes, which every estimator reads through the helpers below:

* ``allreduce(t) -> Tensor``: the sum of ``t`` over the ranks that hold parts of one vector (a collective);
* ``global_numel``: the dimension of the space, the sum of every rank's ``numel``;
* ``segments``: ``((global_offset, length), ...)``, where this rank's entries sit in the global vector, in local
  order (a vector's local part is the concatenation of these ranges of the global vector).

Inner products and norms are then the local ones all-reduced, tall-skinny QR is Gram-Schmidt with all-reduced
coefficients, and every branch the estimators take depends on all-reduced numbers only, so every rank runs the same
iteration. An operator without ``allreduce`` (or with ``allreduce=None``) is unsharded: the estimators then run
exactly the operations they always ran (same numbers, bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.utils.checks import check_positive_int

# Seed of the private generator used when the caller passes none: estimates are reproducible
# and the global RNG is never consumed.
_DEFAULT_SEED = 0
# Entries drawn per call when a sharded operator's probe is generated: a multiple of 16 (torch's CPU normal sampler
# transforms its uniforms 16 at a time, so draws in such chunks are bit-identical to one draw of the whole).
_DRAW_CHUNK = 1 << 20


def _resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a fresh CPU generator with a fixed seed (global RNG untouched)."""
    if generator is None:
        return torch.Generator().manual_seed(_DEFAULT_SEED)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    return generator


def _rademacher(shape: tuple[int, ...], generator: torch.Generator, like: CurvatureOperator) -> Tensor:
    """Draw +-1 entries with ``generator`` (on its own device), returned on the operator's device.

    ``shape`` is ``(numel,)`` or ``(m, numel)``; for a sharded operator these are this rank's entries of ``m``
    global vectors, the very entries an unsharded operator of the same global size gets from the same generator
    (see :func:`_draw`).
    """
    dtype = _work_dtype(like.dtype)
    if _sharded(like):
        bits = _draw(lambda n: torch.randint(0, 2, (n,), generator=generator, device=generator.device, dtype=dtype),
                     shape, like)  # fmt: skip
    else:
        bits = torch.randint(0, 2, shape, generator=generator, device=generator.device, dtype=dtype)
    return bits.mul_(2).sub_(1).to(device=like.device)  # in place: no temporaries of the probes' size


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, like: CurvatureOperator) -> Tensor:
    """Draw standard normal entries with ``generator``, returned on the operator's device (sharded: see
    :func:`_rademacher`)."""
    dtype = _work_dtype(like.dtype)
    if _sharded(like):
        return _draw(lambda n: torch.randn(n, generator=generator, device=generator.device, dtype=dtype),
                     shape, like).to(like.device)  # fmt: skip
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(like.device)


def _draw(sample: Callable[[int], Tensor], shape: tuple[int, ...], op: CurvatureOperator) -> Tensor:
    """This rank's entries of ``m`` global vectors drawn as one ``(m, global_numel)`` tensor would be.

    The generator's stream runs over the whole ``m * global_numel`` entries, ``_DRAW_CHUNK`` at a time, and only the
    entries of this rank's segments are kept: the result equals the unsharded draw restricted to the segments, and
    the generator ends in the same state, so the sharded and the unsharded runs of one seed see the same probes.
    Memory: the result and one chunk. Time: the generator's cost for the global size on every rank (torch's CPU
    generators cannot skip ahead), about 5-25 ns per entry on one CPU thread (benchmarks/RESULTS.md).
    """
    rows = 1 if len(shape) == 1 else shape[0]
    numel, dim = op.numel, op.global_numel
    out = torch.empty(rows, numel, dtype=_work_dtype(op.dtype))
    # (position in the flat stream, position in the flat output, length) of every wanted range, in stream order.
    wanted = []
    for r in range(rows):
        offset = 0
        for start, length in op.segments:
            wanted.append((r * dim + start, r * numel + offset, length))
            offset += length
    wanted.sort()  # stream order (segments need not be in global order)
    flat = out.view(-1)
    total, pos, i = rows * dim, 0, 0
    while pos < total:
        n = min(_DRAW_CHUNK, total - pos)
        if 0 < total - pos - n < 16:
            n = total - pos  # a last draw of fewer than 16 entries would use another sampler: take it along
        chunk = sample(n).to(flat.dtype)
        while i < len(wanted):
            src, dst, length = wanted[i]
            lo, hi = max(src, pos), min(src + length, pos + n)
            if lo < hi:
                flat[dst + lo - src : dst + hi - src] = chunk[lo - pos : hi - pos]
            if src + length > pos + n:
                break  # the rest of this range is in the next chunk
            i += 1
        pos += n
    return out if len(shape) == 2 else out[0]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32, so half-precision operators still reduce accurately."""
    return torch.promote_types(dtype, torch.float32)


def _matmat(op: CurvatureOperator, V: Tensor) -> Tensor:
    """Apply ``op`` to the columns of ``V`` (shape ``(numel, m)``), batched when it can."""
    V = V.to(dtype=op.dtype, device=op.device)
    matmat = getattr(op, "matmat", None)
    if callable(matmat):
        return matmat(V)
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Validate an integer argument, naming it and its value in the error (``ValueError``)."""
    return check_positive_int(name, value, minimum)


# ---------------------------------------------------------------- sharded vectors
def _sharded(op: CurvatureOperator) -> bool:
    """Whether ``op``'s vectors are split across ranks (it has an ``allreduce``)."""
    return callable(getattr(op, "allreduce", None))


def _dim(op: CurvatureOperator) -> int:
    """The dimension of the operator's space: ``global_numel`` for a sharded operator, ``numel`` otherwise."""
    return int(op.global_numel) if _sharded(op) else op.numel  # type: ignore[attr-defined]


def _allreduce(op: CurvatureOperator, t: Tensor) -> Tensor:
    """The sum of ``t`` over the ranks sharing ``op``'s vectors (``t`` itself when unsharded)."""
    return op.allreduce(t) if _sharded(op) else t  # type: ignore[attr-defined]


def _dot(op: CurvatureOperator, a: Tensor, b: Tensor) -> Tensor:
    """The global inner product of two vectors (0-dim)."""
    return _allreduce(op, torch.dot(a, b))


def _norm(op: CurvatureOperator, x: Tensor) -> Tensor:
    """The global 2-norm of a vector (0-dim); unsharded: ``torch.linalg.vector_norm``, as always."""
    if not _sharded(op):
        return torch.linalg.vector_norm(x)
    return _allreduce(op, x.square().sum()).sqrt()


def _colsum(op: CurvatureOperator, M: Tensor) -> Tensor:
    """Column sums of a matrix of vectors (shape ``(numel, m)``), summed over the ranks too."""
    return _allreduce(op, M.sum(dim=0))


def _qr(op: CurvatureOperator, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of a tall matrix of vectors ``Y`` (``(numel, k)``): ``torch.linalg.qr`` when unsharded.

    Sharded: classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005) with all-reduced coefficients, one
    column at a time (``2 k`` small all-reduces); ``Q`` keeps ``k`` columns, a column of ``Y`` in the span of the
    previous ones (a rank-deficient sketch, or ``k`` above the dimension) gives a zero column of ``Q`` and a zero on
    ``R``'s diagonal, so ``Q Q^T`` is still the projection on ``span(Y)``.
    """
    if not _sharded(op):
        return torch.linalg.qr(Y)
    k = Y.shape[1]
    Q = torch.zeros_like(Y)
    R = torch.zeros(k, k, dtype=Y.dtype, device=Y.device)
    tiny = torch.finfo(Y.dtype).eps
    for j in range(k):
        v = Y[:, j].clone()
        norm0 = _norm(op, v)
        for _ in range(2):
            if j:
                c = _allreduce(op, Q[:, :j].T @ v)
                v.sub_(Q[:, :j] @ c)
                R[:j, j] += c
        norm = _norm(op, v)
        if bool(norm > 100 * tiny * norm0) and bool(norm > 0):
            R[j, j] = norm
            Q[:, j] = v / norm
    return Q, R
