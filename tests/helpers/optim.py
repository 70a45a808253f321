"""Exact resume of an optimizer from its ``state_dict``: the same steps uninterrupted and split in two."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["run_and_resume"]


def _steps(opt: torch.optim.Optimizer, w: torch.nn.Parameter, grads: Sequence[Tensor]) -> None:
    for g in grads:
        w.grad = g.clone()
        opt.step()


def run_and_resume(
    make: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    w0: Tensor,
    grads: Sequence[Tensor],
    split: int,
    after_load: Callable[[torch.optim.Optimizer, torch.nn.Parameter], Any] | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Step ``make([w])`` from ``w0`` through ``grads``; again through ``grads[:split]``, then a new optimizer
    loaded from the first one's ``state_dict`` (``after_load(opt, w)`` sees it) through the rest.

    Returns ``(uninterrupted weights, resumed weights, the saved state_dict)``.

    Example::

        full, resumed, _ = run_and_resume(lambda w: DiffGrad([w], lr=0.01), torch.ones(3), grads, split=3)
        assert torch.equal(resumed, full)
    """
    w = torch.nn.Parameter(w0.clone())
    _steps(make(w), w, grads)
    w2 = torch.nn.Parameter(w0.clone())
    opt2 = make(w2)
    _steps(opt2, w2, grads[:split])
    saved = opt2.state_dict()
    w3 = torch.nn.Parameter(w2.detach().clone())
    opt3 = make(w3)
    opt3.load_state_dict(saved)
    if after_load is not None:
        after_load(opt3, w3)
    _steps(opt3, w3, grads[split:])
    return w.detach(), w3.detach(), saved
