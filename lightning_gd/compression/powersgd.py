"""Checkpoint helpers for torch's PowerSGD communication hook.

Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization". torch's :class:`~torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState`
is not part of DDP's ``state_dict`` (pytorch issue #75666) and its pickling support
(``__getstate__``/``__setstate__``) keeps the numpy RNG object and logs warnings. These helpers
turn its *internal* state (error feedback, warm-start ``P``/``Q`` memories, iteration counter, RNG,
statistics counters) into plain data and back; hyperparameters stay those of the constructed state
and the process group is never saved. :class:`PowerSGDHookState` runs torch's hook behind the
:class:`~lightning_gd.compression.HookState` protocol: byte accounting, every rank's state in the checkpoint,
and memories that stay attached to their parameters when DDP regroups its buckets (as after a restart).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from lightning_gd._compat import powersgd_should_compress
from lightning_gd.compression.hook import _WARMUP_DTYPES, WarmupDtype
from lightning_gd.compression.hook_state import _gather, _pick_rank, _rank_and_world
from lightning_gd.compression.layout import BucketLayouts, Layout
from lightning_gd.utils.checks import check_choice, check_positive_int

__all__ = ["PowerSGDHookState", "load_powersgd_state_dict", "powersgd_state_dict"]

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

        # not run: needs the PowerSGD state of a DDP process group (tests/compression runs it in 2 gloo processes)
        sd = powersgd_state_dict(powersgd_state)
        torch.save({"powersgd": sd}, "ckpt.pt")
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

        # not run: needs a DDP process group and a GPU (device="cuda:0")
        state = PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=10)
        load_powersgd_state_dict(state, torch.load("ckpt.pt")["powersgd"], device="cuda:0")
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


class PowerSGDHookState:
    """torch's PowerSGD hook behind the :class:`~lightning_gd.compression.HookState` protocol.

    torch keys PowerSGD's error and Q memories by bucket index, in the order of the bucket's tensors, and DDP
    regroups its buckets after the first iteration and after a restart; the memories are re-mapped per
    parameter (:class:`~lightning_gd.compression.layout.BucketLayouts`) before torch's hook runs, so a resumed
    run continues exactly. Bytes: tensors PowerSGD compresses send ``(n + m) * rank`` entries, the others
    (vectors, small matrices) go dense.

    Args:
        powersgd_rank: Rank of the low-rank approximation (torch's ``matrix_approximation_rank``).
        error_feedback: Keep PowerSGD's error memory (``None``: on).
        warmup_steps: Dense steps before compression (torch's ``start_powerSGD_iter``, at least 2 with error
            feedback).
        seed: Seed of the random initial Q.
        min_compression_rate: A matrix is compressed when it shrinks by more than this factor.
        process_group: Group to communicate in (default: the world group).
        warmup_dtype: dtype of the dense warm-up steps' allreduce: ``"bfloat16"`` sends half the bytes (torch's
            ``bf16_compress_hook``), which halves the warm-up's cost on a slow link.

    The sparse compressors' hook options (``momentum_correction``, ``density_warmup_*``, ``min_numel``) are not
    arguments here: the registry entry declares the options PowerSGD accepts, and
    :func:`~lightning_gd.compression.make_hook_state` refuses the others.

    Raises:
        ValueError: for a bad argument, naming it and its value.

    Example::

        # not run: needs a DDP process group (tests/compression runs it in 2 gloo processes)
        state = PowerSGDHookState(powersgd_rank=2, warmup_steps=10)
        state.register(ddp_model)
    """

    single_bucket_on_gloo = True  # torch's hook issues collectives from future callbacks

    def __init__(
        self,
        powersgd_rank: int = 1,
        error_feedback: bool | None = True,
        warmup_steps: int = 0,
        seed: int = 0,
        min_compression_rate: float = 2,
        process_group: dist.ProcessGroup | None = None,
        warmup_dtype: WarmupDtype = "float32",
    ) -> None:
        check_positive_int("powersgd_rank", powersgd_rank)
        self.warmup_dtype = check_choice("warmup_dtype", warmup_dtype, _WARMUP_DTYPES)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.state = PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(2, warmup_steps),  # torch needs >= 2 with error feedback
            min_compression_rate=min_compression_rate,
            use_error_feedback=error_feedback is not False,
            warm_start=True,
            random_seed=seed,
        )
        self.step = 0
        self.layouts = BucketLayouts(self._segments)
        self._names: dict[int, str] = {}
        self._counts = (0, 0)  # torch's cumulative (numel before, numel after) at the end of the last step
        self._acc = [0, 0, 0]  # this step's (numel, bytes, bf16 warm-up bytes) of the buckets
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ HookState
    def register(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Register the layout-aware PowerSGD hook on ``ddp``."""
        self._names = {p.data_ptr(): name for name, p in ddp.module.named_parameters()}
        ddp.register_comm_hook(self, _powersgd_hook)

    def density_at(self, step: int) -> float | None:
        return 1.0 if step < self.state.start_powerSGD_iter else None

    def check_optimizer(self, param_groups: list[dict[str, Any]]) -> None:
        """Every optimizer suits PowerSGD (it keeps its own memory)."""

    def stats(self) -> dict[str, float]:
        if not self._last:
            return {}
        errors = list(self.state.error_dict.values())
        error_norm = float(torch.sqrt(sum((e.float() ** 2).sum() for e in errors))) if errors else 0.0
        return {**self._last, "error_norm": error_norm}

    def state_dict(self) -> dict[str, Any]:
        """Collective: every rank's step, PowerSGD counters and RNG, and its memories per parameter."""
        local = powersgd_state_dict(self.state)
        for name in _TENSOR_DICTS:
            del local[name]
        local["step"] = self.step
        local["memory"] = self.layouts.state_dict(self._memory_of)
        return _gather("PowerSGD", local, self.state.process_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's memories; a rank without saved ones takes the others' counters and warm-start Q."""
        own, shared = _pick_rank(state_dict, "PowerSGD", *_rank_and_world(self.state.process_group))
        if "layouts" in shared:  # commit 5545262: torch's bucket-keyed dicts + the layouts they follow
            own, shared = (_upgrade_local(s) if s is not None else None for s in (own, shared))
        load_powersgd_state_dict(self.state, {**shared, **dict.fromkeys(_TENSOR_DICTS, {})})
        self.step = int(shared.get("step", self.state.iter))
        self._counts = (self.state.total_numel_before_compression, self.state.total_numel_after_compression)
        memory = own["memory"] if own is not None else shared["memory"]
        if own is None:  # Q is the same on every rank (allreduced); the error memory is not
            memory = {k: {**b, "tensors": {"q": b["tensors"]["q"]}} for k, b in memory.items() if "q" in b["tensors"]}
        self.layouts.load_state_dict(memory)
        self._last = {}

    # ------------------------------------------------------------------ hook body
    def _run(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        key, buf, st = bucket.index(), bucket.buffer(), self.state
        layout = tuple((self._names[p.data_ptr()], tuple(p.shape)) for p in bucket.parameters())
        if self.layouts.update(key, layout, self._pop_memory):
            mem = self.layouts.assemble(key, ("error", "q"), buf, complete=("q",))
            if "error" in mem:
                st.error_dict[key] = mem["error"]
            if "q" in mem:
                st.q_memory_dict[key] = mem["q"]
                st.p_memory_dict[key] = buf.new_empty(sum(n * r for n, _, r in _compressed(layout, st)))
        self._acc[0] += buf.numel()
        self._acc[1] += buf.numel() * buf.element_size()
        if st.iter < st.start_powerSGD_iter and self.warmup_dtype == "bfloat16":
            st.maybe_increase_iter(bucket)  # what torch's hook does in its warm-up, before its fp32 allreduce
            self._acc[2] += buf.numel() * 2
            fut = bf16_compress_hook(st.process_group, bucket)
        else:
            fut = powerSGD_hook(st, bucket)
        if bucket.is_last():
            self._finish_step(buf.element_size())
        return fut

    def _finish_step(self, esize: int) -> None:
        st, (numel, dense, warmup_bf16) = self.state, self._acc
        d_before = st.total_numel_before_compression - self._counts[0]
        d_after = st.total_numel_after_compression - self._counts[1]
        self._counts = (st.total_numel_before_compression, st.total_numel_after_compression)
        # warm-up: plain (or bf16) allreduce; then the tensors left uncompressed (not counted by torch) go dense
        sent = (warmup_bf16 or dense) if d_before == 0 else (d_after + numel - d_before) * esize
        self._last = {"bytes_sent": sent, "dense_bytes": dense, "ratio": dense / sent, "density": sent / dense}
        self._acc = [0, 0, 0]
        self.step += 1

    # ------------------------------------------------------------------ memories per parameter
    def _segments(self, kind: str, layout: Layout) -> list[tuple[Any, int]]:
        """Error: whole parameters in bucket order; Q: the compressed matrices, grouped by shape as torch does."""
        if kind != "q":
            return [(name, math.prod(shape)) for name, shape in layout]
        return [(name, m * r) for name, (_, m, r) in zip(*_compressed_named(layout, self.state), strict=True)]

    def _memory_of(self, key: int) -> dict[str, torch.Tensor]:
        st = self.state
        return {k: d[key] for k, d in (("error", st.error_dict), ("q", st.q_memory_dict)) if key in d}

    def _pop_memory(self, key: int) -> dict[str, torch.Tensor]:
        mem = self._memory_of(key)
        for d in (self.state.error_dict, self.state.q_memory_dict, self.state.p_memory_dict):
            d.pop(key, None)
        return mem


def _compressed_named(layout: Layout, state: PowerSGDState) -> tuple[list[Any], list[tuple[int, int, int]]]:
    """Names and ``(n, m, rank)`` of the matrices torch compresses, in its Q-memory order (grouped by shape)."""
    groups: dict[tuple[int, int], list[tuple[Any, tuple[int, int, int]]]] = {}
    for name, shape in layout:
        n = shape[0] if shape else 1
        m = math.prod(shape) // n if n else 0
        r = min(n, m, state.matrix_approximation_rank)
        if powersgd_should_compress(n, m, r, state.min_compression_rate):  # torch's own test, as its hook runs it
            groups.setdefault((n, m), []).append((name, (n, m, r)))
    items = [item for group in groups.values() for item in group]
    return [name for name, _ in items], [nmr for _, nmr in items]


def _compressed(layout: Layout, state: PowerSGDState) -> list[tuple[int, int, int]]:
    return _compressed_named(layout, state)[1]


def _upgrade_local(local: dict[str, Any]) -> dict[str, Any]:
    """A rank's PowerSGD state of commit 5545262 (bucket-keyed torch dicts + layouts) as memory blocks."""
    memory = {}
    for key, layout in local["layouts"].items():
        tensors = {k: local[d][key] for k, d in (("error", "error_dict"), ("q", "q_memory_dict")) if key in local[d]}
        memory[key] = {"params": [n for n, _ in layout], "shapes": [s for _, s in layout], "tensors": tensors}
    return {**local, "memory": memory}


def _powersgd_hook(state, bucket):  # noqa: ANN001, ANN201 (DDP rejects string annotations)
    return state._run(bucket)
