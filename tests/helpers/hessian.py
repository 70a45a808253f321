"""Exact dense Hessians for tests: the references every curvature estimate is checked against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["dense_hessian_of", "exact_hessian", "unflatten", "untouched"]


def unflatten(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    """``{name: tensor}`` from one flat vector, cut in ``names``' order to ``shapes``."""
    parts = flat.split([s.numel() for s in shapes])
    return {n: c.view(s) for n, c, s in zip(names, parts, shapes, strict=True)}


def dense_hessian_of(module: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
    """Exact Hessian of ``loss(params)`` w.r.t. the module's trainable parameters, flattened in named order.

    ``loss`` gets the parameters as ``{name: tensor}`` (for ``torch.func.functional_call``).

    Example::

        H = dense_hessian_of(model, lambda p: F.mse_loss(functional_call(model, p, (x,)), y))
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(lambda flat: loss(unflatten(flat, names, shapes)), flat0)


def exact_hessian(module: nn.Module, batch: Any) -> Tensor:
    """Dense Hessian of the module's eval-mode mean cross-entropy on ``batch = (x, y)`` (leaves it in train mode).

    Example::

        H = exact_hessian(model.double(), (x.double(), y))
    """
    x, y = batch
    module.eval()
    H = dense_hessian_of(module, lambda params: F.cross_entropy(functional_call(module, params, (x,)), y))
    module.train()
    return H


def untouched(model: nn.Module) -> Callable[[], None]:
    """Give every parameter a gradient of 0.5, record what a measurement must leave as it was, and return the check.

    The check asserts that the global RNG state, every module's train/eval mode, every gradient (the same tensor,
    still 0.5) and every buffer (the same tensor, the same values) are as recorded.

    Example::

        check = untouched(model)
        HessianOperator(model, loss_fn, batch).matvec(v)
        check()
    """
    grads = {}
    for name, param in model.named_parameters():
        param.grad = torch.full_like(param, 0.5)
        grads[name] = param.grad
    buffers = {n: (b, b.clone()) for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()

    def check() -> None:
        assert torch.equal(torch.get_rng_state(), rng)
        assert {n: m.training for n, m in model.named_modules()} == modes
        for name, param in model.named_parameters():
            assert param.grad is grads[name] and bool((param.grad == 0.5).all()), name
        for name, buf in model.named_buffers():
            assert buf is buffers[name][0] and torch.equal(buf, buffers[name][1]), name

    return check
