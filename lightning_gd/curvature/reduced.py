"""An operator averaged over data-parallel ranks: ``A v = reduce_mean_r(A_r v)``.

Under data parallelism each rank holds the Hessian ``H_r`` of its own batch, and the Hessian of the
global batch is their mean. ``torch.autograd.grad`` bypasses DDP's reducer, so the averaging has to be
done on the products themselves; with the same vector on every rank, every rank then sees the same
products and an iterative method (Lanczos) runs identically everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lightning_gd.curvature._utils import _matmat
from lightning_gd.curvature._wrapper import _OperatorWrapper
from lightning_gd.curvature.base import CurvatureOperator

__all__ = ["ReducedOperator"]


class ReducedOperator(_OperatorWrapper):
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
        super().__init__(op)
        self._reduce = reduce_fn

    def matvec(self, v: Tensor) -> Tensor:
        self._num_matvecs += 1
        return self._reduce(self._op.matvec(v))

    def matmat(self, V: Tensor) -> Tensor:
        self._num_matvecs += V.shape[1]
        return self._reduce(_matmat(self._op, V))
