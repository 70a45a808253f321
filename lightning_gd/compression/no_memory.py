"""The memory of a compressor run without error feedback: a null object with :class:`ErrorFeedback`'s interface."""

from __future__ import annotations

import torch

__all__ = ["NoMemory"]


class NoMemory:
    """No residual: ``compensate`` passes the gradient through, ``update`` forgets what was not sent.

    :class:`~lightning_gd.compression.CompressionHookState` holds one instead of an
    :class:`~lightning_gd.compression.error_feedback.ErrorFeedback` when error feedback is off (QSGD by default)
    or when DGC's momentum correction keeps the residual itself, so the hook runs one code path either way.

    Example::

        >>> mem = NoMemory()
        >>> g = torch.ones(3)
        >>> mem.compensate("w", g) is g, mem.residual("w"), mem.enabled
        (True, None, False)
    """

    #: Whether residuals are kept (``ErrorFeedback.enabled`` is ``True``).
    enabled = False

    def compensate(self, key: int | str, grad: torch.Tensor) -> torch.Tensor:
        """``p_t = g_t``: the gradient itself (not a copy)."""
        return grad

    def update(self, key: int | str, compensated: torch.Tensor, decompressed: torch.Tensor) -> None:
        """Nothing is kept."""

    def residual(self, key: int | str) -> torch.Tensor | None:
        return None

    def set_residual(self, key: int | str, residual: torch.Tensor) -> None:
        """Nothing is kept."""

    def pop(self, key: int | str) -> torch.Tensor | None:
        return None

    def reset(self) -> None:
        """Nothing to drop."""

    def keys(self) -> list[str]:
        return []

    def error_norm(self) -> float:
        return 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Nothing to load."""
