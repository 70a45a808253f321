"""Base of operators that wrap another one (preconditioned, rank-averaged): size, dtype, device, metadata."""

from __future__ import annotations

import torch

from lightning_gd.curvature.base import CurvatureOperator


class _OperatorWrapper:
    """Forward ``numel``/``dtype``/``device`` and the parameter metadata of the wrapped operator."""

    def __init__(self, op: CurvatureOperator) -> None:
        self._op = op
        self._num_matvecs = 0

    @property
    def base(self) -> CurvatureOperator:
        """The wrapped operator."""
        return self._op

    @property
    def numel(self) -> int:
        """Size of the operator (that of the wrapped one)."""
        return self._op.numel

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the wrapped operator."""
        return self._op.dtype

    @property
    def device(self) -> torch.device:
        """Device of the wrapped operator."""
        return self._op.device

    @property
    def num_matvecs(self) -> int:
        """Number of products computed through this wrapper."""
        return self._num_matvecs

    def __getattr__(self, name: str) -> object:
        # Forward parameter metadata, so per-parameter traces work on wrapped Hessians, and the layout of sharded
        # vectors (a wrapper acts on the same vectors), so the estimators all-reduce through it.
        if name in ("param_names", "param_numels", "allreduce", "global_numel", "segments"):
            return getattr(self._op, name)
        raise AttributeError(name)
