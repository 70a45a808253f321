"""diffGrad: Adam with a friction coefficient from the change of the gradient.

Paper: Dubey, Chakraborty, Roy, Mukherjee, Singh, Chaudhuri 2019, "diffGrad: An Optimization Method for
Convolutional Neural Networks", IEEE TNNLS, https://arxiv.org/abs/1909.11015.

For a parameter p with gradient at step t = 1, 2, ... (g_0 = 0 is the "previous gradient" of step 1)::

    g_t  = grad + wd * p                                  # coupled L2 weight decay
    m_t  = b1 m_{t-1} + (1 - b1) g_t
    v_t  = b2 v_{t-1} + (1 - b2) g_t ** 2
    xi_t = sigmoid(|g_{t-1} - g_t|)                       # friction, element-wise, in (0.5, 1)
    p    = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * xi_t * m_t / (sqrt(v_t) + eps)

The original implementation stored a reference to the gradient tensor as g_{t-1}, which the next backward
overwrote in place; here g_{t-1} is a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gd.optim._validation import _adam_defaults, _closure_loss

__all__ = ["DiffGrad"]


class DiffGrad(Optimizer):
    """diffGrad: Adam whose step is damped where the gradient changes little (update in the module docstring).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (>= 0).
        betas: (b1, b2), each in [0, 1).
        eps: Added to sqrt(v) (>= 0).
        weight_decay: Coupled L2 coefficient, added to the gradient (>= 0).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = DiffGrad(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, _adam_defaults(lr, betas, eps, weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DiffGrad does not support sparse gradients")
                state = self.state[p]
                if not state:  # lazy state
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["previous_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                grad = p.grad.add(p, alpha=weight_decay) if weight_decay > 0.0 else p.grad  # g_t
                exp_avg, exp_avg_sq, previous = state["exp_avg"], state["exp_avg_sq"], state["previous_grad"]
                exp_avg.lerp_(grad, 1.0 - beta1)  # m_t
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t
                friction = torch.sigmoid((previous - grad).abs_())  # xi_t
                previous.copy_(grad)  # a copy, not a reference to .grad
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg * friction, exp_avg_sq.sqrt().add_(eps), value=-step_size)
        return loss
