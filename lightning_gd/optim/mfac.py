"""M-FAC: matrix-free inverse empirical-Fisher preconditioning over a sliding window of gradients.

Paper: Frantar, Kurtic & Alistarh, NeurIPS 2021, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", https://arxiv.org/abs/2107.03356. Official code: IST-DASLab/M-FAC ``optim.py``.

All parameters form one vector of d entries. The window G (m x d, m = ``num_grads``) holds the last m
gradients in a ring buffer, zero rows until it fills, and::

    F = damp * I + (1/m) * sum_i g_i g_i^T                 # empirical Fisher over the window, never formed

At step t::

    g_t = grad + wd * p                                     # coupled L2 weight decay
    G[s] = g_t,  s = (t - 1) mod m                          # replace the oldest row first ...
    K[s, :] = K[:, s] = G g_t                               # ... and its row of the Gram matrix K = G G^T: O(md)
    A = m I + K / damp = R R^T                              # the m x m system, factorized: O(m^3), m << d
    u_t = F^-1 g_t = (m / damp) * G^T A^-1 e_s              # then multiply: O(m^2) + O(md)
    v_t = mu v_{t-1} + (1 - mu) u_t                         # momentum
    p   = p - lr * v_t

The identity behind the last line is Woodbury's, F^-1 = I/damp - G^T A^-1 G / damp^2, applied to g_t = G^T e_s
(A^-1 K / damp = I - m A^-1). Unrolled over the rows of G it is the paper's recursion of m Sherman-Morrison
updates starting from I/damp, whose unpivoted LU form is the factorization of A: here its symmetric form
(Cholesky, computed in float64 since the m x m part is cheap). The paper's costs hold: O(dm + m^2) for a product, O(dm
+ m^3) to replace a gradient in the window; a d x d matrix is never built.

Memory: the window is m x d floats of the parameters' dtype (4 m d bytes in float32; 1024 x 25.6M for
ResNet-50 would be 105 GB), plus two m x m matrices. A configuration needing more than
``max_memory_gb`` is refused at construction, so use M-FAC for small models or a subset of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gd.optim._validation import _closure_loss
from lightning_gd.utils.checks import check_number, check_positive_int

__all__ = ["MFAC"]


class MFAC(Optimizer):
    """M-FAC: precondition each step by the inverse of a windowed empirical Fisher (update in the module docstring).

    ``num_grads`` and ``damp`` are global (one window over all parameters, as in the paper); ``lr``,
    ``momentum`` and ``weight_decay`` may differ per parameter group. The window, the Gram matrix, the
    Cholesky factor (the coefficients), all in the parameters' dtype so ``load_state_dict`` keeps them
    bit-exact, and the momentum buffers are optimizer state and round-trip through
    ``state_dict()``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (>= 0).
        momentum: mu in [0, 1); ``v = mu v + (1 - mu) F^-1 g``.
        weight_decay: Coupled L2 coefficient added to the gradient before it enters the window (>= 0).
        num_grads: m, the window length (>= 1).
        damp: The Fisher's dampening (> 0).
        max_memory_gb: Refuse a window (m x d floats plus the m x m matrices) larger than this many GB (> 0).

    Example::

        >>> import torch
        >>> small_model = torch.nn.Linear(4, 2)
        >>> opt = MFAC(small_model.parameters(), lr=1e-3, num_grads=64, damp=1e-4)
        >>> small_model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> opt.memory_bytes()  # bytes: the ring buffer of 64 gradients of 10 floats, and the 64 x 64 matrices
        35336
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_grads: int = 1024,
        damp: float = 1e-5,
        max_memory_gb: float = 4.0,
    ) -> None:
        defaults = dict(
            lr=check_number("lr", lr, 0),
            momentum=check_number("momentum", momentum, 0, 1, high_open=True),
            weight_decay=check_number("weight_decay", weight_decay, 0),
        )
        self.num_grads = check_positive_int("num_grads", num_grads)
        self.damp = check_number("damp", damp, 0, low_open=True)
        self.max_memory_gb = check_number("max_memory_gb", max_memory_gb, 0, low_open=True)
        super().__init__(params, defaults)
        first = self.param_groups[0]["params"][0]
        d = sum(p.numel() for group in self.param_groups for p in group["params"])
        need = (num_grads * d + 2 * num_grads * num_grads) * first.element_size()
        if need > max_memory_gb * 1e9:
            raise ValueError(
                f"M-FAC with `num_grads`={num_grads} over d={d} parameters needs {need / 1e9:.2f} GB "
                f"(m x d = {num_grads * d} floats), above `max_memory_gb`={max_memory_gb}: lower num_grads, "
                "precondition a subset of the layers, or raise max_memory_gb"
            )

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _window(self) -> dict[str, Tensor]:
        """The shared state (window, Gram matrix, factor), kept on the first parameter so it is checkpointed."""
        first = self.param_groups[0]["params"][0]
        state = self.state[first]
        if "grads" not in state:  # lazy state
            m = self.num_grads
            d = sum(p.numel() for p in self._params())
            state["grads"] = torch.zeros(m, d, dtype=first.dtype, device=first.device)  # G
            state["gram"] = torch.zeros(m, m, dtype=first.dtype, device=first.device)  # K = G G^T
            state["coef"] = torch.eye(m, dtype=first.dtype, device=first.device) * m**0.5  # R of A = m I
            state["slot"] = torch.tensor(0, dtype=torch.long)
        return state

    def inverse_fisher_product(self, x: Tensor) -> Tensor:
        """F^-1 x for a flat vector x of d entries, with the current window: x/damp - G^T A^-1 G x / damp^2."""
        state = self._window()
        grads, chol = state["grads"], state["coef"]
        coeff = torch.cholesky_solve((grads @ x.to(grads.dtype)).double().unsqueeze(1), chol.double()).squeeze(1)
        return x / self.damp - grads.T @ coeff.to(grads.dtype) / self.damp**2

    def memory_bytes(self) -> int:
        """Bytes held in this optimizer's state (the window dominates: m x d floats)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        if not any(p.grad is not None for p in self._params()):
            return loss
        state = self._window()
        grads, gram = state["grads"], state["gram"]
        m, damp = self.num_grads, self.damp
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    pieces.append(torch.zeros(p.numel(), dtype=grads.dtype, device=grads.device))
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] > 0.0 else p.grad
                pieces.append(g.reshape(-1).to(grads.dtype))
        g_t = torch.cat(pieces)  # g_t = grad + wd * p, flattened
        s = int(state["slot"].item())
        grads[s] = g_t  # G[s] = g_t (the oldest row)
        row = grads @ g_t  # G g_t: O(md)
        gram[s, :] = row
        gram[:, s] = row  # K = G G^T
        system = gram.double() / damp
        system.diagonal().add_(m)  # A = m I + K / damp
        chol = torch.linalg.cholesky(system)  # A = R R^T: O(m^3)
        state["coef"] = chol.to(grads.dtype)
        e_s = torch.zeros(m, 1, dtype=torch.float64, device=grads.device)
        e_s[s] = 1.0
        weights = torch.cholesky_solve(e_s, chol).squeeze(1) * (m / damp)  # (m / damp) A^-1 e_s
        update = grads.T @ weights.to(grads.dtype)  # u_t = F^-1 g_t: O(md)
        state["slot"] = torch.tensor((s + 1) % m, dtype=torch.long)
        offset = 0
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                n = p.numel()
                u = update[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
                if p.grad is None:
                    continue
                if mu > 0.0:
                    pstate = self.state[p]
                    if "momentum_buffer" not in pstate:
                        pstate["momentum_buffer"] = torch.zeros_like(p)
                    buf = pstate["momentum_buffer"]
                    buf.mul_(mu).add_(u, alpha=1.0 - mu)  # v_t = mu v_{t-1} + (1 - mu) u_t
                    u = buf
                p.add_(u, alpha=-group["lr"])  # p = p - lr * v_t
        return loss
