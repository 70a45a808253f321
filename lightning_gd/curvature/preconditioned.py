"""Symmetrically preconditioned curvature operator ``P^{-1/2} A P^{-1/2}``, and Adam's preconditioner.

For a positive diagonal preconditioner ``P`` the matrix ``P^{-1/2} A P^{-1/2}`` is symmetric and
similar to ``P^{-1} A``, so its extreme eigenvalues are the "preconditioned sharpness" that
governs the stability of preconditioned gradient descent such as Adam. Keeping it symmetric
lets the Lanczos (Golub & Meurant 2010) and Hutchinson (1989) estimators apply unchanged.

Adam at the edge of stability (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability",
Section 2). Adam is preconditioned heavy-ball momentum,

    m_t = beta1 m_{t-1} + (1 - beta1) g_t,    w_{t+1} = w_t - lr P_t^{-1} m_t,
    P_t = (1 - beta1^t) (diag(sqrt(v_hat_t)) + eps I),    v_hat_t = v_t / (1 - beta2^t),

with the first-moment bias correction ``1 / (1 - beta1^t)`` folded into ``P_t`` (:func:`adam_preconditioner`).
With ``P`` frozen, on a quadratic with Hessian ``H`` the iteration is stable iff
``lambda_max(P^{-1} H) < (2 + 2 beta1) / ((1 - beta1) lr)`` (:func:`adam_threshold`; 38/lr at beta1 = 0.9), the
EMA heavy-ball bound, against ``2 / lr`` for gradient descent (:func:`gd_threshold`).

Several optimizers, or groups with different ``lr`` / ``beta1``. Substituting ``u_t = L P^{-1} m_t`` with
``L = diag(lr_i)`` turns the iteration into heavy ball on ``A = L P^{-1} H``, whose eigenvectors decouple it: with
one ``beta1`` the exact condition is ``lambda_max(L P^{-1} H) < (2 + 2 beta1) / (1 - beta1)``. So each block ``i``
gets ``D_i = P_i * threshold_i / threshold_ref`` and ``lambda_max(D^{-1} H)`` is compared with the reference
threshold (:func:`combine_preconditioners`): exact for a common ``beta1``, exact block by block otherwise, and the
plain ``P`` when every block shares ``lr`` and ``beta1``.

Gradient clipping. Clipping multiplies the gradient by ``c = min(1, max_norm / ||g||)`` before the optimizer
sees it. The moments are built from ``c g``: ``m_c = c m`` and ``v_c = c^2 v``, so ``P_c = c P`` (``eps``
aside), and Adam's step ``lr P_c^{-1} m_c = lr P^{-1} m`` is scale invariant. Linearised with ``P_c`` frozen, the
next gradient enters as ``c H w``, so the update Adam actually applies is ``lr P_c^{-1} (c H)`` and the sharpness
that governs it is ``lambda_max(c P_c^{-1} H) = lambda_max((P_c / c)^{-1} H)``, which is ``lambda_max(P^{-1} H)``
when ``c`` was constant. Measuring ``P_c^{-1} H`` alone reports it ``1 / c`` times too large (28x on GPT-2 with
``gradient_clip_val=1.0``). :func:`adam_preconditioner` therefore takes the clipping factor and returns
``P_c / c``: ``P_c`` read from the optimizer's own (clipped) moments, exact whatever ``c`` was before, and ``c``
the factor of the latest step, the best estimate of the next one's, treated as locally constant. (Norm
clipping also removes the component of the update's derivative along ``g`` itself; in many dimensions that is
one direction among millions, and the top eigenvector is not it.)

Sparse or compressed gradients. A coordinate whose gradient has been zero (top-k compressed DDP sends 1% of them
a step; a loss that does not reach it) has ``v = 0``, so ``P = (1 - beta1^t) eps``: ``1/eps`` on the diagonal of
``P^{-1} H``, a preconditioned sharpness ``10^6``-``10^8`` times too large (9.5e8 against 525 on GPT-2 with
``ddp_topk``), though Adam's update there is zero (``m = 0`` too). Measured on the quickstart model under
``ddp_topk`` (``benchmarks/curvature_preconditioned_sparse.py``): 41% of the coordinates had ``sqrt(v_hat) < eps``
and carried 99.8% of the top eigenvector; flooring ``v`` at ``f * mean(v)`` gave a number that moved 10x with the
arbitrary ``f`` (1e-6 .. 1e-2), and the raw ``lambda_max(H)`` says nothing for Adam. Chosen: leave out exactly the
coordinates Adam does not move, ``sqrt(v_hat) < eps`` (:func:`adam_unmoved`; ``P = inf`` there, see
:class:`PreconditionedOperator`): the number is then the preconditioned sharpness of the coordinates Adam updates
(0.042 of the threshold under top-k, against 0.082 for the same model under dense DDP; the rule changes nothing
in dense training, where no coordinate qualifies). With compressed gradients it describes the update a coordinate
gets when it is sent (error feedback accumulates in between), not a per-step linear map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _matmat
from lightning_gd.curvature._wrapper import _OperatorWrapper
from lightning_gd.curvature.base import CurvatureOperator

__all__ = [
    "PreconditionedOperator",
    "adam_preconditioner",
    "adam_threshold",
    "adam_unmoved",
    "combine_preconditioners",
    "gd_threshold",
]


class PreconditionedOperator(_OperatorWrapper):
    """Apply ``P^{-1/2} A P^{-1/2}`` for a positive diagonal ``P`` given as a flat tensor.

    An infinite entry leaves its coordinate out (``P^{-1/2} = 0`` there: a zero row and column; see
    :func:`adam_unmoved`). Parameter metadata (``param_names``, ``param_numels``) of the wrapped operator is passed
    through, so per-parameter traces keep working.

    Args:
        op: The symmetric operator ``A`` (e.g. a :class:`~lightning_gd.curvature.HessianOperator`).
        diag: The diagonal of ``P``, shape ``(op.numel,)``, all entries > 0 (``inf``: the coordinate left out).

    Raises:
        ValueError: If ``diag`` has the wrong shape or a non-positive or NaN entry.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, PreconditionedOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([4.0, 9.0], dtype=torch.float64)))
        >>> op = PreconditionedOperator(A, torch.tensor([4.0, 9.0], dtype=torch.float64))
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, op: CurvatureOperator, diag: Tensor) -> None:
        if not isinstance(diag, Tensor) or diag.shape != (op.numel,):
            shape = tuple(diag.shape) if isinstance(diag, Tensor) else type(diag).__name__
            raise ValueError(f"diag must be a tensor of shape ({op.numel},), got {shape}")
        if bool(torch.isnan(diag).any()) or not bool((diag > 0).all()):
            raise ValueError(f"diag must be strictly positive (inf: left out), got min {diag.min().item():.3g}")
        super().__init__(op)
        # P^{-1/2} is applied on both sides; precompute it once in the operator's dtype.
        self._scale = diag.to(dtype=op.dtype, device=op.device).rsqrt()

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``P^{-1/2} A P^{-1/2} v`` for ``v`` of shape ``(numel,)``."""
        if v.shape != (self.numel,):
            raise ValueError(f"v must have shape ({self.numel},), got {tuple(v.shape)}")
        self._num_matvecs += 1
        v = v.to(dtype=self.dtype, device=self.device)
        return self._scale * self._op.matvec(self._scale * v)

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``P^{-1/2} A P^{-1/2} V`` for ``V`` of shape ``(numel, m)``."""
        if V.ndim != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must have shape ({self.numel}, m), got {tuple(V.shape)}")
        self._num_matvecs += V.shape[1]
        scale = self._scale.unsqueeze(1)
        return scale * _matmat(self._op, scale * V.to(dtype=self.dtype, device=self.device))


def adam_preconditioner(
    exp_avg_sq: Tensor, step: float, beta1: float, beta2: float, eps: float, clip_factor: float = 1.0
) -> Tensor:
    """Diagonal of Adam's preconditioner ``P_t`` (Cohen et al. 2022), divided by the gradient clipping factor.

    ``P_t = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` elementwise, then ``/ clip_factor`` (see the module
    docstring: the update Adam applies is governed by ``lambda_max((P_c / c)^{-1} H)``). The result has
    ``exp_avg_sq``'s shape, dtype and device; ``lr P^{-1} m_t`` is exactly Adam's step (with ``clip_factor=1``).

    Args:
        exp_avg_sq: ``v_t``, the optimizer's second moment.
        step: ``t >= 1``, the optimizer's step count.
        beta1: First-moment coefficient, in ``[0, 1)``.
        beta2: Second-moment coefficient, in ``[0, 1)``.
        eps: Adam's ``eps`` (>= 0).
        clip_factor: ``c`` in ``(0, 1]``, the factor clipping multiplied the latest gradient by (1: no clipping).

    Raises:
        ValueError: On a ``step`` below 1, a beta outside ``[0, 1)``, a negative ``eps`` or a ``clip_factor``
            outside ``(0, 1]``.

    Example::

        >>> import torch
        >>> adam_preconditioner(torch.tensor([4.0]), step=1, beta1=0.9, beta2=0.99, eps=0.0)  # (1 - 0.9) sqrt(4 / 0.01)
        tensor([2.])
    """
    if not step >= 1:
        raise ValueError(f"step must be >= 1, got {step!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= beta < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not 0 < clip_factor <= 1:
        raise ValueError(f"clip_factor must be in (0, 1], got {clip_factor!r}")
    v_hat = exp_avg_sq / (1.0 - beta2**step)  # bias-corrected second moment
    return v_hat.sqrt().add_(eps).mul_((1.0 - beta1**step) / clip_factor)


def adam_unmoved(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """Where Adam has had no gradient: ``sqrt(v_hat) < eps`` (boolean, ``exp_avg_sq``'s shape).

    Adam's update there is zero, and ``P`` would put ``1/eps`` on the diagonal of ``P^{-1} H``; the tracker leaves
    these coordinates out (see the module docstring, "Sparse or compressed gradients").

    Example::

        >>> import torch
        >>> adam_unmoved(torch.tensor([0.0, 1e-20, 1e-4]), step=10, beta2=0.999, eps=1e-8).tolist()
        [True, True, False]
    """
    return exp_avg_sq / (1.0 - beta2**step) < eps * eps


def adam_threshold(beta1: float, lr: float) -> float:
    """Adam's stability threshold on ``lambda_max(P^{-1} H)``: ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al.
    2022), the EMA heavy-ball bound; 38/lr at ``beta1 = 0.9``.

    Example::

        >>> adam_threshold(0.9, 0.01)
        3800.0000000000005
    """
    if not 0 <= beta1 < 1 or not lr > 0:
        raise ValueError(f"adam_threshold needs beta1 in [0, 1) and lr > 0, got beta1={beta1!r}, lr={lr!r}")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def gd_threshold(lr: float) -> float:
    """Gradient descent's stability threshold on ``lambda_max(H)``: ``2 / lr`` (Cohen et al. 2021).

    Example::

        >>> gd_threshold(0.05)
        40.0
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    return 2.0 / lr


def combine_preconditioners(diags: list[Tensor], thresholds: list[float]) -> tuple[Tensor, float]:
    """One diagonal ``D`` for blocks preconditioned with different thresholds, and the threshold it is compared with.

    ``D_i = P_i * threshold_i / threshold_0`` (the first block is the reference): ``lambda_max(D^{-1} H) /
    threshold_0`` is then the edge-of-stability ratio of the whole update (see the module docstring), and ``D``
    is the concatenation of the ``P_i`` when every threshold is the same.

    Args:
        diags: Flat diagonals ``P_i``, in the operator's order.
        thresholds: Each block's threshold (:func:`adam_threshold` of its ``beta1`` and ``lr``).

    Returns:
        ``(D, threshold_0)``.

    Example::

        >>> import torch
        >>> D, t = combine_preconditioners([torch.ones(1), torch.ones(1)], [100.0, 50.0])
        >>> D.tolist(), t
        ([1.0, 0.5], 100.0)
    """
    if not diags or len(diags) != len(thresholds):
        raise ValueError(
            f"diags and thresholds must be non-empty and of equal length, got {len(diags)}, {len(thresholds)}"
        )
    ref = thresholds[0]
    return torch.cat(
        [d.flatten() * (t / ref) if t != ref else d.flatten() for d, t in zip(diags, thresholds, strict=True)]
    ), ref
