"""Checkpoint helpers for torch's PowerSGD communication hook.

Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization". torch's :class:`~torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState`
is not part of DDP's ``state_dict`` (pytorch issue #75666) and its pickling support
(``__getstate__``/``__setstate__``) keeps the numpy RNG object and logs warnings. These helpers
turn its *internal* state (error feedback, warm-start ``P``/``Q`` memories, iteration counter, RNG,
statistics counters) into plain data and back; hyperparameters stay those of the constructed state
and the process group is never saved. :class:`PowerSGDLayoutState` and :func:`powersgd_layout_hook`
keep the memories attached to their parameters when DDP regroups its buckets (as after a restart).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, _should_compress, powerSGD_hook

__all__ = ["PowerSGDLayoutState", "load_powersgd_state_dict", "powersgd_layout_hook", "powersgd_state_dict"]

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


_Layout = list[tuple[str, tuple[int, ...]]]  # (parameter name, shape) in bucket order


class PowerSGDLayoutState:
    """A ``PowerSGDState`` whose memories follow the parameters when DDP changes its bucket layout.

    torch keys PowerSGD's error and Q memories by bucket index, in the order of the bucket's tensors. DDP
    builds its buckets once at wrap time and rebuilds them after the first iteration (another grouping and
    order), so memories restored into a restarted job would be applied to the wrong entries. This wrapper
    records each bucket's parameter layout; on a change it cuts the memories into per-parameter pieces and
    re-assembles them for the new layout before torch's hook runs (use :func:`powersgd_layout_hook`).

    Args:
        state: The PowerSGD state (its hyperparameters and process group are used as they are).
        module: The model whose ``named_parameters`` name the pieces (the module wrapped by DDP).

    Example::

        >>> layout_state = PowerSGDLayoutState(PowerSGDState(None, start_powerSGD_iter=10), model)
        >>> ddp_model.register_comm_hook(layout_state, powersgd_layout_hook)
    """

    def __init__(self, state: PowerSGDState, module: torch.nn.Module) -> None:
        self.state = state
        self.names = {p.data_ptr(): name for name, p in module.named_parameters()}
        self.layouts: dict[int, _Layout] = {}
        self._pieces: dict[str, dict[str, torch.Tensor]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """:func:`powersgd_state_dict` plus the bucket layouts the memories are ordered by."""
        out = powersgd_state_dict(self.state)
        out["layouts"] = {str(k): [[n, list(s)] for n, s in layout] for k, layout in self.layouts.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any], device: torch.device | str | None = None) -> None:
        load_powersgd_state_dict(self.state, state_dict, device=device)
        self.layouts = {int(k): [(n, tuple(s)) for n, s in v] for k, v in state_dict.get("layouts", {}).items()}
        self._pieces = None

    # ------------------------------------------------------------------ layout changes
    def _compressed_order(self, layout: _Layout) -> list[tuple[str, int]]:
        """(name, Q size) of the tensors torch compresses, in its Q-memory order (grouped by matrix shape)."""
        groups: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for name, shape in layout:
            n = shape[0] if shape else 1
            m = math.prod(shape) // n if n else 0
            r = min(n, m, self.state.matrix_approximation_rank)
            if _should_compress(n, m, r, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((name, m * r))
        return [item for group in groups.values() for item in group]

    def _dissolve(self) -> None:
        """Cut every bucket's error and Q memory into per-parameter pieces."""
        st, pieces = self.state, {}
        for key, layout in self.layouts.items():
            error = st.error_dict.pop(key, None)
            if error is not None:
                sizes = [math.prod(s) for _, s in layout]
                for (name, _), piece in zip(layout, error.split(sizes), strict=True):
                    pieces.setdefault(name, {})["error"] = piece.clone()
            q = st.q_memory_dict.pop(key, None)
            st.p_memory_dict.pop(key, None)
            if q is not None:
                order = self._compressed_order(layout)
                for (name, _), piece in zip(order, q.split([s for _, s in order]), strict=True):
                    pieces.setdefault(name, {})["q"] = piece.clone()
        self.layouts = {}
        self._pieces = pieces

    def _assemble(self, key: int, layout: _Layout) -> None:
        assert self._pieces is not None
        st, pieces = self.state, self._pieces
        like = next((t for p in pieces.values() for t in p.values()), None)
        if like is None:
            return
        if any("error" in pieces.get(name, {}) for name, _ in layout):
            st.error_dict[key] = torch.cat(
                [pieces.get(name, {}).get("error", like.new_zeros(math.prod(s))) for name, s in layout]
            )
        order = self._compressed_order(layout)
        if order and all("q" in pieces.get(name, {}) for name, _ in order):
            st.q_memory_dict[key] = torch.cat([pieces[name]["q"] for name, _ in order])
            st.p_memory_dict[key] = like.new_empty(self._total_ps(layout))  # P is recomputed from Q every step

    def _total_ps(self, layout: _Layout) -> int:
        shapes = dict(layout)
        total = 0
        for name, q_size in self._compressed_order(layout):
            n = shapes[name][0]
            total += n * (q_size // (math.prod(shapes[name]) // n))  # n * r
        return total


def powersgd_layout_hook(state, bucket):  # noqa: ANN001, ANN201 (DDP rejects string annotations)
    """DDP comm hook: torch's PowerSGD with memories re-mapped across bucket-layout changes."""
    key = bucket.index()
    layout = [(state.names[p.data_ptr()], tuple(p.shape)) for p in bucket.parameters()]
    recorded = state.layouts.get(key)
    if state._pieces is None and recorded is not None and recorded != layout:
        state._dissolve()
    if state._pieces is not None:
        state._assemble(key, layout)
    state.layouts[key] = layout
    if bucket.is_last():
        state._pieces = None
    return powerSGD_hook(state.state, bucket)
