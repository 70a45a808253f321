"""Per-parameter optimizer state: which optimizer owns a parameter, and the Adam moments it keeps for it.

The one place that answers "is this Adam?" (:func:`is_adam_family`) and "what are this parameter's Adam moments?"
(:func:`adam_moments`), for any number of optimizers: a GAN's generator and discriminator optimizers, a module
whose ``configure_optimizers`` returns several, or one optimizer with several parameter groups. Each measured
parameter gets its moments from whichever optimizer owns it, with that group's ``lr``, ``betas`` and ``eps``.

Reading the state is dispatched per optimizer type (:func:`_reader_for`): a reader yields ``(parameter, group,
state)`` for every parameter the optimizer updates. Three readers:

* the ``torch.optim`` contract (``param_groups`` and a ``state`` keyed by the parameter), which every
  ``torch.optim`` optimizer, timm's and ours follow;
* DeepSpeed's ZeRO optimizers (stages 1, 2 and 3), which keep one flat fp32 partition per group (per sub-group at
  stage 3) on each rank instead of per-parameter state: each module parameter's whole state comes from DeepSpeed's
  public ``deepspeed.utils.safe_get_full_optimizer_state`` (an all-reduce of every rank's fragment), its group and
  step from the flat partition it lives in;
* ``torch.distributed.optim.ZeroRedundancyOptimizer``, which keeps each parameter's state on the one rank that
  owns it (in its local ``optim``): an all-reduce in which only the owner contributes gives every rank the state.

The two distributed readers are collectives, run lazily when a state entry is read: every rank must read the
same entries of the same parameters in the same order (the callbacks measure on every rank, in lockstep). A
parameter whose state cannot be found reads as "not found" (``None``), never as a wrong moment.

Glue level: knows ``torch.optim`` (and DeepSpeed's optimizer attributes, without importing DeepSpeed unless one
is in use), imports nothing from Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["AdamMoments", "Owner", "adam_moments", "is_adam_family", "owner_of"]

# (parameter, its param group, its state) for every parameter an optimizer updates.
_StateReader = Callable[[Any], Iterator[tuple[Tensor, Mapping[str, Any], Mapping[str, Any]]]]


@dataclass(frozen=True)
class AdamMoments:
    """The Adam second moment of one parameter, with the hyperparameters of the group that owns it.

    Attributes:
        exp_avg_sq: ``v_t``, the EMA of squared gradients, shaped like the parameter (the optimizer's own tensor,
            not a copy: read it, never write it).
        step: ``t``, the number of steps the optimizer took for this parameter.
        beta1: First-moment EMA coefficient.
        beta2: Second-moment EMA coefficient.
        eps: The ``eps`` added to ``sqrt(v_hat)``.
        lr: The group's current learning rate.
        optimizer_index: Position of the owning optimizer in the list given to :func:`adam_moments`.
    """

    exp_avg_sq: Tensor
    step: float
    beta1: float
    beta2: float
    eps: float
    lr: float
    optimizer_index: int


def is_adam_family(param_group: Mapping[str, Any]) -> bool:
    """Whether a parameter group belongs to an Adam-family optimizer: it has Adam's ``betas`` (EMA moments).

    The single answer to "is this Adam?" in the package (``SharpnessTracker``'s preconditioned mode and the
    compression hook's momentum check both ask it). Adam, AdamW, NAdam, RAdam, timm's Adam family, Lamb, Lion and
    Adan all say yes: they keep an EMA momentum. Whether a parameter also has the second moment Cohen et al.'s
    preconditioner needs is :func:`adam_moments`' question (Lion and Adan, for instance, do not give one).

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> is_adam_family(torch.optim.AdamW([w]).param_groups[0]), is_adam_family(torch.optim.SGD([w]).param_groups[0])
        (True, False)
    """
    return bool(param_group.get("betas"))


class Owner(NamedTuple):
    """The optimizer (its index in the list given) and the parameter group that update a parameter."""

    index: int
    group: Mapping[str, Any]


def owner_of(optimizers: Sequence[Any], params: Iterable[Tensor]) -> list[Owner | None]:
    """For each parameter, the first optimizer of ``optimizers`` that updates it and its group, or ``None``.

    Example::

        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> [o if o is None else (o.index, o.group["lr"]) for o in owner_of([torch.optim.SGD([w], lr=0.5)], [w, b])]
        [(0, 0.5), None]
    """
    owner: dict[int, Owner] = {}
    for index, optimizer in enumerate(optimizers):
        for p, group, _ in _reader_for(optimizer)(optimizer):
            owner.setdefault(id(p), Owner(index, group))
    return [owner.get(id(p)) for p in params]


def adam_moments(optimizers: Sequence[Any], params: Iterable[Tensor]) -> list[AdamMoments | None]:
    """For each parameter, its Adam moments from whichever optimizer owns it, or ``None`` when there are none.

    ``None`` means, explicitly: no optimizer in ``optimizers`` updates the parameter; or its owner is not of the
    Adam family (:func:`is_adam_family`); or the owner keeps no per-parameter ``exp_avg_sq`` shaped like the
    parameter with a ``step`` count and a pair ``betas`` plus ``eps`` (Lion, Adan's three betas, a projected
    second moment, a state not created yet because the optimizer has not stepped). DeepSpeed ZeRO's flat
    partitions and ``ZeroRedundancyOptimizer``'s per-rank shards are mapped back to the parameters (gathered
    across ranks: call this on every rank, see the module docs). A parameter updated by two optimizers gets the
    first one's.

    Args:
        optimizers: The optimizers, e.g. ``trainer.optimizers``.
        params: The parameters to look up.

    Returns:
        One entry per parameter, in order.

    Example::

        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(1))
        >>> adam, sgd = torch.optim.Adam([w], lr=0.1), torch.optim.SGD([b], lr=0.5)
        >>> (w.sum() + b.sum()).backward(); adam.step(); sgd.step()
        >>> [m if m is None else (m.step, m.lr, m.optimizer_index) for m in adam_moments([adam, sgd], [w, b])]
        [(1.0, 0.1, 0), None]
    """
    found: dict[int, AdamMoments | None] = {}
    for index, optimizer in enumerate(optimizers):
        for p, group, state in _reader_for(optimizer)(optimizer):
            if id(p) not in found:
                found[id(p)] = _adam_from(p, group, state, index)
    return [found.get(id(p)) for p in params]


def _adam_from(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any], index: int) -> AdamMoments | None:
    """The moments of ``p`` if its group and state are Adam's (see :func:`adam_moments`), else ``None``."""
    if not is_adam_family(group) or "eps" not in group:
        return None
    betas = tuple(group["betas"])
    if len(betas) != 2:
        return None
    v = state.get("exp_avg_sq")
    step = state.get("step", group.get("step"))
    shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 parameter is an empty placeholder of its whole shape
    if not isinstance(v, Tensor) or v.shape != shape or step is None:
        return None
    step = float(step.item() if isinstance(step, Tensor) else step)
    if step < 1:
        return None
    return AdamMoments(
        exp_avg_sq=v,
        step=step,
        beta1=float(betas[0]),
        beta2=float(betas[1]),
        eps=float(group["eps"]),
        lr=float(group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]),
        optimizer_index=index,
    )


def _torch_reader(optimizer: torch.optim.Optimizer) -> Iterator[tuple[Tensor, Mapping[str, Any], Mapping[str, Any]]]:
    """The ``torch.optim`` contract: ``param_groups`` and a ``state`` keyed by the parameter tensor."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p, group, optimizer.state.get(p, {})


class _GatheredState(Mapping[str, Any]):
    """One parameter's optimizer state, each entry gathered across ranks when first read (see the module docs).

    ``fetch(key)`` returns the whole entry or raises ``KeyError`` on every rank alike (the ranks agree on which
    entries exist before any collective that moves one).
    """

    def __init__(self, keys: Iterable[str], fetch: Callable[[str], Any]) -> None:
        self._keys = tuple(keys)
        self._fetch = fetch
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._cache:
            self._cache[key] = self._fetch(key)  # may raise KeyError: then not cached, and asked again next time
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _is_deepspeed_zero(optimizer: Any) -> bool:
    """DeepSpeed's ZeRO-1/2 (``DeepSpeedZeroOptimizer``) or ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``) optimizer."""
    return type(optimizer).__module__.startswith("deepspeed.runtime.zero") and (
        hasattr(optimizer, "bit16_groups") or hasattr(optimizer, "sub_group_to_group_id")
    )


def _deepspeed_reader(optimizer: Any) -> Iterator[tuple[Tensor, Mapping[str, Any], Mapping[str, Any]]]:
    """DeepSpeed ZeRO: the module's parameters of each group, their state gathered from the flat partitions.

    ``bit16_groups`` (ZeRO-1/2: the module's parameters of each group) and ``fp16_groups`` with
    ``sub_group_to_group_id`` (ZeRO-3: sub-groups of a group) are the lists DeepSpeed's own checkpoint code walks;
    the values come from its public ``safe_get_full_optimizer_state``. The step count is the flat partition's
    (every parameter of a group steps together).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(optimizer, "bit16_groups"):
        members = list(enumerate(optimizer.bit16_groups))
    else:
        members = [(optimizer.sub_group_to_group_id[s], params) for s, params in enumerate(optimizer.fp16_groups)]
    for index, params in members:
        group = optimizer.param_groups[index]
        flat_state = next((optimizer.state[f] for f in group["params"] if optimizer.state.get(f)), {})
        # Entries shaped like the partition (exp_avg, exp_avg_sq), each gathered per parameter; scalars (the step
        # count) are the group's.
        keys = tuple(flat_state)
        for p in params:

            def fetch(key: str, p: Tensor = p, flat_state: Mapping[str, Any] = flat_state) -> Any:
                value = flat_state[key]
                if isinstance(value, Tensor) and value.dim() > 0:
                    return safe_get_full_optimizer_state(p, key)
                return value

            yield p, group, _GatheredState(keys, fetch)


def _zero_redundancy_reader(zero: Any) -> Iterator[tuple[Tensor, Mapping[str, Any], Mapping[str, Any]]]:
    """``ZeroRedundancyOptimizer``: every parameter of its groups, its state from the rank that owns it.

    Each parameter's state lives in the local optimizer (``zero.optim``) of exactly one rank: an all-reduce (sum)
    in which the other ranks contribute zeros gives it to every rank. Whether the owner has the entry at all is
    agreed first (an all-reduce of a presence flag), so a missing entry is missing on every rank.
    """
    import torch.distributed as dist

    local = zero.optim.state
    for group in zero.param_groups:
        for p in group["params"]:

            def fetch(key: str, p: Tensor = p) -> Any:
                value = local.get(p, {}).get(key)
                present = torch.tensor(float(value is not None), device=p.device)
                dist.all_reduce(present, group=zero.process_group)
                if present.item() == 0:
                    raise KeyError(key)
                template = p.detach() if key != "step" else torch.zeros((), dtype=torch.float32, device=p.device)
                buf = torch.zeros_like(template)
                if value is not None:
                    buf.copy_(torch.as_tensor(value).to(device=p.device, dtype=buf.dtype).reshape(buf.shape))
                dist.all_reduce(buf, group=zero.process_group)
                return buf

            yield p, group, _GatheredState(("exp_avg_sq", "exp_avg", "step"), fetch)


def _reader_for(optimizer: Any) -> _StateReader:
    """The state reader for this optimizer's type (see the module docs)."""
    if _is_deepspeed_zero(optimizer):
        return _deepspeed_reader
    if torch.distributed.is_available():
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if isinstance(optimizer, ZeroRedundancyOptimizer):
            return _zero_redundancy_reader
    return _torch_reader
