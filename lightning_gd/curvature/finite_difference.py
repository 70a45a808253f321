"""The Hessian of a model's loss from gradients a caller computes: central differences, vectors as each rank's shard.

:class:`FiniteDifferenceOperator` applies ``H v ~ (g(theta + h v) - g(theta - h v)) / 2h`` (the step and its error:
``_differences``) with ``g`` from a callable, so the gradients come from whatever trains the model: a sharded
strategy's own forward and backward (FSDP2's all-gather and reduce-scatter, DeepSpeed ZeRO-3's partitions), a
``torch.compile``d module, fused attention kernels. Nothing here knows a strategy: the caller says which tensors
this rank owns and how to sum over ranks.

Vectors as shards. When the parameters are sharded, a vector is what this rank owns: the concatenation of its
shards' entries, in parameter order. The operator then exposes ``allreduce`` (sum over the ranks that share the
vectors), ``global_numel`` and ``segments`` (where the local entries sit in the global vector), and every estimator
(:func:`~lightning_gd.curvature.lanczos`, :func:`~lightning_gd.curvature.hutchinson_trace`,
:func:`~lightning_gd.curvature.spectral_density`) runs unchanged on it: inner products and norms are all-reduced,
random probes are the global vector's entries at this rank's positions (the same seed gives the same global vector
on any number of ranks, and the same as an unsharded operator of the same parameters), and each rank holds the
estimator's stated number of vectors, each of its own shard's size. The global vector is in the order an unsharded
:class:`~lightning_gd.curvature.HessianOperator` of the same parameters uses (each whole parameter flattened, in
``named_parameters()`` order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gd.curvature._differences import (
    GradientFn,
    _central_differences,
    finite_difference_eps,
    finite_difference_error,
)
from lightning_gd.curvature.operator import OperatorMode, _check_fd_eps, _flatten, _ModelOperator

__all__ = ["FiniteDifferenceOperator", "finite_difference_eps", "finite_difference_error"]

# (local tensor this rank owns and perturbs, offset of its first entry in the flattened whole parameter)
Shard = tuple[Tensor, int]
ShardFn = Callable[[Tensor], Shard]


class FiniteDifferenceOperator(_ModelOperator):
    """Hessian-vector products by central differences of gradients from ``gradient_fn``, on this rank's shards.

    Every product perturbs this rank's part of each measured parameter in place (``theta +- h v``), calls
    ``gradient_fn`` at each point, and copies the saved values back bit for bit (also when ``gradient_fn`` raises).
    Around every call the measurement context of :class:`~lightning_gd.curvature.HessianOperator` holds: modes set
    and restored, the RNG forked and reseeded with ``seed`` before each call, buffers and every parameter's ``.grad``
    restored, autocast off; ``.grad`` is set to ``None`` before each call, so that a ``gradient_fn`` that runs
    ``loss.backward()`` (the sharded strategies' way) starts from no gradient and leaves none behind. Fused attention
    kernels are kept (first derivatives only).

    Two gradients per product: about two training steps without the optimizer's. Memory per rank beyond the output
    and what ``gradient_fn`` allocates: one copy of the rank's shards (in their dtype).

    Args:
        model: The module (its modes, buffers, gradients and RNG are left as found).
        gradient_fn: ``gradient_fn() -> [gradient of each measured parameter's shard]``, at the current weights:
            tensors shaped like the shards (``None``: zero; a ``DTensor`` is read through ``to_local()``). E.g.
            ``loss.backward()`` then each ``p.grad``; under data parallelism, the gradient of the global batch's loss.
        params: Parameters of ``model`` (default: every trainable one, in ``named_parameters()`` order).
        loss_fn: ``loss_fn() -> scalar``, the loss at the current weights, for :meth:`loss` (optional).
        mode: ``"eval"`` or ``"train"`` (see :class:`~lightning_gd.curvature.HessianOperator`).
        seed: Seed of the forked RNG before every call.
        eps: Relative step (> 0); ``None``: ``finfo(compute_dtype).eps ** (1/3)``.
        compute_dtype: The dtype the gradients are computed in, which sets the default step (default: the shards'
            dtype; pass ``torch.bfloat16`` when the forward runs in bfloat16, e.g. FSDP2's ``MixedPrecisionPolicy``).
        shard_fn: ``shard_fn(p) -> (local tensor, offset)``: the part of ``p`` this rank owns and perturbs, and the
            offset of its first entry in ``p`` flattened (a contiguous range). Default: a ``DTensor`` sharded on
            dim 0 over a 1-D mesh (FSDP2's ``fully_shard``) gives its local shard; any other tensor is whole.
        allreduce: ``allreduce(t) -> sum of t over the ranks that hold parts of a vector``. Default: over the
            DTensors' mesh when the parameters are sharded ``DTensor``\\ s, else none (unsharded vectors).

    Raises:
        ValueError: On a bad ``mode``/``eps``/parameter selection, parameters that are ``DTensor``\\ s sharded
            otherwise than on dim 0 of one 1-D mesh, or sharded parameters mixed with whole ones.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gd.curvature import FiniteDifferenceOperator, HessianOperator
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> def loss_fn(): return nn.functional.mse_loss(model(x), y)
        >>> def gradient_fn():
        ...     loss_fn().backward()  # the ordinary backward: .grad is cleared before and restored after
        ...     return [p.grad for p in model.parameters()]
        >>> fd = FiniteDifferenceOperator(model, gradient_fn, loss_fn=loss_fn)
        >>> exact = HessianOperator(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
        >>> v = torch.ones(4, dtype=torch.float64)
        >>> bool(((fd.matvec(v) - exact.matvec(v)).norm() / exact.matvec(v).norm()) < 1e-8)
        True
    """

    _finite_difference = True

    def __init__(
        self,
        model: nn.Module,
        gradient_fn: GradientFn,
        params: Iterable[Tensor] | None = None,
        *,
        loss_fn: Callable[[], Tensor] | None = None,
        mode: OperatorMode = "eval",
        seed: int = 0,
        eps: float | None = None,
        compute_dtype: torch.dtype | None = None,
        shard_fn: ShardFn | None = None,
        allreduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(gradient_fn):
            raise ValueError(f"gradient_fn must be callable, got {gradient_fn!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable or None, got {loss_fn!r}")
        _reshard(model)  # registered parameters are the sharded ones only while every FSDP2 module is resharded
        super().__init__(model, None, params, "finite_difference", mode, seed, None)
        self._gradient_fn = gradient_fn
        self._loss_fn = loss_fn
        whole = tuple(_whole_numel(p) for p in self._params)
        if shard_fn is None:
            shard_fn, default_reduce = _default_shards(self._names, self._params)
            allreduce = allreduce if allreduce is not None else default_reduce
        shards = [shard_fn(p) for p in self._params]
        self._locals = tuple(t for t, _ in shards)
        self._numels = tuple(t.numel() for t in self._locals)
        for name, (local, offset), n in zip(self._names, shards, whole, strict=True):
            if not 0 <= offset <= n - local.numel():
                raise ValueError(
                    f"shard_fn: the shard of {name!r} ({local.numel()} entries at offset {offset}) is not a range of"
                    f" its {n} entries"
                )
        if allreduce is not None and not callable(allreduce):
            raise ValueError(f"allreduce must be callable or None, got {allreduce!r}")
        self.allreduce = allreduce
        starts = [0]
        for n in whole:
            starts.append(starts[-1] + n)
        self._global_numel = starts[-1]
        segments: list[tuple[int, int]] = []
        for start, (local, offset) in zip(starts, shards, strict=False):
            if segments and segments[-1][0] + segments[-1][1] == start + offset:  # contiguous: one range
                segments[-1] = (segments[-1][0], segments[-1][1] + local.numel())
            elif local.numel():
                segments.append((start + offset, local.numel()))
        self._segments = tuple(segments)
        self._fd_eps = _check_fd_eps(eps, compute_dtype or self._locals[0].dtype)

    # ------------------------------------------------------------------ layout
    @property
    def numel(self) -> int:
        """Number of entries this rank holds (the length of the vectors it receives)."""
        return sum(self._numels)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the shards (that of the first)."""
        return self._locals[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the shards (that of the first)."""
        return self._locals[0].device

    @property
    def global_numel(self) -> int:
        """Dimension of the space: every measured parameter's whole size."""
        return self._global_numel

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """``(global offset, length)`` of this rank's entries in the global vector, in local order."""
        return self._segments

    @property
    def eps(self) -> float:
        """The relative step of the central differences."""
        return self._fd_eps

    # ------------------------------------------------------------------ values
    def gradient(self) -> Tensor:
        """Return this rank's part of the flat gradient at the current weights (same context as the products)."""
        _reshard(self._model)  # before the context saves the registered parameters' .grad
        with self._measuring(math_attention=False):
            return self._flatten(self._local_gradients())

    def loss(self) -> Tensor:
        """Return the (detached, scalar) loss from ``loss_fn`` in the measurement context."""
        if self._loss_fn is None:
            raise ValueError("FiniteDifferenceOperator.loss() needs the loss_fn argument")
        _reshard(self._model)
        try:
            with self._measuring(math_attention=False), torch.no_grad():
                self._reseed()
                loss = self._loss_fn()
        finally:
            _reshard(self._model)  # a forward without backward leaves FSDP2's root modules unsharded
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return loss.detach().reshape(())

    def __repr__(self) -> str:
        sharded = f", sharded: {self.numel} of {self.global_numel}" if self.allreduce is not None else ""
        return (
            f"FiniteDifferenceOperator(numel={self.numel}{sharded}, params={len(self._names)}, eps={self._fd_eps:.3g},"
            f" mode={self._mode!r})"
        )

    # ------------------------------------------------------------------ internals
    def _products(self, V: Tensor, method: str) -> Tensor:
        total = self.allreduce if self.allreduce is not None else (lambda t: t)
        _reshard(self._model)  # before the context saves the registered parameters' .grad
        with self._measuring(math_attention=False):
            return _central_differences(self._locals, self._local_gradients, V, self._fd_eps, total)

    def _local_gradients(self) -> list[Tensor | None]:
        _reshard(self._model)  # an FSDP2 module left unsharded would compute with its stale unsharded copy
        params = list(self._model.parameters())
        for p in params:
            p.grad = None  # a backward accumulates into .grad: start from none (the found ones come back at exit)
        self._reseed()
        try:
            grads = list(self._gradient_fn())
            if len(grads) != len(self._params):
                raise ValueError(f"gradient_fn must return {len(self._params)} gradients, got {len(grads)}")
            out = []
            for name, g, local in zip(self._names, grads, self._locals, strict=True):
                if g is not None and hasattr(g, "to_local"):
                    g = g.to_local()
                if g is not None and g.numel() != local.numel():
                    raise ValueError(
                        f"gradient_fn: the gradient of {name!r} has {g.numel()} entries, its shard {local.numel()}"
                    )
                out.append(g)
            return out
        finally:
            _reshard(self._model)
            for p in params:
                p.grad = None

    def _flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return _flatten(tensors, self._numels, self.dtype, self.device)


def _reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 module of ``model`` (``FSDPModule.reshard``; a no-op when already sharded).

    FSDP2 keeps a root module's all-gathered parameters after a forward until its backward, and registers them in
    place of the sharded ones meanwhile: after a forward without backward (a ``no_grad`` loss, a validation step)
    the next forward would reuse that stale copy and ignore the perturbed shards.
    """
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _whole_numel(p: Tensor) -> int:
    """Entries of the whole parameter (``ds_numel`` for a DeepSpeed ZeRO-3 one, whose own tensor is emptied; the
    unpadded flat size for an FSDP1 ``FlatParameter``, which holds one rank's padded shard)."""
    flat = getattr(p, "_unpadded_unsharded_size", None)
    if flat is not None:
        return int(flat.numel())
    return int(getattr(p, "ds_numel", p.numel()))


def _default_shards(
    names: Sequence[str], params: Sequence[Tensor]
) -> tuple[ShardFn, Callable[[Tensor], Tensor] | None]:
    """FSDP2's layout: every parameter a ``DTensor`` sharded on dim 0 of one 1-D mesh (local rows, summed over the
    mesh's group), or none is (whole tensors, no sum)."""
    is_dt = [_is_dtensor(p) for p in params]
    if not any(is_dt):
        return (lambda p: (p, 0)), None
    if not all(is_dt):
        whole = [n for n, d in zip(names, is_dt, strict=True) if not d]
        raise ValueError(
            f"parameters {whole[:4]} are whole tensors while the others are DTensors: every measured parameter must be"
            " sharded the same way (fully_shard the modules that own them)"
        )
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1 or any(p.device_mesh != mesh for p in params):  # type: ignore[attr-defined]
        raise ValueError(
            "DTensor parameters must all live on one 1-D device mesh (data-parallel sharding, FSDP2's fully_shard);"
            f" got {sorted({str(p.device_mesh) for p in params})}"  # type: ignore[attr-defined]
        )
    for name, p in zip(names, params, strict=True):
        (placement,) = p.placements  # type: ignore[attr-defined]
        if not (placement.is_shard() and placement.dim == 0):  # type: ignore[attr-defined]
            raise ValueError(f"parameter {name!r} is placed as {placement}; only Shard(dim=0) (FSDP2) is supported")
    group = mesh.get_group()
    rank, world = mesh.get_local_rank(), mesh.size()

    def shard(p: Tensor) -> Shard:
        with torch.no_grad():
            local = p.to_local()  # type: ignore[attr-defined]
        rows = p.shape[0] if p.ndim else 1
        per = -(-rows // world)  # torch.chunk's split of dim 0: ceil(rows / world) rows per rank, the last fewer
        first = min(rank * per, rows)
        if local.shape[:1] != (min(per, rows - first),) and p.ndim:
            raise ValueError(f"unexpected local shard of shape {tuple(local.shape)} of a parameter of {tuple(p.shape)}")
        return local, first * (p.numel() // rows if rows else 0)

    def allreduce(t: Tensor) -> Tensor:
        buf = t.to(device=params[0].device, copy=True)
        dist.all_reduce(buf, group=group)
        return buf.to(t.device)

    return shard, allreduce


def _is_dtensor(p: Any) -> bool:
    with contextlib.suppress(ImportError):
        from torch.distributed.tensor import DTensor

        return isinstance(p, DTensor)
    return False
