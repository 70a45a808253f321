"""Error-feedback (memory) for biased gradient compressors.

Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes". Following GRACE's memory interface
(``compensate`` / ``update``), each tensor stream ``key`` keeps a residual ``e``::

    p_t     = g_t + e_t                 # compensate
    e_{t+1} = p_t - D(C(p_t))           # update

so nothing is lost, only delayed: ``sum_t D(C(p_t)) + e_{T} = sum_t g_t`` (telescoping).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-key residual memory (keys are bucket indices or parameter names, stored as ``str``).

    Example::

        >>> from lightning_gd.compression import TopK
        >>> ef, comp = ErrorFeedback(), TopK(0.5)
        >>> g = torch.tensor([1.0, -3.0, 0.5, 2.0])
        >>> p = ef.compensate("w", g)  # p_t = g_t + e_t
        >>> ef.update("w", p, comp.decompress(comp.compress(p)))
        >>> ef.residual("w")
        tensor([1.0000, 0.0000, 0.5000, 0.0000])
    """

    #: Residuals are kept (the null object :class:`~lightning_gd.compression.no_memory.NoMemory` has ``False``).
    enabled = True

    def __init__(self) -> None:
        # e_t per key
        self._residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: int | str, grad: torch.Tensor) -> torch.Tensor:
        """Return ``p_t = g_t + e_t`` as a new tensor (``g_t`` is not modified).

        Args:
            key: Tensor stream identifier.
            grad: Local gradient ``g_t``.

        Returns:
            The compensated tensor ``p_t``.

        Raises:
            ValueError: If the stored residual has a different shape than ``grad``.
        """
        e = self._residuals.get(str(key))
        if e is None:
            return grad.clone()
        if e.shape != grad.shape:
            raise ValueError(f"residual for key={key!r} has shape {tuple(e.shape)}, gradient has {tuple(grad.shape)}")
        if e.device != grad.device or e.dtype != grad.dtype:
            # Loaded from a CPU checkpoint: move once and keep it there.
            e = e.to(device=grad.device, dtype=grad.dtype)
            self._residuals[str(key)] = e
        return grad + e

    def update(self, key: int | str, compensated: torch.Tensor, decompressed: torch.Tensor) -> None:
        """Store ``e_{t+1} = p_t - D(C(p_t))``.

        Args:
            key: Tensor stream identifier.
            compensated: ``p_t`` returned by :meth:`compensate`.
            decompressed: Local decompression ``D(C(p_t))`` of what was sent.
        """
        self._residuals[str(key)] = compensated - decompressed.reshape(compensated.shape)

    def residual(self, key: int | str) -> torch.Tensor | None:
        """Current residual ``e`` of ``key`` (live tensor) or ``None``."""
        return self._residuals.get(str(key))

    def set_residual(self, key: int | str, residual: torch.Tensor) -> None:
        """Overwrite the residual of ``key``."""
        self._residuals[str(key)] = residual

    def pop(self, key: int | str) -> torch.Tensor | None:
        """Remove and return the residual of ``key`` (``None`` if absent)."""
        return self._residuals.pop(str(key), None)

    def reset(self) -> None:
        """Drop all residuals."""
        self._residuals.clear()

    def keys(self) -> list[str]:
        """Keys that currently hold a residual."""
        return list(self._residuals)

    def error_norm(self) -> float:
        """Global L2 norm ``sqrt(sum_key ||e_key||^2)`` of all residuals."""
        if not self._residuals:
            return 0.0
        sq = sum(float(torch.linalg.vector_norm(e.double()) ** 2) for e in self._residuals.values())
        return math.sqrt(sq)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the residuals keyed by ``str(key)``."""
        return {k: e.detach().clone() for k, e in self._residuals.items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace all residuals by those of ``state_dict`` (moved to the gradient device lazily)."""
        self._residuals = {str(k): v.detach().clone() for k, v in state_dict.items()}
