"""Symmetrically preconditioned curvature operator ``P^{-1/2} A P^{-1/2}``.

For a positive diagonal preconditioner ``P`` the matrix ``P^{-1/2} A P^{-1/2}`` is symmetric and
similar to ``P^{-1} A``, so its extreme eigenvalues are the "preconditioned sharpness" that
governs the stability of preconditioned gradient descent such as Adam (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability", Section 2: Adam's update is
``w_{t+1} = w_t - lr P_t^{-1} m_t`` with ``P_t = (1 - beta1^t) (diag(sqrt(v_hat_t)) + eps I)``, and
``lambda_max(P_t^{-1} H)`` is compared with ``(2 + 2 beta1) / ((1 - beta1) lr)``). Keeping it symmetric
lets the Lanczos (Golub & Meurant 2010) and Hutchinson (1989) estimators apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gd.curvature._utils import _matmat
from lightning_gd.curvature._wrapper import _OperatorWrapper
from lightning_gd.curvature.base import CurvatureOperator

__all__ = ["PreconditionedOperator"]


class PreconditionedOperator(_OperatorWrapper):
    """Apply ``P^{-1/2} A P^{-1/2}`` for a positive diagonal ``P`` given as a flat tensor.

    Parameter metadata (``param_names``, ``param_numels``) of the wrapped operator is passed
    through, so per-parameter traces keep working.

    Args:
        op: The symmetric operator ``A`` (e.g. a :class:`~lightning_gd.curvature.HessianOperator`).
        diag: The diagonal of ``P``, shape ``(op.numel,)``, all entries finite and > 0.

    Raises:
        ValueError: If ``diag`` has the wrong shape or a non-positive or non-finite entry.

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
        if not bool(torch.isfinite(diag).all()) or not bool((diag > 0).all()):
            raise ValueError(f"diag must be finite and strictly positive, got min {diag.min().item():.3g}")
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
