"""Checkpoint helpers for torch's PowerSGD communication hook.

Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization". torch's :class:`~torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState`
is not part of DDP's ``state_dict`` (pytorch issue #75666) and its pickling support
(``__getstate__``/``__setstate__``) keeps the numpy RNG object and logs warnings. These helpers
turn its *internal* state (error feedback, warm-start ``P``/``Q`` memories, iteration counter, RNG,
statistics counters) into plain data and back; hyperparameters stay those of the constructed state
and the process group is never saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

__all__ = ["load_powersgd_state_dict", "powersgd_state_dict"]

_TENSOR_DICTS = ("error_dict", "p_memory_dict", "q_memory_dict")
_COUNTERS = ("iter", "total_numel_before_compression", "total_numel_after_compression", "next_stats_report")


def powersgd_state_dict(state: PowerSGDState) -> dict[str, Any]:
    """Plain-data snapshot of a ``PowerSGDState`` (tensors copied to CPU, keys as ``str``).

    Args:
        state: The PowerSGD hook state.

    Returns:
        ``{"error_dict" | "p_memory_dict" | "q_memory_dict": {str(bucket): tensor}, "iter": int,
        ..., "rng": {"keys": int64 tensor, "pos": int, "has_gauss": int, "cached_gaussian": float}}``.

    Example::

        >>> sd = powersgd_state_dict(powersgd_state)
        >>> torch.save({"powersgd": sd}, "ckpt.pt")
    """
    out: dict[str, Any] = {
        name: {str(k): t.detach().cpu().clone() for k, t in getattr(state, name).items()} for name in _TENSOR_DICTS
    }
    for name in _COUNTERS:
        out[name] = int(getattr(state, name))
    # numpy RandomState: ("MT19937", keys[624] uint32, pos, has_gauss, cached_gaussian)
    _, keys, pos, has_gauss, cached = state.rng.get_state()
    out["rng"] = {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return out


def load_powersgd_state_dict(
    state: PowerSGDState, state_dict: dict[str, Any], device: torch.device | str | None = None
) -> None:
    """Restore a :func:`powersgd_state_dict` snapshot into ``state`` (in place).

    Args:
        state: A freshly constructed ``PowerSGDState`` (its process group and hyperparameters are
            kept).
        state_dict: Output of :func:`powersgd_state_dict`.
        device: Device of the gradient buckets (e.g. ``"cuda:0"``); PowerSGD adds the memories to
            bucket tensors in place, so they must live there. ``None`` keeps them on CPU.

    Example::

        >>> state = PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=10)
        >>> load_powersgd_state_dict(state, torch.load("ckpt.pt")["powersgd"], device="cuda:0")
    """
    for name in _TENSOR_DICTS:
        setattr(
            state,
            name,
            {int(k): t.to(device) if device is not None else t.clone() for k, t in state_dict[name].items()},
        )
    for name in _COUNTERS:
        setattr(state, name, int(state_dict[name]))
    rng = state_dict["rng"]
    keys = np.asarray(rng["keys"].numpy(), dtype=np.uint32)
    state.rng.set_state(("MT19937", keys, rng["pos"], rng["has_gauss"], rng["cached_gaussian"]))
