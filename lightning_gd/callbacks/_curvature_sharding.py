"""Curvature under sharded strategies: which strategy shards the parameters, and the operator that measures there.

Where the parameters are sharded (FSDP2 through Lightning's ``ModelParallelStrategy``, FSDP1 through
``FSDPStrategy``, DeepSpeed ZeRO-3) no rank holds a whole parameter and double backward is not available: the
forward runs on all-gathered copies. The curvature callbacks then measure with
:class:`~lightning_gd.curvature.FiniteDifferenceOperator`: central differences of gradients that the strategy's own
forward and backward compute (FSDP's all-gather and reduce-scatter, ZeRO-3's partitioned gradients), on vectors that
are each rank's shard. The gradient a sharded backward leaves is already the mean over the data-parallel ranks, so
the operator is the Hessian of the global batch's loss, as the rank-averaged operator under DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_gd.curvature import FiniteDifferenceOperator, OperatorMode

Sharding = Literal["fsdp2", "fsdp1", "zero3"]

_NAMES = {"fsdp2": "FSDP2 (ModelParallelStrategy)", "fsdp1": "FSDP (FSDPStrategy)", "zero3": "DeepSpeed ZeRO stage 3"}


def sharding(strategy: Any) -> Sharding | None:
    """How ``strategy`` shards the parameters: ``"fsdp2"``, ``"fsdp1"``, ``"zero3"``, or ``None`` (whole on every
    rank: single device, DDP, DeepSpeed ZeRO-1/2)."""
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if getattr(strategy, "zero_stage_3", False):
        return "zero3"
    return None


def sharding_name(kind: Sharding) -> str:
    """The strategy's name in messages."""
    return _NAMES[kind]


def check_sharded_strategy(strategy: Any, owner: str, hvp: str, curvature: str) -> Sharding | None:
    """Accept a strategy whose gradients the callbacks can obtain; return how it shards the parameters.

    Raises:
        MisconfigurationException: naming the strategy, for one whose gradients cannot be obtained (an FSDP-like
            strategy that is neither Lightning's ``FSDPStrategy`` nor ``ModelParallelStrategy``; tensor parallelism),
            an exact ``hvp`` or a GGN/Fisher curvature on sharded parameters.
    """
    name = type(strategy).__name__
    kind = sharding(strategy)
    if kind is None:
        if "FSDP" in name or "ZeRO3" in name.upper():
            raise MisconfigurationException(
                f"{owner} cannot obtain the gradients under {name}: it shards the parameters but is neither"
                " Lightning's FSDPStrategy, ModelParallelStrategy (FSDP2) nor DeepSpeedStrategy. Use one of those,"
                " DDP or DeepSpeed ZeRO stage 1/2."
            )
        return None
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if kind == "fsdp2" and isinstance(tp, int) and tp > 1:
        raise MisconfigurationException(
            f"{owner} cannot obtain the gradients under {name} with tensor_parallel_size={tp}: only data-parallel"
            " sharding (fully_shard over a 1-D mesh, tensor_parallel_size=1) keeps each rank's gradient a contiguous"
            " shard of every parameter."
        )
    if hvp in ("double_backward", "forward_over_reverse"):
        raise MisconfigurationException(
            f"{owner}(hvp={hvp!r}) cannot run under {name}: {sharding_name(kind)} shards the parameters and runs the"
            " forward on gathered copies, so there is no double backward or forward-mode product. Use hvp='auto' or"
            " 'finite_difference' (central differences of the strategy's own gradients)."
        )
    if curvature != "hessian":
        raise MisconfigurationException(
            f"{owner}(curvature={curvature!r}) cannot run under {name}: on sharded parameters only the Hessian is"
            " measured (by finite differences of gradients). Use curvature='hessian'."
        )
    return kind


def local_numel(p: Tensor) -> int:
    """Entries of ``p`` this rank holds: a DTensor's local shard, a ZeRO-3 partition, else the whole tensor."""
    if hasattr(p, "to_local"):
        return int(p.to_local().numel())  # type: ignore[operator]
    ds = getattr(p, "ds_tensor", None)
    if ds is not None:
        return int(min(ds.numel(), max(0, p.ds_numel - _zero3_offset(p))))  # type: ignore[attr-defined]
    return int(p.numel())


def sharded_operator(
    trainer: Trainer,
    pl_module: LightningModule,
    loss: Callable[[LightningModule, Any], Tensor],
    batches: list[Any],
    params: list[Tensor] | None,
    mode: OperatorMode,
) -> FiniteDifferenceOperator:
    """The Hessian of ``loss(pl_module, batches)`` (mean over the data-parallel ranks) by central differences of the
    strategy's own gradients, on this rank's shards of ``params`` (default: every trainable parameter)."""
    strategy = trainer.strategy
    kind = sharding(strategy)
    if kind == "zero3":
        return _zero3_operator(trainer, pl_module, loss, batches, params, mode)
    model: Any = pl_module
    run_loss: Callable[[], Tensor] = lambda: loss(pl_module, batches)  # noqa: E731
    shard_fn = allreduce = None
    if kind == "fsdp1":  # the root FSDP instance wraps the LightningModule: its forward gathers the root's parameters
        model = strategy.model
        run_loss = _redirected(strategy, pl_module, loss, batches)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        shard_fn, allreduce = _fsdp1_shards(), _world_sum

    def gradient_fn() -> list[Tensor | None]:
        run_loss().backward()  # the strategy's own backward: each rank's shard of the global batch's gradient
        return [p.grad for p in measured]

    op = FiniteDifferenceOperator(
        model, gradient_fn, params, loss_fn=run_loss, mode=mode, shard_fn=shard_fn, allreduce=allreduce
    )
    measured = op.params
    return op


def _world_sum(t: Tensor) -> Tensor:
    buf = t.clone()
    dist.all_reduce(buf)
    return buf


def _redirected(
    strategy: Any, pl_module: LightningModule, loss: Callable[[LightningModule, Any], Tensor], batches: list[Any]
) -> Callable[[], Tensor]:
    """The loss computed through the strategy's wrapper (Lightning's forward redirection), so that FSDP1's root
    instance gathers and reshards its parameters around it."""

    def run() -> Tensor:
        pl_module._lgd_curvature_loss = lambda: loss(pl_module, batches)  # type: ignore[attr-defined]
        try:
            return strategy._forward_redirection(strategy.model, pl_module, "_lgd_curvature_loss")
        finally:
            del pl_module._lgd_curvature_loss

    return run


def _fsdp1_shards() -> Callable[[Tensor], tuple[Tensor, int]]:
    """FSDP1's flat parameters: each rank's contiguous shard of the padded flat vector, padding left out."""
    rank = dist.get_rank()

    def shard(p: Tensor) -> tuple[Tensor, int]:
        padded = int(getattr(p, "_shard_numel_padded", 0))
        n = p.numel()
        return p.view(-1)[: n - padded], rank * n

    return shard


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
def _zero3_offset(p: Tensor) -> int:
    return int(dist.get_rank(group=getattr(p, "ds_process_group", None))) * int(p.ds_tensor.numel())  # type: ignore[attr-defined]


def _zero3_operator(
    trainer: Trainer,
    pl_module: LightningModule,
    loss: Callable[[LightningModule, Any], Tensor],
    batches: list[Any],
    params: list[Tensor] | None,
    mode: OperatorMode,
) -> FiniteDifferenceOperator:
    """ZeRO-3: perturb each rank's partition (``p.ds_tensor``, which every forward gathers from), take the gradient
    partition the engine's backward reduce-scatters (``safe_get_local_grad``), and leave the engine's gradient
    buffers and micro-step counters as the optimizer step left them."""
    from deepspeed.utils import safe_get_local_grad

    engine = trainer.strategy.deepspeed_engine  # type: ignore[attr-defined]
    optimizer = engine.optimizer

    def shard(p: Tensor) -> tuple[Tensor, int]:
        valid = local_numel(p)
        return p.ds_tensor.view(-1)[:valid], _zero3_offset(p)  # type: ignore[attr-defined]

    def gradient_fn() -> list[Tensor | None]:
        with _engine_state_kept(engine, optimizer), _gathered_copies_dropped(engine):
            engine.backward(loss(pl_module, batches), scale_wrt_gas=False)
            grads = []
            for p in measured:
                g = safe_get_local_grad(p)
                grads.append(None if g is None else g.reshape(-1)[: local_numel(p)].clone())
        return grads

    def run_loss() -> Tensor:
        with _gathered_copies_dropped(engine):
            return loss(pl_module, batches)

    op = FiniteDifferenceOperator(
        pl_module, gradient_fn, params, loss_fn=run_loss, mode=mode, shard_fn=shard, allreduce=_world_sum
    )
    measured = op.params
    return op


@contextlib.contextmanager
def _gathered_copies_dropped(engine: Any) -> Iterator[None]:
    """Release every gathered parameter before and after a forward at perturbed weights.

    ZeRO-3 keeps the gathered copy of a parameter that a forward uses several times (an RNN's recurrent weights)
    between forwards; a forward at θ ± h v would then read the copy gathered before the partitions were perturbed
    (measured: λ_max 1.91 instead of DDP's 5.57), and training after the check could read a copy gathered at θ - h v.
    """
    # The ZeRO-3 optimizer's own release (`engine.empty_partition_cache()` adds a full `gc.collect()`: 0.36 s each
    # on the test machine, four per product).
    release = engine.optimizer.empty_partition_cache
    release()
    try:
        yield
    finally:
        release()


@contextlib.contextmanager
def _engine_state_kept(engine: Any, optimizer: Any) -> Iterator[None]:
    """Put back what an extra ``engine.backward`` changes: the ZeRO-3 optimizer's gradient partitions (zeroed, as
    after the optimizer's own step) and micro-step counters, the engine's backward bookkeeping."""
    saved = {k: v for k, v in vars(engine).items() if isinstance(v, int | float | bool) and not isinstance(v, Tensor)}
    saved_opt = {
        k: v for k, v in vars(optimizer).items() if isinstance(v, int | float | bool) and not isinstance(v, Tensor)
    }
    try:
        yield
    finally:
        optimizer.zero_grad(set_to_none=True)
        for k, v in saved_opt.items():
            setattr(optimizer, k, v)
        for k, v in saved.items():
            setattr(engine, k, v)
