"""DDP communication hook running any :class:`Compressor` with error feedback.

Implements compressed gradient averaging for ``DistributedDataParallel.register_comm_hook`` with
error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error
Feedback Fixes SignSGD") and optional DGC momentum correction (Lin et al. 2018, "Deep Gradient
Compression"). For the local bucket gradient ``g^r_t`` of rank ``r`` among ``P``::

    p^r_t     = g^r_t + e^r_t                       # compensate (or DGC: v^r_t)
    e^r_{t+1} = p^r_t - D(C(p^r_t))                 # local residual only
    out_t     = (1 / P) * sum_r D(C(p^r_t))         # what DDP writes into .grad

Collectives: shared-index compressors (RandomK) allreduce their ``k`` values; the others
(TopK, Sign, QSGD) all-gather their payloads, byte-packed into one uint8 tensor per bucket. All ranks
hold the same bucket ``numel`` so payload sizes agree and no padding is needed.

Note: this module must not use ``from __future__ import annotations``: DDP checks the hook's
annotations against ``dist.GradBucket`` / ``Future[Tensor]`` objects at registration.
"""

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from lightning_gd.compression.base import CompressedTensor, Compressor
from lightning_gd.compression.error_feedback import ErrorFeedback
from lightning_gd.compression.momentum import MomentumCorrection

__all__ = ["CompressionHookState", "compressed_allreduce_hook"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_Ident = int | str  # parameter identity: name when a module is bound, else data_ptr


class _Layout(NamedTuple):
    """Parameters of one DDP bucket, in buffer order."""

    ptrs: tuple[int, ...]
    idents: tuple[_Ident, ...]
    numels: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]


class CompressionHookState:
    """State of :func:`compressed_allreduce_hook`: compressor, memories, step counter, accounting.

    Args:
        compressor: Any :class:`Compressor`.
        error_feedback: Keep a local residual per bucket (recommended for all biased compressors).
        momentum: DGC momentum correction factor; when ``> 0`` the residual is the DGC accumulation
            ``v`` (momentum factor masking on the sent coordinates). Requires a sparse compressor,
            ``error_feedback=True`` and an optimizer *without* momentum.
        nesterov: Nesterov variant of momentum correction.
        warmup_steps: Number of initial hook steps that use dense allreduce.
        min_numel: Buckets with fewer elements use dense allreduce.
        process_group: Group to communicate in (default: the world group).
        module: Optional model whose ``named_parameters`` name the residual pieces in
            :meth:`state_dict`, making resume independent of DDP's bucket layout (see below).

    A *step* is one backward pass: it ends at the bucket with ``bucket.is_last()``.

    Bucket layout: memories live per bucket index. DDP rebuilds its buckets after the first
    iteration (and again after a resume), so on every layout change the memories are cut into
    per-parameter pieces and re-assembled for the new layout: nothing is lost. In
    :meth:`state_dict` the pieces are named by parameter name when ``module`` is bound, so resuming
    works whatever the bucket layout; without ``module`` a saved bucket memory is only restored into
    a bucket of the same index and the same parameter shapes, otherwise it is dropped with a
    warning.

    Ranks and world size: residuals are local. :meth:`state_dict` holds this rank's memories tagged
    with ``rank``/``world_size``; :meth:`gather_state_dict` (collective) holds every rank's. On
    load, a rank restores the memory saved *for its own rank id* if present (even if the world size
    changed: the pending gradient mass is simply averaged over the new ``P``); a memory saved by
    another rank is never applied (it would be counted twice) and ranks without a saved memory start
    from zero, with a warning. The step counter and compressor state are shared and always loaded.

    Example::

        >>> state = CompressionHookState(TopK(0.01), warmup_steps=10, module=model)
        >>> ddp_model.register_comm_hook(state, compressed_allreduce_hook)
        >>> ...  # train
        >>> state.stats()["ratio"]  # dense bytes / sent bytes of the last step
        50.0
    """

    def __init__(
        self,
        compressor: Compressor,
        error_feedback: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        warmup_steps: int = 0,
        min_numel: int = 0,
        process_group: dist.ProcessGroup | None = None,
        module: nn.Module | None = None,
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got compressor={compressor!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got warmup_steps={warmup_steps!r}")
        if min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got min_numel={min_numel!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        if momentum > 0 and not compressor.sparse:
            raise ValueError(
                f"momentum={momentum!r} (DGC momentum correction) needs a sparse compressor, got {compressor!r}"
            )
        if momentum > 0 and not error_feedback:
            raise ValueError(f"momentum={momentum!r} needs error_feedback=True (the DGC accumulation is the memory)")
        self.compressor = compressor
        self.error_feedback = bool(error_feedback)
        self.warmup_steps = int(warmup_steps)
        self.min_numel = int(min_numel)
        self.process_group = process_group
        #: Residuals ``e`` (error feedback without momentum), keyed by bucket index.
        self.memory: ErrorFeedback | None = ErrorFeedback() if error_feedback and momentum == 0 else None
        #: DGC ``u``/``v`` buffers, keyed by bucket index.
        self.momentum_correction: MomentumCorrection | None = (
            MomentumCorrection(momentum, nesterov) if momentum > 0 else None
        )
        #: Number of completed hook steps.
        self.step = 0
        self._names: dict[int, str] | None = None
        if module is not None:
            self.bind_module(module)
        self._rank: int | None = None
        self._world_size: int | None = None
        self._layouts: dict[int, _Layout] = {}
        # Memory pieces waiting for a bucket: per parameter, and per bucket (loaded without names).
        self._pending_params: dict[_Ident, dict[str, torch.Tensor]] = {}
        self._pending_buckets: dict[int, dict[str, Any]] = {}
        self._pending_load: dict[str, Any] | None = None
        self._acc = self._new_accumulator()
        self._last: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API
    def bind_module(self, module: nn.Module) -> None:
        """Name memory pieces by ``module.named_parameters()`` (call after moving it to its device)."""
        self._names = {p.data_ptr(): name for name, p in module.named_parameters()}

    def stats(self) -> dict[str, float]:
        """Accounting of the last completed step (empty before the first one).

        Keys: ``step`` (its index), ``bytes_sent`` (payload bytes this rank contributed, dense
        buckets counted as ``numel * element_size``), ``dense_bytes`` (the same for an uncompressed
        allreduce), ``ratio`` (``dense_bytes / bytes_sent``), ``link_bytes`` (estimated bytes this
        rank transmits with ring algorithms: ``2(P-1)/P * B`` for allreduce, ``(P-1) * B`` for
        allgather), ``density`` (coordinates represented / numel), ``error_norm`` (global L2 norm of
        this rank's memories), ``compressed_buckets`` and ``buckets``.
        """
        if self._last is None:
            return {}
        out = {k: float(v) for k, v in self._last["scalars"].items()}
        out["error_norm"] = math.sqrt(sum(float(t) for t in self._last["error_sq"]))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of this rank (tensors on CPU).

        Format (version 1)::

            {"version": 1, "step": int, "rank": int | None, "world_size": int | None,
             "compressor_class": str, "compressor": {...},
             "memory": {block_key: {"params": [name, ...] | None, "shapes": [[int, ...], ...],
                                    "tensors": {"error" | "u" | "v": flat CPU tensor}}}}

        ``block_key`` is the bucket index (as ``str``), or ``"param:<name>"`` for a piece not yet
        claimed by a bucket.
        """
        if self._pending_load is not None:
            # Loaded but never run: hand the loaded state back unchanged.
            return self._pending_load
        memory: dict[str, Any] = {}
        for key, layout in self._layouts.items():
            mem = self._get_mem(key)
            if mem:
                names = [i if isinstance(i, str) else None for i in layout.idents]
                memory[str(key)] = {
                    "params": names if all(n is not None for n in names) else None,
                    "shapes": [list(s) for s in layout.shapes],
                    "tensors": {k: t.detach().reshape(-1).cpu().clone() for k, t in mem.items()},
                }
        for key, block in self._pending_buckets.items():
            memory.setdefault(str(key), block)
        for ident, pieces in self._pending_params.items():
            if isinstance(ident, str):
                memory[f"param:{ident}"] = {
                    "params": [ident],
                    "shapes": [[next(iter(pieces.values())).numel()]],
                    "tensors": {k: t.detach().cpu().clone() for k, t in pieces.items()},
                }
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "rank": self._rank,
            "world_size": self._world_size,
            "compressor_class": type(self.compressor).__name__,
            "compressor": self.compressor.state_dict(),
            "memory": memory,
        }

    def gather_state_dict(self) -> dict[str, Any]:
        """Collective: every rank's :meth:`state_dict`, for a checkpoint written by one rank.

        Must be called on all ranks of the group. Returns::

            {"version": 1, "format": "per_rank", "world_size": P, "step": int,
             "compressor_class": str, "compressor": {...}, "ranks": {rank: state_dict}}
        """
        if self._pending_load is not None and self._pending_load.get("format") == "per_rank":
            return self._pending_load  # every rank loaded the same gathered state: nothing to gather
        self._init_dist()
        local = self.state_dict()
        gathered: list[Any] = [None] * self._world_size_or_1()
        dist.all_gather_object(gathered, local, group=self._group())
        return {
            "version": _STATE_VERSION,
            "format": "per_rank",
            "world_size": len(gathered),
            "step": local["step"],
            "compressor_class": local["compressor_class"],
            "compressor": local["compressor"],
            "ranks": {int(sd["rank"] if sd["rank"] is not None else r): sd for r, sd in enumerate(gathered)},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` or :meth:`gather_state_dict` result.

        The step counter and compressor state apply immediately; memories are placed at the next
        hook call, once this process's rank and the bucket layout are known.
        """
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported state_dict version={state_dict.get('version')!r}")
        self.step = int(state_dict["step"])
        if state_dict.get("compressor_class") == type(self.compressor).__name__:
            self.compressor.load_state_dict(state_dict["compressor"])
        else:
            warnings.warn(
                f"compressor state of {state_dict.get('compressor_class')} not loaded into "
                f"{type(self.compressor).__name__}",
                stacklevel=2,
            )
        if self.memory is not None:
            self.memory.reset()
        if self.momentum_correction is not None:
            self.momentum_correction.reset()
        self._layouts.clear()
        self._pending_params.clear()
        self._pending_buckets.clear()
        self._pending_load = state_dict
        self._last = None

    # ------------------------------------------------------------------ hook body
    def _run(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self._init_dist()
        if self._pending_load is not None:
            self._resolve_load(self._pending_load)
            self._pending_load = None
        group, world = self._group(), self._world_size_or_1()
        buf = bucket.buffer()
        key = bucket.index()
        numel, esize = buf.numel(), buf.element_size()
        dense_bytes = numel * esize
        comp = self.compressor
        dense = self.step < self.warmup_steps or numel < self.min_numel or not buf.is_floating_point()

        if dense:
            self._account(numel, dense_bytes, dense_bytes, numel, allgather=False, compressed=False)
            fut = _allreduce_mean(buf, group, world)
        else:
            self._sync_layout(key, bucket, buf)
            # p_t: what is compressed
            if self.momentum_correction is not None:
                p = self.momentum_correction.accumulate(key, buf)  # v_t (DGC)
            elif self.memory is not None:
                p = self.memory.compensate(key, buf)  # g_t + e_t
            else:
                p = buf
            c = comp.compress(p, key)
            if self.momentum_correction is not None:
                self.momentum_correction.mask(key, comp.sent_mask(c))  # v, u <- 0 on sent coords
            elif self.memory is not None:
                self.memory.update(key, p, comp.decompress(c))  # e_{t+1} = p_t - D(C(p_t))
            sent = c.nbytes
            self._account(
                numel,
                sent,
                dense_bytes,
                comp.sent_numel(numel),
                allgather=not comp.shared_indices,
                compressed=True,
            )
            if comp.shared_indices:
                fut = _allreduce_shared(comp, c, buf, group, world)
            else:
                fut = _allgather_decompress(comp, c, buf, group, world)
        if bucket.is_last():
            self._finish_step()
        return fut

    # ------------------------------------------------------------------ distributed context
    def _group(self) -> dist.ProcessGroup | None:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _init_dist(self) -> None:
        if self._rank is None and dist.is_available() and dist.is_initialized():
            group = self._group()
            self._rank = dist.get_rank(group)
            self._world_size = dist.get_world_size(group)
            if not self.compressor.shared_indices:
                # Private randomness (QSGD rounding) must differ across ranks.
                self.compressor.salt = self._rank

    def _world_size_or_1(self) -> int:
        return self._world_size if self._world_size is not None else 1

    # ------------------------------------------------------------------ accounting
    @staticmethod
    def _new_accumulator() -> dict[str, float]:
        return dict.fromkeys(
            (
                "bytes_sent",
                "dense_bytes",
                "link_bytes",
                "sent_numel",
                "numel",
                "buckets",
                "compressed_buckets",
            ),
            0.0,
        )

    def _account(self, numel: int, sent: int, dense: int, sent_numel: int, allgather: bool, compressed: bool) -> None:
        p = self._world_size_or_1()
        acc = self._acc
        acc["bytes_sent"] += sent
        acc["dense_bytes"] += dense
        # ring estimates: allgather forwards P-1 blocks, allreduce 2(P-1)/P of the buffer
        acc["link_bytes"] += (p - 1) * sent if allgather else 2 * (p - 1) / p * sent
        acc["sent_numel"] += sent_numel
        acc["numel"] += numel
        acc["buckets"] += 1
        acc["compressed_buckets"] += int(compressed)

    def _finish_step(self) -> None:
        acc = self._acc
        scalars = {
            "step": float(self.step),
            "bytes_sent": acc["bytes_sent"],
            "dense_bytes": acc["dense_bytes"],
            "ratio": acc["dense_bytes"] / acc["bytes_sent"] if acc["bytes_sent"] else 1.0,
            "link_bytes": acc["link_bytes"],
            "density": acc["sent_numel"] / acc["numel"] if acc["numel"] else 1.0,
            "compressed_buckets": acc["compressed_buckets"],
            "buckets": acc["buckets"],
        }
        # Norms are kept as tensors and read lazily in stats(): no device sync in the hook.
        error_sq = [torch.linalg.vector_norm(t.float()).square() for t in self._memory_tensors()]
        self._last = {"scalars": scalars, "error_sq": error_sq}
        self._acc = self._new_accumulator()
        self.step += 1

    def _memory_tensors(self) -> list[torch.Tensor]:
        if self.memory is not None:
            return [t for k in self.memory.keys() if (t := self.memory.residual(k)) is not None]
        if self.momentum_correction is not None:
            return [b[1] for k in self.momentum_correction.keys() if (b := self.momentum_correction.buffers(k))]
        return []

    # ------------------------------------------------------------------ memory per bucket
    def _get_mem(self, key: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.memory is not None and (e := self.memory.residual(key)) is not None:
            out["error"] = e
        if self.momentum_correction is not None and (b := self.momentum_correction.buffers(key)):
            out["u"], out["v"] = b
        return out

    def _pop_mem(self, key: int) -> dict[str, torch.Tensor]:
        out = self._get_mem(key)
        if self.memory is not None:
            self.memory.pop(key)
        if self.momentum_correction is not None:
            self.momentum_correction.pop(key)
        return out

    def _set_mem(self, key: int, mem: dict[str, torch.Tensor]) -> None:
        if self.memory is not None and "error" in mem:
            self.memory.set_residual(key, mem["error"])
        if self.momentum_correction is not None and "u" in mem and "v" in mem:
            self.momentum_correction.set_buffers(key, mem["u"], mem["v"])

    def _kinds(self) -> tuple[str, ...]:
        if self.momentum_correction is not None:
            return ("u", "v")
        return ("error",) if self.memory is not None else ()

    def _ident(self, ptr: int) -> _Ident:
        if self._names is not None and ptr in self._names:
            return self._names[ptr]
        return ptr

    def _sync_layout(self, key: int, bucket: dist.GradBucket, buf: torch.Tensor) -> None:
        """Re-key memories by parameter whenever DDP changes which parameters a bucket holds."""
        if not self._kinds():
            return
        params = bucket.parameters()
        ptrs = tuple(p.data_ptr() for p in params)
        old = self._layouts.get(key)
        if old is not None and old.ptrs == ptrs:
            return  # fast path: unchanged layout
        layout = _Layout(
            ptrs=ptrs,
            idents=tuple(self._ident(q) for q in ptrs),
            numels=tuple(p.numel() for p in params),
            shapes=tuple(tuple(p.shape) for p in params),
        )
        if sum(layout.numels) != buf.numel():
            raise RuntimeError(f"bucket {key}: parameters hold {sum(layout.numels)} elements, buffer {buf.numel()}")
        # Cut every bucket that shares a parameter with the new layout (including the old `key`).
        new_ptrs = set(ptrs)
        for other in [k for k, lay in self._layouts.items() if k == key or new_ptrs.intersection(lay.ptrs)]:
            self._dissolve(other)
        if old is not None:
            log.debug("bucket %d layout changed (DDP bucket rebuild): memories re-assembled", key)
        self._layouts[key] = layout
        self._assemble(key, layout, buf)

    def _dissolve(self, key: int) -> None:
        layout = self._layouts.pop(key)
        mem = self._pop_mem(key)
        for kind, flat in mem.items():
            for ident, piece in zip(layout.idents, flat.reshape(-1).split(list(layout.numels)), strict=True):
                self._pending_params.setdefault(ident, {})[kind] = piece

    def _assemble(self, key: int, layout: _Layout, buf: torch.Tensor) -> None:
        block = self._pending_buckets.pop(key, None)
        if block is not None:
            if [list(s) for s in layout.shapes] == [list(s) for s in block["shapes"]]:
                self._set_mem(key, {k: t.to(buf.device, buf.dtype) for k, t in block["tensors"].items()})
                return
            warnings.warn(
                f"saved memory of bucket {key} does not match its current parameter shapes "
                "(bucket layout changed; bind a module to resume by parameter name): dropped",
                stacklevel=3,
            )
        pieces = [self._pending_params.pop(i, None) for i in layout.idents]
        if not any(pieces):
            return
        mem: dict[str, torch.Tensor] = {}
        for kind in self._kinds():
            parts = []
            for n, piece in zip(layout.numels, pieces, strict=True):
                t = piece.get(kind) if piece else None
                if t is None or t.numel() != n:
                    t = torch.zeros(n, dtype=buf.dtype, device=buf.device)
                parts.append(t.reshape(-1).to(buf.device, buf.dtype))
            mem[kind] = torch.cat(parts)
        self._set_mem(key, mem)

    def _resolve_load(self, sd: dict[str, Any]) -> None:
        """Place the memories of a loaded state dict for this rank (see the class docstring)."""
        rank, world = self._rank, self._world_size
        if sd.get("format") == "per_rank":
            saved_world = int(sd["world_size"])
            ranks = {int(r): v for r, v in sd["ranks"].items()}
            local = ranks.get(rank if rank is not None else 0)
            if world is not None and saved_world != world:
                dropped = sorted(r for r in ranks if r >= world)
                warnings.warn(
                    f"compression state saved with world size {saved_world}, now {world}: residual memories "
                    f"kept for ranks present in both; memories of ranks {dropped} dropped, "
                    "new ranks start at zero",
                    stacklevel=3,
                )
            if local is None:
                warnings.warn(f"no compression memory saved for rank {rank}: starting from zero", stacklevel=3)
                return
        else:
            local = sd
            saved_rank = sd.get("rank")
            if saved_rank is not None and rank is not None and int(saved_rank) != rank:
                if sd.get("memory"):
                    warnings.warn(
                        f"compression memory in state_dict belongs to rank {saved_rank}, "
                        f"this is rank {rank}: "
                        "dropped (use gather_state_dict() to checkpoint every rank)",
                        stacklevel=3,
                    )
                return
            if sd.get("world_size") is not None and world is not None and int(sd["world_size"]) != world:
                warnings.warn(
                    f"compression state saved with world size {sd['world_size']}, now {world}: "
                    f"rank {rank} keeps its own residual memory",
                    stacklevel=3,
                )
        for block_key, block in local.get("memory", {}).items():
            names = block.get("params")
            if names is not None and self._names is not None:
                numels = [math.prod(s) for s in block["shapes"]]
                for kind, flat in block["tensors"].items():
                    for name, piece in zip(names, flat.reshape(-1).split(numels), strict=True):
                        self._pending_params.setdefault(name, {})[kind] = piece
            elif str(block_key).isdigit():
                self._pending_buckets[int(block_key)] = block
            else:
                warnings.warn(
                    f"compression memory {block_key!r} is named by parameter but no module is bound: dropped",
                    stacklevel=3,
                )


def compressed_allreduce_hook(
    state: CompressionHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket gradients through ``state.compressor``.

    Register once, before the first backward. The returned future resolves to the bucket buffer
    holding ``(1/P) * sum_r D(C(p^r_t))`` (dense ``allreduce`` during warm-up and for small buckets).

    Args:
        state: The hook state (compressor, memories, counters).
        bucket: The DDP gradient bucket; its buffer holds the local (un-averaged) gradient.

    Returns:
        Future of the averaged gradient tensor, shaped like ``bucket.buffer()``.

    Example::

        >>> state = CompressionHookState(RandomK(0.01, seed=0), warmup_steps=2)
        >>> ddp_model.register_comm_hook(state, compressed_allreduce_hook)
    """
    return state._run(bucket)


# ---------------------------------------------------------------------- collectives
def _allreduce_mean(
    buf: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Dense path, identical to torch's default ``allreduce_hook``."""
    buf.div_(world)  # divide first to avoid overflow in low precision
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _allreduce_shared(
    comp: Compressor, c: CompressedTensor, buf: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Shared support: sum the payloads in place (``sum_r C(p^r)``), then decompress once."""
    payload = [t.contiguous() for t in c.payload]
    futs = [dist.all_reduce(t, group=group, async_op=True).get_future() for t in payload]
    all_done = torch.futures.collect_all(futs)

    def _finish(_: torch.futures.Future[Any]) -> torch.Tensor:
        out = comp.decompress(c.with_payload(payload))
        buf.copy_(out.reshape(buf.shape)).div_(world)
        return buf

    return all_done.then(_finish)


def _allgather_decompress(
    comp: Compressor, c: CompressedTensor, buf: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Private supports: all-gather byte-packed payloads, decompress and sum them, divide by P."""
    packed = _pack_payload(c.payload)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    fut = dist.all_gather(gathered, packed, group=group, async_op=True).get_future()

    def _finish(_: torch.futures.Future[Any]) -> torch.Tensor:
        parts = [c.with_payload(_unpack_payload(g, c.payload)) for g in gathered]
        out = comp.decompress_sum(parts)
        buf.copy_(out.reshape(buf.shape)).div_(world)
        return buf

    return fut.then(_finish)


def _pack_payload(payload: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the payload tensors' bytes into one flat uint8 tensor (a single collective)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in payload])


def _unpack_payload(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Split a :func:`_pack_payload` buffer back into tensors shaped and typed like ``like``."""
    out, offset = [], 0
    for t in like:
        nbytes = t.numel() * t.element_size()
        chunk = flat[offset : offset + nbytes]
        if offset % t.element_size():
            chunk = chunk.clone()  # dtype views need an aligned storage offset
        out.append(chunk.view(t.dtype).reshape(t.shape))
        offset += nbytes
    return tuple(out)
