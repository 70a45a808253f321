"""DGC momentum correction and momentum factor masking.

Lin et al. 2018, "Deep Gradient Compression" (Sec. 3.2). Plain momentum SGD applied *after*
sparsification loses the momentum of the coordinates that were not sent. DGC instead accumulates a
local velocity and sends the accumulated velocity::

    u_t = m * u_{t-1} + g_t            # local velocity (nesterov: u_t = m * (u_{t-1} + g_t))
    v_t = v_{t-1} + u_t                # accumulation (nesterov: v_t = v_{t-1} + u_t + g_t)
    send C(v_t); zero the sent coordinates of both v_t and u_t (momentum factor masking)

``v`` plays the role of the error-feedback residual, and the optimizer must then be plain SGD
*without* momentum (the momentum already lives here).
"""

from __future__ import annotations

import math

import torch

from lightning_gd.utils.checks import check_number

__all__ = ["MomentumCorrection"]


class MomentumCorrection:
    """Per-key DGC velocity ``u`` and accumulation ``v``.

    Args:
        momentum: Momentum factor ``m`` in ``[0, 1)``.
        nesterov: Use the Nesterov variant of the DGC reference implementation.

    Raises:
        ValueError: If ``momentum`` is outside ``[0, 1)``.

    Example::

        >>> from lightning_gd.compression import TopK
        >>> mc, comp = MomentumCorrection(0.9), TopK(0.25)
        >>> v = mc.accumulate(0, torch.tensor([1.0, -3.0, 0.5, 2.0]))  # v_t
        >>> c = comp.compress(v, key=0)
        >>> mc.mask(0, comp.sent_mask(c))  # zero sent coordinates of u and v
        >>> mc.buffers(0)[1]
        tensor([1.0000, 0.0000, 0.5000, 2.0000])
    """

    def __init__(self, momentum: float, nesterov: bool = False) -> None:
        self.momentum = check_number("momentum", momentum, 0, 1, high_open=True)
        self.nesterov = bool(nesterov)
        self._u: dict[str, torch.Tensor] = {}  # u_t
        self._v: dict[str, torch.Tensor] = {}  # v_t

    def accumulate(self, key: int | str, grad: torch.Tensor) -> torch.Tensor:
        """Update ``u`` and ``v`` with ``grad`` and return ``v_t`` (the live buffer).

        The returned tensor is the internal accumulation; compress it, then call :meth:`mask`.

        Args:
            key: Tensor stream identifier.
            grad: Local gradient ``g_t``.

        Returns:
            ``v_t``.
        """
        k = str(key)
        u, v = self._u.get(k), self._v.get(k)
        if u is None or v is None or u.shape != grad.shape:
            u, v = torch.zeros_like(grad), torch.zeros_like(grad)
        elif u.device != grad.device or u.dtype != grad.dtype:
            u = u.to(device=grad.device, dtype=grad.dtype)
            v = v.to(device=grad.device, dtype=grad.dtype)
        m = self.momentum
        if self.nesterov:
            u.add_(grad).mul_(m)  # u_t = m (u_{t-1} + g_t)
            v.add_(u).add_(grad)  # v_t = v_{t-1} + u_t + g_t
        else:
            u.mul_(m).add_(grad)  # u_t = m u_{t-1} + g_t
            v.add_(u)  # v_t = v_{t-1} + u_t
        self._u[k], self._v[k] = u, v
        return v

    def mask(self, key: int | str, sent_mask: torch.Tensor) -> None:
        """Momentum factor masking: zero the sent coordinates of ``u`` and ``v``.

        Args:
            key: Tensor stream identifier.
            sent_mask: Boolean mask of sent coordinates (flat or of the gradient's shape).
        """
        k = str(key)
        u, v = self._u[k], self._v[k]
        m = sent_mask.reshape(v.shape)
        u.masked_fill_(m, 0)
        v.masked_fill_(m, 0)

    def buffers(self, key: int | str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(u, v)`` of ``key`` (live tensors) or ``None``."""
        k = str(key)
        if k not in self._u:
            return None
        return self._u[k], self._v[k]

    def set_buffers(self, key: int | str, u: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite ``(u, v)`` of ``key``."""
        self._u[str(key)], self._v[str(key)] = u, v

    def pop(self, key: int | str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Remove and return ``(u, v)`` of ``key`` (``None`` if absent)."""
        k = str(key)
        if k not in self._u:
            return None
        return self._u.pop(k), self._v.pop(k)

    def reset(self) -> None:
        """Drop all buffers."""
        self._u.clear()
        self._v.clear()

    def keys(self) -> list[str]:
        """Keys that currently hold buffers."""
        return list(self._u)

    def error_norm(self) -> float:
        """Global L2 norm of the accumulations ``v`` (the not-yet-sent mass)."""
        sq = sum(float(torch.linalg.vector_norm(v.double()) ** 2) for v in self._v.values())
        return math.sqrt(sq)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"u": {key: tensor}, "v": {key: tensor}}`` with detached copies."""
        return {
            "u": {k: t.detach().clone() for k, t in self._u.items()},
            "v": {k: t.detach().clone() for k, t in self._v.items()},
        }

    def load_state_dict(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore buffers saved by :meth:`state_dict`."""
        self._u = {str(k): t.detach().clone() for k, t in state_dict["u"].items()}
        self._v = {str(k): t.detach().clone() for k, t in state_dict["v"].items()}
