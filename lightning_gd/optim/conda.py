"""Conda: Column-Normalized Adam.

Paper: Wang et al. 2025, "Conda: Column-Normalized Adam for Training Large Language Models Faster",
https://arxiv.org/abs/2509.24218. Official code: https://github.com/jie040109/Conda (rewritten here without
``transformers`` and with the projection basis kept as a tensor in optimizer state).

For a 2-D weight W with r rows and c columns, gradient g_t, step t = 1, 2, ...::

    m_t = b1 m_{t-1} + (1 - b1) g_t
    if (t - 1) % update_proj_gap == 0:  U, S, Vh = svd(m_t)              # float32, thin; basis P
        P = Vh  (c x c) if r >= c:   proj(X) = X P^T,   back(Y) = Y P
        P = U   (r x r) otherwise:   proj(X) = P^T X,   back(Y) = P Y
    g'_t = proj(g_t),  m'_t = proj(m_t)
    v_t  = b2 v_{t-1} + (1 - b2) g'_t ** 2                                # element-wise, shape of g'_t
    W    = W - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * back(m'_t / (sqrt(v_t) + eps))
    W    = W - lr * wd * W                                                # decoupled decay, after the update

Because P is orthogonal and v_t is normalized per projected column, the update is Adam in the eigenbasis of
the momentum: spectrally better conditioned than Adam, still coordinate-wise adaptive.

Parameters that are not 2-D, and any parameter group with ``conda=False`` (embeddings, the output head, as
in the official scripts), take a plain AdamW step with the same hyper-parameters (the same bias-corrected
step size and decay order, without ``scale``)::

    m_t = b1 m_{t-1} + (1 - b1) g_t;  v_t = b2 v_{t-1} + (1 - b2) g_t ** 2
    p   = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps);  p = p - lr * wd * p
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gd.optim._validation import _adam_defaults, _closure_loss
from lightning_gd.utils.checks import check_number, check_positive_int

__all__ = ["Conda"]


def _project(x: Tensor, basis: Tensor, rows_ge_cols: bool) -> Tensor:
    return x @ basis.T if rows_ge_cols else basis.T @ x


def _project_back(y: Tensor, basis: Tensor, rows_ge_cols: bool) -> Tensor:
    return y @ basis if rows_ge_cols else basis @ y


class Conda(Optimizer):
    """Column-Normalized Adam (Conda) for 2-D weights, AdamW for everything else.

    The update is written out in the module docstring. The SVD basis is recomputed from the updated first
    moment at the first step and every ``update_proj_gap`` steps; it is optimizer state (a tensor), so
    ``state_dict()`` / ``load_state_dict()`` continue a run exactly.

    Args:
        params: Parameters or parameter groups. A group may set ``conda=False`` to take the AdamW step.
        lr: Learning rate (>= 0).
        betas: (b1, b2), each in [0, 1).
        eps: Added to sqrt(v) (>= 0).
        weight_decay: Decoupled decay, applied after the update (>= 0).
        update_proj_gap: Steps between SVDs of the first moment (>= 1).
        scale: Multiplier of the projected update (> 0); the LLaMA runs of the paper used 0.25.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> hidden = [p for p in model.parameters() if p.ndim == 2]  # Conda on hidden matrices
        >>> rest = [p for p in model.parameters() if p.ndim != 2]  # AdamW for the rest
        >>> opt = Conda([{"params": hidden}, {"params": rest, "conda": False}], lr=0.01, betas=(0.9, 0.99), scale=0.25)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_proj_gap: int = 2000,
        scale: float = 1.0,
    ) -> None:
        defaults = dict(
            **_adam_defaults(lr, betas, eps, weight_decay),
            update_proj_gap=check_positive_int("update_proj_gap", update_proj_gap),
            scale=check_number("scale", scale, 0, low_open=True),
            conda=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay, gap = group["weight_decay"], group["update_proj_gap"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Conda does not support sparse gradients")
                grad = p.grad
                state = self.state[p]
                projected = group["conda"] and p.ndim == 2
                if not state:  # lazy state
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if not projected:
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t_before = int(state["step"].item())
                state["step"] += 1
                t = t_before + 1
                exp_avg = state["exp_avg"]
                exp_avg.lerp_(grad, 1.0 - beta1)  # m_t = b1 m_{t-1} + (1 - b1) g_t
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                if projected:
                    rows_ge_cols = p.shape[0] >= p.shape[1]
                    if t_before % gap == 0 or "basis" not in state:
                        u, _, vh = torch.linalg.svd(exp_avg.float(), full_matrices=False)
                        state["basis"] = (vh if rows_ge_cols else u).to(p.dtype)  # P
                    basis = state["basis"]
                    grad_proj = _project(grad, basis, rows_ge_cols)  # g'_t
                    exp_avg_proj = _project(exp_avg, basis, rows_ge_cols)  # m'_t
                    if "exp_avg_sq" not in state:
                        state["exp_avg_sq"] = torch.zeros_like(grad_proj)
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2).addcmul_(grad_proj, grad_proj, value=1.0 - beta2)  # v_t
                    normalized = exp_avg_proj / (exp_avg_sq.sqrt() + eps)  # m'_t / (sqrt(v_t) + eps)
                    update = _project_back(normalized, basis, rows_ge_cols)
                    p.add_(update, alpha=-step_size * group["scale"])
                else:
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t
                    p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)
                if weight_decay > 0.0:
                    p.add_(p, alpha=-lr * weight_decay)  # W = W - lr * wd * W
        return loss
