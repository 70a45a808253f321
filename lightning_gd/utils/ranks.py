"""Decisions every rank must take together, so that no rank waits alone in a collective."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["finite_on_every_rank"]


def finite_on_every_rank(trainer: Trainer, values: Tensor) -> bool:
    """Whether ``values`` are finite on every rank (one collective under DDP; every rank gets the same answer)."""
    bad = not bool(torch.isfinite(values.detach()).all())
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    return not bad
