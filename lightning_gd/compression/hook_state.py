"""The protocol every compressed-communication hook state implements, and its one checkpoint format.

A hook state owns everything of one compressor inside DDP: the communication hook, the byte accounting, the
memories and their checkpoint, and the dense warm-up / density schedule. The Lightning strategy drives any of
them through this protocol alone, without knowing which compressor runs.

Checkpoint format (``format_version`` 2)::

    {"format_version": 2, "compressor": "TopK", "world_size": P, "ranks": {rank: <that rank's state>}}

The unversioned layouts written before it (commit 5545262 and earlier: ``{"kind": "hook" | "powersgd", ...}``,
or a hook state's ``{"version": 1, ...}``) are upgraded on load.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist
from torch import nn

from lightning_gd.utils.ranks import gather_from_ranks

__all__ = ["HookState"]

_FORMAT_VERSION = 2


@runtime_checkable
class HookState(Protocol):
    """State of a DDP communication hook that compresses the gradient exchange.

    :class:`~lightning_gd.compression.CompressionHookState` (top-k, random-k, sign, QSGD) and
    :class:`~lightning_gd.compression.PowerSGDHookState` implement it.

    Attributes:
        step: Number of completed hook steps (backward passes that synchronised).
        warmup_steps: Number of initial hook steps sent dense.
        single_bucket_on_gloo: The hook issues collectives from future callbacks, which gloo cannot order
            across several buckets: a strategy must then use one bucket on CPU.

    Example::

        >>> from lightning_gd.compression import CompressionHookState, TopK
        >>> state = CompressionHookState(TopK(0.01), warmup_steps=10)
        >>> isinstance(state, HookState)
        True
        >>> # state.register(ddp_model): before the first backward
    """

    step: int
    warmup_steps: int
    single_bucket_on_gloo: bool

    def register(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Register the hook on ``ddp`` (once, before the first backward) and name memories by its module."""
        ...

    def stats(self) -> dict[str, float]:
        """Accounting of the last completed step: ``bytes_sent``, ``dense_bytes``, ``ratio``, ``density``,
        ``error_norm`` (empty before the first step)."""
        ...

    def density_at(self, step: int) -> float | None:
        """Fraction of coordinates a compressed bucket sends at hook step ``step`` (1.0 during the dense
        warm-up); ``None`` where it depends on the tensors' shapes (PowerSGD)."""
        ...

    def check_optimizer(self, param_groups: list[dict[str, Any]]) -> None:
        """Raise ``ValueError`` (or warn) when the optimizer does not suit the compressor and its memory."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Collective: every rank's state, in the checkpoint format above (plain data, tensors on CPU)."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's state from :meth:`state_dict` (or an older format).

        Raises:
            ValueError: for another compressor's state or an unknown format version (naming both).
        """
        ...


# ---------------------------------------------------------------------- helpers for implementations
def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(compressor: str, local: dict[str, Any], group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Collective: every rank's ``local`` state in the checkpoint format."""
    gathered = gather_from_ranks(local, group)
    return {
        "format_version": _FORMAT_VERSION,
        "compressor": compressor,
        "world_size": len(gathered),
        "ranks": dict(enumerate(gathered)),
    }


def _upgrade(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint format from any format this package wrote (rank states are upgraded by their owner)."""
    sd = state_dict.get("state", state_dict) if state_dict.get("kind") == "hook" else state_dict
    if "format_version" in sd:
        if sd["format_version"] != _FORMAT_VERSION:
            raise ValueError(
                f"compression state has format_version={sd['format_version']!r}; this lightning_gd reads format"
                f" {_FORMAT_VERSION} and the unversioned format of commit 5545262"
            )
        return sd
    if sd.get("kind") == "powersgd":  # strategy checkpoint of commit 5545262
        return {**sd, "format_version": _FORMAT_VERSION, "compressor": "PowerSGD"}
    if sd.get("version") == 1:  # CompressionHookState of commit 5545262: gathered, or one rank's
        per_rank = sd.get("format") == "per_rank"
        ranks = sd["ranks"] if per_rank else {sd.get("rank") or 0: sd}
        world = sd["world_size"] if per_rank else sd.get("world_size") or 1
        return {"format_version": _FORMAT_VERSION, "compressor": sd["compressor_class"], "world_size": world,
                "ranks": ranks}  # fmt: skip
    raise ValueError(
        f"compression state has version={sd.get('version')!r} and no format_version; this lightning_gd reads"
        f" format {_FORMAT_VERSION} and the unversioned format of commit 5545262"
    )


def _pick_rank(
    state_dict: dict[str, Any], compressor: str, rank: int, world: int
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """This rank's saved state (``None`` if it has none) and a rank state to take the shared parts from.

    A rank restores only the memory saved under its own rank id, even if the world size changed (the pending
    gradient mass is then averaged over the new world): another rank's memory would be applied twice.
    """
    sd = _upgrade(state_dict)
    if sd["compressor"] != compressor:
        raise ValueError(
            f"the checkpoint holds compression state of {sd['compressor']!r}, this run uses {compressor!r}"
        )
    ranks = {int(r): v for r, v in sd["ranks"].items()}
    if int(sd["world_size"]) != world and rank == 0:  # the same on every rank: said once
        dropped = sorted(r for r in ranks if r >= world)
        warnings.warn(
            f"compression state saved with world size {sd['world_size']}, now {world}: every rank keeps the memory"
            f" saved under its own rank id; memories of ranks {dropped} dropped, new ranks start at zero",
            stacklevel=3,
        )
    own = ranks.get(rank)
    if own is None:
        warnings.warn(f"no compression memory saved for rank {rank}: starting from zero", stacklevel=3)
    return own, own if own is not None else ranks[min(ranks)]
