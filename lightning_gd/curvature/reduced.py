"""An operator averaged over data-parallel ranks: ``A v = reduce_mean_r(A_r v)``.

Under data parallelism each rank holds the Hessian ``H_r`` of its own batch, and the Hessian of the
global batch is their mean. ``torch.autograd.grad`` bypasses DDP's reducer, so the averaging has to be
done on the products themselves; with the same vector on every rank, every rank then sees the same
products and an iterative method (Lanczos) runs identically everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _matmat
from lightning_gd.curvature.base import CurvatureOperator

__all__ = ["ReducedOperator"]


class ReducedOperator:
    """Apply ``reduce_fn(op.matvec(v))``, with ``reduce_fn`` a cross-rank mean (identity on one process).

    Args:
        op: The rank-local operator.
        reduce_fn: Takes a tensor, returns its mean over ranks (e.g. Lightning's
            ``trainer.strategy.reduce``, or a ``torch.distributed.all_reduce`` divided by the world size).

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, ReducedOperator
        >>> op = ReducedOperator(DenseOperator(torch.eye(2)), reduce_fn=lambda t: t)  # one process
        >>> op.matvec(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, op: CurvatureOperator, reduce_fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(reduce_fn):
            raise ValueError(f"reduce_fn must be callable, got {type(reduce_fn).__name__}")
        self._op = op
        self._reduce = reduce_fn
        self._num_matvecs = 0

    @property
    def base(self) -> CurvatureOperator:
        """The rank-local operator."""
        return self._op

    @property
    def numel(self) -> int:
        return self._op.numel

    @property
    def dtype(self) -> torch.dtype:
        return self._op.dtype

    @property
    def device(self) -> torch.device:
        return self._op.device

    @property
    def num_matvecs(self) -> int:
        """Products computed through this wrapper (each one a product on every rank)."""
        return self._num_matvecs

    def __getattr__(self, name: str) -> object:
        # Forward parameter metadata only, so per-parameter traces work on reduced Hessians.
        if name in ("param_names", "param_numels"):
            return getattr(self._op, name)
        raise AttributeError(name)

    def matvec(self, v: Tensor) -> Tensor:
        self._num_matvecs += 1
        return self._reduce(self._op.matvec(v))

    def matmat(self, V: Tensor) -> Tensor:
        self._num_matvecs += V.shape[1]
        return self._reduce(_matmat(self._op, V))
