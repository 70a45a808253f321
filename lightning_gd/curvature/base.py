"""The protocol shared by every curvature operator.

The estimators of :mod:`lightning_gd.curvature` (Hutchinson 1989 trace estimation, Lanczos
eigenvalues after Golub & Meurant 2010, stochastic Lanczos quadrature after Ghorbani et al. 2019)
only need a symmetric linear map ``v -> A v`` of a known size, so they accept any object with
``numel``, ``dtype``, ``device`` and ``matvec``; ``matmat`` is used when present to batch
several products.

Sharded operators, whose vectors are split across ranks (each rank holds ``numel`` entries of a space of
``global_numel``), add ``allreduce(t)`` (the sum over those ranks), ``global_numel`` and ``segments`` (where the
local entries sit in the global vector); the estimators then all-reduce their inner products and norms and draw
each rank's entries of the global random vectors (``_utils``). :class:`~lightning_gd.curvature.FiniteDifferenceOperator`
on FSDP2 shards is one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CurvatureOperator"]


@runtime_checkable
class CurvatureOperator(Protocol):
    """A symmetric linear operator on flat vectors of length :attr:`numel`.

    :class:`~lightning_gd.curvature.HessianOperator`,
    :class:`~lightning_gd.curvature.DenseOperator` and
    :class:`~lightning_gd.curvature.PreconditionedOperator` implement it; an optional
    ``matmat(V)`` for ``V`` of shape ``(numel, m)`` is used when available.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import CurvatureOperator, DenseOperator
        >>> isinstance(DenseOperator(torch.eye(3)), CurvatureOperator)
        True
    """

    @property
    def numel(self) -> int:
        """Length of the vectors the operator acts on."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Floating point type of the vectors."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the vectors."""
        ...

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a flat vector ``v`` of length :attr:`numel`."""
        ...
