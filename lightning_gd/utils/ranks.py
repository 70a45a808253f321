"""Decisions every rank must take together, and per-rank state gathered for a checkpoint.

Every call here is a collective under ``torch.distributed``: call it on every rank, or no rank returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["finite_on_every_rank", "gather_from_ranks"]


def finite_on_every_rank(trainer: Trainer, values: Tensor) -> bool:
    """Whether ``values`` are finite on every rank (one collective under DDP; every rank gets the same answer)."""
    bad = not bool(torch.isfinite(values.detach()).all())
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    return not bad


def gather_from_ranks(local: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``local`` (picklable) object, indexed by rank: ``[local]`` without a process group.

    The one gather of per-rank checkpoint state (RNG states, compression memories, ConAdv's pending batches):
    ``torch.distributed.all_gather_object`` over ``group`` (``None``: the default group).

    Example::

        # not run: inside a callback's on_save_checkpoint, on every rank
        checkpoint["mine"] = {"ranks": dict(enumerate(gather_from_ranks(self.local_state())))}
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    world = dist.get_world_size(group)
    if world == 1:
        return [local]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    return gathered
