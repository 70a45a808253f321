"""DDP communication hook running any :class:`Compressor` with error feedback.

Implements compressed gradient averaging for ``DistributedDataParallel.register_comm_hook`` with
error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error
Feedback Fixes SignSGD") and optional DGC momentum correction and density warm-up (Lin et al. 2018,
"Deep Gradient Compression"). For the local bucket gradient ``g^r_t`` of rank ``r`` among ``P``::

    p^r_t     = g^r_t + e^r_t                       # compensate (or DGC: v^r_t)
    e^r_{t+1} = p^r_t - D(C(p^r_t))                 # local residual only
    out_t     = (1 / P) * sum_r D(C(p^r_t))         # what DDP writes into .grad

Collectives: shared-index compressors (RandomK) allreduce their ``k`` values; the others
(TopK, Sign, QSGD) all-gather their payloads, byte-packed into one uint8 tensor per bucket. All ranks
hold the same bucket ``numel`` so payload sizes agree and no padding is needed.

Note: this module must not use ``from __future__ import annotations``: DDP checks the hook's
annotations against ``dist.GradBucket`` / ``Future[Tensor]`` objects at registration.
"""

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lightning_gd.compression.base import CompressedTensor, Compressor
from lightning_gd.compression.error_feedback import ErrorFeedback
from lightning_gd.compression.hook_state import _gather, _pick_rank, _rank_and_world
from lightning_gd.compression.layout import BucketLayouts, Layout
from lightning_gd.compression.momentum import MomentumCorrection
from lightning_gd.compression.no_memory import NoMemory
from lightning_gd.utils.checks import check_choice, check_number, check_positive_int
from lightning_gd.utils.optim_state import is_adam_family

__all__ = ["CompressionHookState", "compressed_allreduce_hook"]

_DGC_START_DENSITY = 0.25  # Lin et al. 2018: 0.25, 0.063, 0.015, 0.004, 0.001
_WARMUP_DTYPES = ("float32", "bfloat16")
WarmupDtype = Literal["float32", "bfloat16"]
_ACCOUNTS = ("bytes_sent", "dense_bytes", "link_bytes", "sent_numel", "numel", "buckets", "compressed_buckets")


class CompressionHookState:
    """State of :func:`compressed_allreduce_hook`: compressor, memories, schedule, accounting, checkpoint.

    Implements :class:`~lightning_gd.compression.HookState`. A *step* is one backward pass: it ends at the
    bucket with ``bucket.is_last()``.

    Args:
        compressor: Any :class:`Compressor`.
        error_feedback: Keep a local residual per bucket. ``None``: on for contractive compressors (top-k,
            random-k, sign), off for QSGD, whose memory can diverge (it is unbiased but no contraction).
        momentum_correction: DGC momentum factor in ``[0, 1)``; when ``> 0`` the residual is the DGC accumulation
            ``v`` (momentum factor masking on the sent coordinates). Requires a sparse compressor,
            error feedback and an optimizer *without* momentum.
        nesterov: Nesterov variant of momentum correction.
        warmup_steps: Number of initial hook steps that use dense allreduce.
        density_warmup_steps: DGC's density warm-up for sparse compressors: over this many steps after the
            dense ones, the density decays exponentially from ``density_warmup_start`` to the compressor's.
        min_numel: Buckets with fewer elements use dense allreduce.
        warmup_dtype: dtype of the dense warm-up steps' allreduce: ``"bfloat16"`` sends half the bytes (as
            torch's ``bf16_compress_hook``), which halves the warm-up's cost on a slow link.
        density_warmup_start: First density of the DGC warm-up (Lin et al.: 0.25). With values and int32
            indices a sparse entry costs twice a dense one, so 0.25 sends half the dense bytes; 0.0625 suits
            slow links.
        process_group: Group to communicate in (default: the world group).
        module: Optional model whose ``named_parameters`` name the memory pieces (see below).

    Bucket layout: memories live per bucket index and follow their parameters through DDP's bucket rebuilds
    (:class:`~lightning_gd.compression.layout.BucketLayouts`). In :meth:`state_dict` the pieces are named by
    parameter when ``module`` is bound, so resuming works whatever the bucket layout; without ``module`` a
    saved bucket memory is only restored into a bucket of the same index and parameter shapes, otherwise it
    is dropped with a warning.

    Ranks and world size: residuals are local. :meth:`state_dict` (collective) holds every rank's; on load
    a rank restores the memory saved under its own rank id, even if the world size changed; ranks without
    one start from zero, with a warning. Load after the process group is initialized.

    Raises:
        ValueError: for a bad argument, naming it and its value.

    Example::

        # not run: needs a DDP process group (tests/compression runs it in 2 gloo processes)
        state = CompressionHookState(TopK(0.01), warmup_steps=10, module=model)
        state.register(ddp_model)  # = ddp_model.register_comm_hook(state, compressed_allreduce_hook)
        ...  # train
        state.stats()["ratio"]  # dense bytes / sent bytes of the last step: 50.0
    """

    single_bucket_on_gloo = False

    def __init__(
        self,
        compressor: Compressor,
        error_feedback: bool | None = True,
        momentum_correction: float = 0.0,
        nesterov: bool = False,
        warmup_steps: int = 0,
        density_warmup_steps: int = 0,
        min_numel: int = 0,
        process_group: dist.ProcessGroup | None = None,
        module: nn.Module | None = None,
        warmup_dtype: WarmupDtype = "float32",
        density_warmup_start: float = _DGC_START_DENSITY,
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got compressor={compressor!r}")
        self.warmup_dtype = check_choice("warmup_dtype", warmup_dtype, _WARMUP_DTYPES)
        self.density_warmup_start = check_number("density_warmup_start", density_warmup_start, 0, 1, low_open=True)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.density_warmup_steps = check_positive_int("density_warmup_steps", density_warmup_steps, minimum=0)
        self.min_numel = check_positive_int("min_numel", min_numel, minimum=0)
        if error_feedback is None:
            error_feedback = compressor.contractive
        elif error_feedback and not compressor.contractive:
            warnings.warn(
                f"{compressor!r} is no contraction: error feedback on it can diverge (leave error_feedback unset)",
                stacklevel=2,
            )
        momentum = check_number("momentum_correction", momentum_correction, 0, 1, high_open=True)
        if momentum and not compressor.sparse:
            raise ValueError(
                f"momentum_correction={momentum!r} needs a sparse compressor (top-k, random-k), got {compressor!r}"
            )
        if momentum and not error_feedback:
            raise ValueError(
                f"momentum_correction={momentum!r} needs error_feedback=True (the DGC accumulation is the memory)"
            )
        if density_warmup_steps and not compressor.sparse:
            raise ValueError(
                f"density_warmup_steps={density_warmup_steps} needs a sparse compressor, got {compressor!r}"
            )
        self.compressor = compressor
        self.error_feedback = bool(error_feedback)
        self.process_group = process_group
        self.density: float | None = getattr(compressor, "density", None) if compressor.sparse else None
        #: Residuals ``e`` (error feedback without momentum), keyed by bucket index; a :class:`NoMemory` otherwise.
        self.memory: ErrorFeedback | NoMemory = ErrorFeedback() if error_feedback and not momentum else NoMemory()
        #: DGC ``u``/``v`` buffers, keyed by bucket index.
        self.momentum_correction = MomentumCorrection(momentum, nesterov) if momentum else None
        self.step = 0
        self.layouts = BucketLayouts()
        self._names: dict[int, str] = {}
        if module is not None:
            self.bind_module(module)
        self._rank: int | None = None
        self._world_size: int | None = None
        self._acc = dict.fromkeys(_ACCOUNTS, 0.0)
        self._last: dict[str, Any] | None = None
        self._bucket_layouts: dict[int, Layout] = {}  # every bucket's parameters at its last call
        self._replay: list[tuple[int, Layout]] | None = None  # the saved buckets, for the first step after a load

    # ------------------------------------------------------------------ HookState
    def register(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Register :func:`compressed_allreduce_hook` on ``ddp`` and name the memories by its module."""
        self.bind_module(ddp.module)
        ddp.register_comm_hook(self, compressed_allreduce_hook)

    def bind_module(self, module: nn.Module) -> None:
        """Name memory pieces by ``module.named_parameters()`` (call after moving it to its device)."""
        self._names = {p.data_ptr(): name for name, p in module.named_parameters()}

    def density_at(self, step: int) -> float | None:
        """1.0 during the dense warm-up, then DGC's exponential decay from ``density_warmup_start`` (0.25), then
        the compressor's density.

        Example::

            >>> from lightning_gd.compression import TopK
            >>> CompressionHookState(TopK(0.01), warmup_steps=1, density_warmup_steps=4).density_at(3)
            0.05
        """
        if step < self.warmup_steps:
            return 1.0
        if self.density is None:
            return None if self.compressor.sparse else 1.0
        t = step - self.warmup_steps
        start = self.density_warmup_start
        if t >= self.density_warmup_steps or self.density >= start:
            return self.density
        return start * (self.density / start) ** (t / self.density_warmup_steps)

    def check_optimizer(self, param_groups: list[dict[str, Any]]) -> None:
        """DGC applies the momentum itself: refuse an optimizer with its own; warn when a sparse compressor's
        error memory meets an optimizer momentum (the two fight)."""
        if self.momentum_correction is not None:
            if any(g.get("momentum", 0) or is_adam_family(g) for g in param_groups):
                raise ValueError(
                    f"momentum_correction={self.momentum_correction.momentum} applies the momentum itself: use"
                    " torch.optim.SGD(momentum=0), not an optimizer with its own momentum"
                )
        elif self.memory.enabled and self.compressor.sparse and any(g.get("momentum", 0) for g in param_groups):
            warnings.warn(
                "error feedback with an optimizer momentum can do worse than no feedback at all; set"
                " `momentum_correction` to the momentum and use SGD(momentum=0)",
                stacklevel=2,
            )

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
        """Collective: every rank's step, compressor state and memories (see :class:`HookState`).

        A rank's state: ``{"step": int, "compressor": {...}, "memory": {bucket | "param:<name>": {"params":
        [name, ...] | None, "shapes": [[int, ...], ...], "tensors": {"error" | "u" | "v": flat CPU tensor}}}}``.
        """
        self._init_dist()
        layouts = self._bucket_layouts or dict(self._replay or ())  # loaded but not yet run: the loaded ones
        named = all(isinstance(i, str) for lay in layouts.values() for i, _ in lay)
        local = {
            "buckets": [[k, [[i, list(s)] for i, s in lay]] for k, lay in sorted(layouts.items())] if named else [],
            "step": self.step,
            "compressor": self.compressor.state_dict(),
            "memory": self.layouts.state_dict(self._get_mem),
        }
        return _gather(type(self.compressor).__name__, local, self._group())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's memories and the shared step counter and compressor state.

        Memories are placed at the next hook call of each bucket, once its layout is known.

        Raises:
            ValueError: for another compressor's state or an unknown format version.
        """
        self._init_dist()
        own, shared = _pick_rank(state_dict, type(self.compressor).__name__, self._rank or 0, self._world_size or 1)
        self.step = int(shared["step"])
        self.compressor.load_state_dict(shared["compressor"])
        self.memory.reset()
        if self.momentum_correction is not None:
            self.momentum_correction.reset()
        self.layouts.load_state_dict(own["memory"] if own is not None else {})
        saved = [(int(k), tuple((i, tuple(s)) for i, s in lay)) for k, lay in shared.get("buckets", [])]
        self._replay = saved or None
        self._last = None

    # ------------------------------------------------------------------ hook body
    def _run(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self._init_dist()
        buf, key = bucket.buffer(), bucket.index()
        layout = tuple((self._names.get(p.data_ptr(), p.data_ptr()), tuple(p.shape)) for p in bucket.parameters())
        if self._replay is not None:
            replay, self._replay = self._replay, None
            saved = [slot for _, lay in replay for slot in lay]
            if bucket.is_last() and len(saved) == len(layout) and set(saved) == set(layout):
                return self._run_replayed(buf, layout, replay)
        self._bucket_layouts[key] = layout
        fut = self._process(key, layout, buf)
        if bucket.is_last():
            self._finish_step()
        return fut

    def _run_replayed(
        self, buf: torch.Tensor, layout: Layout, replay: list[tuple[int, Layout]]
    ) -> torch.futures.Future[torch.Tensor]:
        """First step after a restart: DDP sends every gradient in one bucket until it regroups them after this
        step. Compress them in the saved buckets instead, so the selection is the uninterrupted run's."""
        views = dict(zip([i for i, _ in layout], buf.split([math.prod(s) for _, s in layout]), strict=True))
        for key, saved in replay:
            flat = torch.cat([views[i].reshape(-1) for i, _ in saved])
            self._bucket_layouts[key] = saved
            out = self._process(key, saved, flat).wait()
            for (i, _), piece in zip(saved, out.split([math.prod(s) for _, s in saved]), strict=True):
                views[i].copy_(piece)
        self._finish_step()
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut

    def _process(self, key: int, layout: Layout, buf: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        group, world = self._group(), self._world_size or 1
        numel, esize = buf.numel(), buf.element_size()
        dense_bytes = numel * esize
        comp = self.compressor
        if self.density_warmup_steps and not self._acc["buckets"]:  # first bucket of the step
            comp.density = self.density_at(self.step)
        if self.step < self.warmup_steps and self.warmup_dtype == "bfloat16" and buf.is_floating_point():
            self._account(numel, numel * 2, dense_bytes, numel, allgather=False, compressed=False)
            return _allreduce_mean_bf16(buf, group, world)
        if self.step < self.warmup_steps or numel < self.min_numel or not buf.is_floating_point():
            self._account(numel, dense_bytes, dense_bytes, numel, allgather=False, compressed=False)
            return _allreduce_mean(buf, group, world)
        self._sync_layout(key, layout, buf)
        # p_t: what is compressed
        if self.momentum_correction is not None:
            p = self.momentum_correction.accumulate(key, buf)  # v_t (DGC)
        else:
            p = self.memory.compensate(key, buf)  # g_t + e_t (g_t itself without error feedback)
        c = comp.compress(p, key)
        if self.momentum_correction is not None:
            self.momentum_correction.mask(key, comp.sent_mask(c))  # v, u <- 0 on sent coords
        else:
            self.memory.update(key, p, comp.decompress(c))  # e_{t+1} = p_t - D(C(p_t))
        allgather = not comp.shared_indices
        self._account(numel, c.nbytes, dense_bytes, comp.sent_numel(numel), allgather=allgather, compressed=True)
        return (_allgather_decompress if allgather else _allreduce_shared)(comp, c, buf, group, world)

    def _group(self) -> dist.ProcessGroup | None:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _init_dist(self) -> None:
        if self._rank is None and dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = _rank_and_world(self._group())
            if not self.compressor.shared_indices:
                # Private randomness (QSGD rounding) must differ across ranks.
                self.compressor.salt = self._rank

    # ------------------------------------------------------------------ accounting
    def _account(self, numel: int, sent: int, dense: int, sent_numel: int, allgather: bool, compressed: bool) -> None:
        p = self._world_size or 1
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
        if self.momentum_correction is not None:
            memories = [b[1] for k in self.momentum_correction.keys() if (b := self.momentum_correction.buffers(k))]
        else:
            memories = [self.memory.residual(k) for k in self.memory.keys()]
        error_sq = [torch.linalg.vector_norm(t.float()).square() for t in memories]
        self._last = {"scalars": scalars, "error_sq": error_sq}
        self._acc = dict.fromkeys(_ACCOUNTS, 0.0)
        self.step += 1

    # ------------------------------------------------------------------ memory per bucket
    def _get_mem(self, key: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if (e := self.memory.residual(key)) is not None:
            out["error"] = e
        if self.momentum_correction is not None and (b := self.momentum_correction.buffers(key)):
            out["u"], out["v"] = b
        return out

    def _pop_mem(self, key: int) -> dict[str, torch.Tensor]:
        out = self._get_mem(key)
        self.memory.pop(key)
        if self.momentum_correction is not None:
            self.momentum_correction.pop(key)
        return out

    def _sync_layout(self, key: int, layout: Layout, buf: torch.Tensor) -> None:
        """Re-key memories by parameter whenever DDP changes which parameters a bucket holds."""
        if not self.memory.enabled and self.momentum_correction is None:
            return
        if not self.layouts.update(key, layout, self._pop_mem):
            return
        if sum(math.prod(s) for _, s in layout) != buf.numel():
            raise RuntimeError(
                f"bucket {key}: parameters hold {sum(math.prod(s) for _, s in layout)} elements, buffer {buf.numel()}"
            )
        mem = self.layouts.assemble(key, ("u", "v") if self.momentum_correction is not None else ("error",), buf)
        if "error" in mem:
            self.memory.set_residual(key, mem["error"])
        if self.momentum_correction is not None and "u" in mem and "v" in mem:
            self.momentum_correction.set_buffers(key, mem["u"], mem["v"])


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

        # not run: needs a DDP process group (tests/compression runs it in 2 gloo processes)
        state = CompressionHookState(RandomK(0.01, seed=0), warmup_steps=2)
        ddp_model.register_comm_hook(state, compressed_allreduce_hook)
    """
    return state._run(bucket)


# ---------------------------------------------------------------------- collectives
def _allreduce_mean(
    buf: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Dense path, identical to torch's default ``allreduce_hook``."""
    buf.div_(world)  # divide first to avoid overflow in low precision
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _allreduce_mean_bf16(
    buf: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Dense path in bfloat16 on the wire, as torch's ``bf16_compress_hook``: half the bytes."""
    half = buf.to(torch.bfloat16).div_(world)

    def _back(fut: torch.futures.Future[Any]) -> torch.Tensor:
        return buf.copy_(fut.value()[0])

    return dist.all_reduce(half, group=group, async_op=True).get_future().then(_back)


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
