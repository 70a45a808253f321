"""What the optimizers share: the ``betas`` check (every other number is
:func:`lightning_gd.utils.checks.check_number`), Adam's checked defaults and the closure of ``step``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gd.utils.checks import check_number

__all__: list[str] = []


def _check_betas(value: Any, name: str = "betas") -> tuple[float, float]:
    """Return ``value`` as a pair of floats, each in [0, 1)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"`{name}` must be a pair (beta1, beta2), got {value!r}")
    return (
        check_number(f"{name}[0]", value[0], 0, 1, high_open=True),
        check_number(f"{name}[1]", value[1], 0, 1, high_open=True),
    )


def _adam_defaults(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> dict[str, Any]:
    """Adam's four hyperparameters, checked: ``lr``, ``eps`` and ``weight_decay`` >= 0, ``betas`` in [0, 1)."""
    return dict(
        lr=check_number("lr", lr, 0),
        betas=_check_betas(betas),
        eps=check_number("eps", eps, 0),
        weight_decay=check_number("weight_decay", weight_decay, 0),
    )


def _closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The torch.optim contract: re-evaluate the model with gradients on (``step`` runs under ``no_grad``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
