"""What DeepSpeed's engine holds for each module parameter: its gradient and its fp32 master weight.

Under DeepSpeed ZeRO the optimizer does not hold the module's parameters. ZeRO-1/2 keep one flat fp32 partition
per parameter group on each rank (the master weights the optimizer steps, copied back into the module after each
step), and the reduced gradients live in DeepSpeed's own buffers (``p.grad`` is ``None`` by the time Lightning
calls ``on_before_optimizer_step``); ZeRO-3 also partitions the module's parameters. So a callback that reads or
writes ``p.grad`` or ``p`` silently does nothing there: the write is lost at the next step. These helpers go
through DeepSpeed's public per-parameter API (``deepspeed.utils.safe_get_full_grad``, ``safe_set_full_grad``,
``safe_get_full_fp32_param``, ``safe_set_full_fp32_param``), which maps each parameter to its fragments of the flat
partitions on every stage.

Every function here is a collective under ZeRO (an all-reduce per parameter): call it on every rank, with the
same parameters in the same order.

Glue level: knows Lightning's strategy classes, imports ``deepspeed`` only when a DeepSpeed strategy is in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["deepspeed_stage", "full_fp32_params", "full_grads", "set_fp32_params", "set_grads"]


def deepspeed_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a Lightning ``DeepSpeedStrategy`` (0 when ZeRO is off), ``None`` for any other strategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    zero = (strategy.config or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0))


def full_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The whole reduced fp32 gradient of each parameter (a new tensor under ZeRO; ``p.grad`` itself otherwise).

    Valid between the backward pass and DeepSpeed's optimizer step (``on_before_optimizer_step``).

    Raises:
        RuntimeError: when DeepSpeed has no gradient for a parameter (outside that window).
    """
    from deepspeed.utils import safe_get_full_grad

    grads = [safe_get_full_grad(p) for p in params]
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise RuntimeError(f"DeepSpeed holds no gradient for parameters {missing} of {len(params)}")
    return grads


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Make ``grads`` (whole, as from :func:`full_grads`) the gradients DeepSpeed's optimizer step will use."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    for p, g in zip(params, grads, strict=True):
        if g is p.grad:  # `full_grads` returned `p.grad` itself: already changed in place
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: see _local_partition
            safe_set_local_grad(p, _local_partition(p, g))
        else:
            safe_set_full_grad(p, g)


def full_fp32_params(params: Sequence[Tensor]) -> list[Tensor]:
    """The whole fp32 master weight of each parameter (new tensors), which DeepSpeed's optimizer steps.

    Raises:
        RuntimeError: when DeepSpeed keeps no master weight for a parameter (ZeRO off: the module's parameters are
            the optimizer's).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    weights = [safe_get_full_fp32_param(p) for p in params]
    if any(w is None for w in weights):
        raise RuntimeError("DeepSpeed keeps no fp32 master weights for these parameters")
    return weights


def set_fp32_params(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """Write whole ``values`` into each parameter's fp32 master weight (each rank keeps its own fragment).

    The module's parameters follow at DeepSpeed's next optimizer step, which copies the master weights back.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for p, v in zip(params, values, strict=True):
        if hasattr(p, "ds_id"):  # ZeRO-3: see _local_partition
            safe_set_local_fp32_param(p, _local_partition(p, v))
        else:
            safe_set_full_fp32_param(p, v)


def _local_partition(p: Any, value: Tensor) -> Tensor:
    """This rank's slice of a whole ``value`` of a ZeRO-3 parameter ``p``, padded as DeepSpeed pads its partitions.

    ZeRO-3 pads each parameter to a multiple of its partition count and gives rank r the r-th slice of
    ``p.ds_tensor.numel()`` entries. DeepSpeed 0.19's whole-value setters (``safe_set_full_grad``,
    ``safe_set_full_fp32_param`` at stage 3) slice the unpadded value, so on the last rank of a parameter whose
    size is not a multiple of the world size they read past its end (``RuntimeError: start + length exceeds
    dimension size``; the full-param setter even asserts the unpadded size): write each rank's slice through the
    local setters instead.
    """
    import torch.distributed as dist

    n = p.ds_tensor.numel()
    start = n * dist.get_rank(group=p.ds_process_group)
    flat = value.reshape(-1)
    out = flat.new_zeros(n)
    take = max(0, min(n, flat.numel() - start))
    out[:take] = flat[start : start + take]
    return out
