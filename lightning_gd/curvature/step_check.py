"""Is a central-difference product trustworthy here? Compare it with the product at twice the step.

A central difference ``(g(theta + h v) - g(theta - h v)) / 2h`` is the Hessian-vector product only where the
gradient ``g`` is smooth on the scale of the step and its rounding is small against ``h`` (``_differences``). Both
can fail, and nothing in one product shows it:

* **kinks**: ReLU and max-pooling make the gradient piecewise smooth. Every unit whose pre-activation lies within
  the step's reach of zero (or every pooling window whose two largest entries are that close) changes side and adds
  a jump to the difference, of size ``O(1)`` over ``2h``. A network with many such units crosses some for any step a
  float32 or even float64 gradient can resolve: on torchvision's ResNet-18 (11.2M parameters) a Rademacher product
  is 33x off at ``h = 1e-6`` and 1.1x at ``h = 1e-2``, *in float64 as in float32*, while the same network with GELU
  and average pooling gives 4e-5 in float32 (measured: benchmarks/RESULTS.md, "Curvature by finite differences").
  Such a product is the curvature of a smoothed loss that depends on ``h``, not the Hessian at ``theta``;
* **roundoff**: gradients computed in bfloat16 (56-89% off at the float32 step, measured).

Both show as a product that depends on the step. The truncation error of a smooth gradient grows as ``h^2`` and
the roundoff error shrinks as ``1/h``, so for a trustworthy product doubling the step changes it by about three
times its truncation error or half its rounding error, a small number; a product dominated by kinks or roundoff
changes by a large share. :func:`finite_difference_check` spends two products (four gradients) to measure that
change along one vector, the vector whose figure is reported (the top eigenvector of a sharpness check) or a
random probe (a trace).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gd.curvature._utils import (
    _allreduce,
    _matmat,
    _rademacher,
    _resolve_generator,
    _work_dtype,
)
from lightning_gd.curvature._wrapper import _OperatorWrapper
from lightning_gd.curvature.base import CurvatureOperator
from lightning_gd.utils.checks import check_number

__all__ = ["DEFAULT_STEP_TOLERANCE", "StepCheck", "finite_difference_check", "uses_central_differences"]

# The largest relative change of a product when its step doubles that is accepted. Measured changes
# (benchmarks/curvature_step_check.py; RESULTS.md, "The step check"): smooth float32 models 3e-5 to 5.5e-4 along
# their top eigenvectors and Rademacher probes (quickstart, llama-tiny, ResNet-18 with GELU; the tests' classifier
# and RNN under FSDP2 and ZeRO-3 about 8e-5), with lambda_max errors up to 9e-4; ReLU / max-pool networks and
# bfloat16 gradients 0.67 to 0.83, with errors of 65% to 280%. A kink's share f of a product changes by f/2 (one
# kink) to f (1 - 1/sqrt(2)) (many) when the step doubles, so 1e-2 lets through kinks worth at most 2-3.5% of the
# product, and sits 18x above the smooth models' largest change.
DEFAULT_STEP_TOLERANCE = 1e-2


@dataclass(frozen=True)
class StepCheck:
    """Result of :func:`finite_difference_check`.

    Attributes:
        change: ``||A_2h v - A_h v|| / ||A_h v||``: the relative change of the product along ``v`` when the
            central-difference step doubles (``inf`` when ``A_h v = 0`` but ``A_2h v`` is not; ``nan`` for
            non-finite products).
        rayleigh: ``v^T A_h v / v^T v`` at the step in use.
        rayleigh_doubled: ``v^T A_2h v / v^T v``.
        tolerance: The largest accepted ``change``.
        num_matvecs: Operator products spent (2).
    """

    change: float
    rayleigh: float
    rayleigh_doubled: float
    tolerance: float
    num_matvecs: int

    @property
    def passed(self) -> bool:
        """Whether the products are step-independent to ``tolerance`` (``False`` for a non-finite change)."""
        return math.isfinite(self.change) and self.change <= self.tolerance


def finite_difference_check(
    op: CurvatureOperator,
    v: Tensor | None = None,
    *,
    tolerance: float = DEFAULT_STEP_TOLERANCE,
    generator: torch.Generator | None = None,
) -> StepCheck:
    """Measure how much ``op``'s central-difference products along ``v`` change when the step doubles.

    Args:
        op: An operator whose products are central differences: a
            :class:`~lightning_gd.curvature.FiniteDifferenceOperator`, a
            :class:`~lightning_gd.curvature.HessianOperator` computing by ``"finite_difference"``, or a wrapper of
            one (:class:`~lightning_gd.curvature.ReducedOperator`,
            :class:`~lightning_gd.curvature.PreconditionedOperator`). Sharded vectors: norms are all-reduced, so
            every rank gets the same result.
        v: The vector (shape ``(numel,)``; this rank's entries when sharded), e.g. the top eigenvector whose
            eigenvalue is reported. ``None``: a Rademacher probe from ``generator`` (the same global vector on any
            number of ranks).
        tolerance: The largest accepted relative change (> 0).
        generator: Generator of the probe when ``v`` is ``None`` (default: a fixed seed).

    Returns:
        A :class:`StepCheck`; ``passed`` says whether the products can be trusted.

    Raises:
        ValueError: On a bad ``tolerance`` or ``v``, or an ``op`` whose products are not central differences.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gd.curvature import HessianOperator
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> op = HessianOperator(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y),
        ...                      hvp="finite_difference")
        >>> check = finite_difference_check(op)
        >>> check.passed, check.change < 1e-6, check.num_matvecs
        (True, True, 2)
    """
    tolerance = check_number("tolerance", tolerance, 0, low_open=True)
    if v is None:
        v = _rademacher((op.numel,), _resolve_generator(generator), op)
    if not isinstance(v, Tensor) or v.shape != (op.numel,):
        raise ValueError(f"v must be a tensor of shape ({op.numel},), got {getattr(v, 'shape', type(v).__name__)}")
    V = v.reshape(-1, 1)
    at_h = _matmat(op, V)[:, 0]  # first: an hvp="auto" operator decides its method here
    with _doubled_step(_central_difference_operator(op)):
        at_2h = _matmat(op, V)[:, 0]
    work = _work_dtype(op.dtype)
    a, b, x = at_h.to(work), at_2h.to(work), v.to(work)
    sums = _allreduce(op, torch.stack([(b - a).square().sum(), a.square().sum(), x @ a, x @ b, x @ x]).double())
    diff, size, along_h, along_2h, sq = (float(s) for s in sums.cpu())
    if not all(math.isfinite(s) for s in (diff, size)):
        change = math.nan
    elif size > 0:
        change = math.sqrt(diff / size)
    else:
        change = 0.0 if diff == 0 else math.inf
    sq = sq if sq > 0 else math.nan
    return StepCheck(change, along_h / sq, along_2h / sq, tolerance, 2)


def uses_central_differences(op: CurvatureOperator) -> bool:
    """Whether ``op``'s products are central differences (through its wrappers; an ``hvp="auto"`` operator once
    its first product has chosen).

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, ReducedOperator
        >>> uses_central_differences(ReducedOperator(DenseOperator(torch.eye(2)), lambda t: t))
        False
    """
    base = _innermost(op)
    return getattr(base, "hvp_method", None) == "finite_difference" and hasattr(base, "_fd_eps")


def _innermost(op: CurvatureOperator) -> CurvatureOperator:
    while isinstance(op, _OperatorWrapper):
        op = op.base
    return op


def _central_difference_operator(op: CurvatureOperator) -> CurvatureOperator:
    """The innermost operator under ``op``'s wrappers, which must compute by central differences."""
    base = _innermost(op)
    if not uses_central_differences(op):
        raise ValueError(
            f"finite_difference_check needs an operator whose products are central differences, got"
            f" {type(base).__name__} computing by {getattr(base, 'hvp_method', None)!r}"
        )
    return base


@contextlib.contextmanager
def _doubled_step(base: CurvatureOperator) -> Iterator[None]:
    """Twice the relative step for the products inside (restored after, also on error)."""
    eps = base._fd_eps  # type: ignore[attr-defined]
    base._fd_eps = 2.0 * eps  # type: ignore[attr-defined]
    try:
        yield
    finally:
        base._fd_eps = eps  # type: ignore[attr-defined]
