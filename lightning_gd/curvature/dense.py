"""A symmetric matrix held in memory, seen as a curvature operator.

Useful to test the matrix-free estimators (Hutchinson 1989 trace, Lanczos eigenvalues after
Golub & Meurant 2010, stochastic Lanczos quadrature after Ghorbani et al. 2019) against a matrix
whose spectrum is known, or to reuse them on a small explicit Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DenseOperator"]


class DenseOperator:
    """Wrap a dense symmetric matrix so that the curvature estimators can use it.

    Args:
        matrix: Square symmetric floating point matrix of shape ``(n, n)``.

    Raises:
        ValueError: If ``matrix`` is not a square, symmetric, floating point 2-D tensor.

    Example::

        >>> import torch
        >>> from lightning_gd.curvature import DenseOperator, lanczos
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> round(lanczos(op, k=1).eigenvalues[0].item(), 6)
        3.0
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"matrix must be a square 2-D tensor, got {shape}")
        if not matrix.is_floating_point():
            raise ValueError(f"matrix must have a floating point dtype, got {matrix.dtype}")
        # Lanczos and the quadrature rules are only valid for symmetric operators.
        scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
        asym = (matrix - matrix.T).abs().max() / scale
        if asym > 100 * torch.finfo(matrix.dtype).eps:
            raise ValueError(f"matrix must be symmetric, got a relative asymmetry of {asym.item():.3g}")
        self._matrix = matrix
        self._num_matvecs = 0

    @property
    def matrix(self) -> Tensor:
        """The wrapped matrix."""
        return self._matrix

    @property
    def numel(self) -> int:
        """Size ``n`` of the matrix."""
        return self._matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the matrix."""
        return self._matrix.dtype

    @property
    def device(self) -> torch.device:
        """Device of the matrix."""
        return self._matrix.device

    @property
    def num_matvecs(self) -> int:
        """Number of matrix-vector products computed so far (a ``matmat`` with m columns counts m)."""
        return self._num_matvecs

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``matrix @ v`` for ``v`` of shape ``(n,)``."""
        if v.shape != (self.numel,):
            raise ValueError(f"v must have shape ({self.numel},), got {tuple(v.shape)}")
        self._num_matvecs += 1
        return self._matrix @ v.to(dtype=self.dtype, device=self.device)

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``matrix @ V`` for ``V`` of shape ``(n, m)``."""
        if V.ndim != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must have shape ({self.numel}, m), got {tuple(V.shape)}")
        self._num_matvecs += V.shape[1]
        return self._matrix @ V.to(dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"DenseOperator(numel={self.numel}, dtype={self.dtype}, device={self.device})"
