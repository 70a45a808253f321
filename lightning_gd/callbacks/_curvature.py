"""Shared glue of the curvature callbacks: when to measure, on which batch, with which loss, on which ranks.

The math is :mod:`lightning_gd.curvature`; this module only schedules it inside a Trainer, builds the
operator over the right batch and loss, averages it over data-parallel ranks, checks for NaN/inf
consistently on every rank, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_gd.callbacks._budget import OverheadBudget
from lightning_gd.callbacks._curvature_sharding import (
    Sharding,
    check_sharded_strategy,
    local_numel,
    sharded_operator,
    sharding,
    sharding_name,
)
from lightning_gd.callbacks._nonfinite import NonFiniteGuard
from lightning_gd.curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    HvpMethod,
    LossSpec,
    OperatorMode,
    OutputLoss,
    ReducedOperator,
    finite_difference_check,
    finite_difference_error,
    loss_spec,
)
from lightning_gd.curvature._utils import _work_dtype
from lightning_gd.curvature.step_check import DEFAULT_STEP_TOLERANCE, uses_central_differences
from lightning_gd.utils.checks import check_choice, check_number, check_positive_int
from lightning_gd.utils.logging import History, history_from_state, history_to_state, log_to_loggers

LossFn = Callable[[LightningModule, Any], Tensor]
OutputFn = Callable[[LightningModule, Any], tuple[Tensor, Tensor]]

Curvature = Literal["hessian", "ggn", "fisher"]
_CURVATURES: tuple[str, ...] = get_args(Curvature)

BatchMode = Literal["current", "fixed"]
_BATCH_MODES: tuple[str, ...] = get_args(BatchMode)
_MODES: tuple[str, ...] = get_args(OperatorMode)
_HVPS: tuple[str, ...] = get_args(HvpMethod)


def _check_positive(name: str, value: Any) -> None:
    check_positive_int(name, value, error=MisconfigurationException)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    check_choice(name, value, choices, error=MisconfigurationException)


@contextlib.contextmanager
def _silenced_logging(module: LightningModule) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` no-ops while the module's own step computes the loss."""
    saved = {name: vars(module).get(name) for name in ("log", "log_dict")}
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)


def _training_step_loss(module: LightningModule, batch: Any) -> Tensor:
    with _silenced_logging(module):
        out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise MisconfigurationException(
            f"{type(module).__name__}.training_step returned {type(out).__name__}, not a loss tensor;"
            " pass `loss_fn` to the curvature callback"
        )
    return loss


def _mean_loss(loss_fn: LossFn) -> LossFn:
    """Loss averaged over a list of batches (``num_batches`` > 1 measures their mean Hessian)."""

    def loss(module: LightningModule, batches: list[Any]) -> Tensor:
        return sum(loss_fn(module, b) for b in batches) / len(batches)

    return loss


def _check_curvature(curvature: Any, output_fn: Any, loss: Any, loss_fn: Any) -> LossSpec | None:
    """Validate the curvature choice and what it needs; return the loss of the outputs (``None`` for the Hessian)."""
    _check_choice("curvature", curvature, _CURVATURES)
    if curvature == "hessian":
        if output_fn is not None or loss is not None:
            raise MisconfigurationException(
                "`output_fn` and `loss` are for curvature='ggn' or 'fisher'; the Hessian's loss is `loss_fn` (default:"
                " the module's training_step)"
            )
        return None
    if loss_fn is not None:
        raise MisconfigurationException(
            f"curvature={curvature!r} is built from the model's outputs and `loss`, not `loss_fn`: pass `output_fn`"
            " and `loss` instead"
        )
    if output_fn is not None and not callable(output_fn):
        raise MisconfigurationException(f"`output_fn` must be callable, got {output_fn!r}")
    if loss is None:
        raise MisconfigurationException(
            f"curvature={curvature!r} needs `loss`, the loss of the outputs: one of {get_args(OutputLoss)} or the"
            " matching torch.nn loss module"
        )
    try:
        return loss_spec(loss)
    except ValueError as err:
        raise MisconfigurationException(f"curvature={curvature!r}: {err}") from err


def _module_outputs(module: LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    return module.curvature_outputs(batch)  # type: ignore[operator]


def _concatenated(output_fn: OutputFn) -> OutputFn:
    """Outputs and targets of a list of batches, concatenated (the loss's mean over all their terms)."""

    def outputs(module: LightningModule, batches: list[Any]) -> tuple[Tensor, Tensor]:
        pairs = [output_fn(module, b) for b in batches]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([o for o, _ in pairs]), torch.cat([t for _, t in pairs])

    return outputs


def _check_groups(groups: Any) -> dict[str, tuple[str, ...]]:
    """Validate ``groups`` (``{name: pattern or [patterns]}``); return it with every value a tuple of patterns."""
    if groups is None:
        return {}
    if not isinstance(groups, Mapping) or not groups:
        raise MisconfigurationException(
            f"`groups` must be a non-empty mapping of group name to parameter-name pattern(s), got {groups!r}"
        )
    out = {}
    for name, patterns in groups.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise MisconfigurationException(
                f"`groups`: a group name must be a non-empty string without '/', got {name!r}"
            )
        pats = (patterns,) if isinstance(patterns, str) else tuple(patterns) if isinstance(patterns, Sequence) else ()
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise MisconfigurationException(
                f"`groups[{name!r}]` must be a pattern or a non-empty list of patterns (fnmatch, e.g. '*.attn.*'),"
                f" got {patterns!r}"
            )
        out[name] = pats
    return out


def _resolve_groups(
    module: LightningModule, groups: Mapping[str, tuple[str, ...]], owner: str
) -> dict[str, tuple[str, ...]]:
    """Names of the trainable parameters each group's patterns match (``fnmatch`` on ``named_parameters()`` names).

    Raises:
        MisconfigurationException: when a pattern matches no trainable parameter, naming it and a few names.
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    out = {}
    for group, patterns in groups.items():
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(repr(n) for n in names[:6]) + (
                    f", ... ({len(names)} in all)" if len(names) > 6 else ""
                )
                raise MisconfigurationException(
                    f"{owner}: the pattern {pattern!r} of group {group!r} matches no trainable parameter of"
                    f" {type(module).__name__}; its parameters are named like {shown}. Patterns are fnmatch patterns"
                    " on these names, e.g. '*.attn.*'."
                )
        out[group] = tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    return out


def _check_strategy(strategy: Any, owner: str, hvp: str = "auto", curvature: str = "hessian") -> Sharding | None:
    """Accept the strategies whose gradients the callbacks can obtain; return how they shard the parameters.

    Whole parameters (one device, DDP, ZeRO-1/2): ``None``, every product method. Sharded ones (FSDP2 through
    ``ModelParallelStrategy``, ``FSDPStrategy``, DeepSpeed ZeRO-3): the Hessian by central differences of the
    strategy's own gradients (:mod:`lightning_gd.callbacks._curvature_sharding`); an exact ``hvp``, a GGN/Fisher
    curvature, or a strategy whose gradients cannot be obtained are refused, naming the strategy.
    """
    return check_sharded_strategy(strategy, owner, hvp, curvature)


# memory_budget=None: this share of the device's memory (a GPU's total memory; the host's physical memory on CPU).
_AUTO_BUDGET_FRACTION = 0.25


def _device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: a CUDA device's, otherwise the host's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class _MemoryPlan:
    """A memory budget in parameter-sized vectors of the working dtype (float32, or float64 for float64 models)."""

    budget: int
    vector_bytes: int
    numel: int
    auto: bool

    @property
    def vectors(self) -> int:
        """Whole parameter-sized vectors the budget holds."""
        return self.budget // self.vector_bytes

    def too_small(self, owner: str, needed: int, what: str) -> MisconfigurationException:
        """The error for a budget below ``needed`` vectors, with every number in it."""
        source = f"the default: {_AUTO_BUDGET_FRACTION:.0%} of the device's memory" if self.auto else "given"
        return MisconfigurationException(
            f"{owner}: memory_budget={self.budget:,} bytes ({source}) holds {self.vectors} parameter-sized vectors of"
            f" {self.numel:,} entries x {self.vector_bytes // self.numel} bytes = {self.vector_bytes:,} bytes, but"
            f" {what} needs at least {needed} ({needed * self.vector_bytes:,} bytes) beyond autograd's own"
            " Hessian-vector-product memory. Pass a larger `memory_budget`."
        )


def _memory_plan(trainer: Trainer, pl_module: LightningModule, memory_budget: int | None) -> _MemoryPlan | None:
    """The budget of a check in parameter-sized vectors (``None``: 25% of the device's memory, the smallest over
    ranks); ``None`` for a module without trainable parameters. Call on every rank (a collective under DDP)."""
    params = [p for p in pl_module.parameters() if p.requires_grad]
    if not params:
        return None
    numel = sum(local_numel(p) for p in params)  # sharded strategies: each rank's vectors are its shards
    vector = numel * _work_dtype(params[0].dtype).itemsize
    device = params[0].device
    budget = memory_budget
    if budget is None:
        budget = int(_AUTO_BUDGET_FRACTION * _device_memory_bytes(device))
        if trainer.world_size > 1:  # every rank must plan the same products (Lanczos restarts, chunks)
            smallest = trainer.strategy.reduce(torch.tensor(float(budget), device=device), reduce_op="min")
            budget = int(smallest.item())
    return _MemoryPlan(budget=budget, vector_bytes=vector, numel=numel, auto=memory_budget is None)


def _reduce_fn(trainer: Trainer) -> Callable[[Tensor], Tensor]:
    """The mean over the trainer's data-parallel ranks (the identity on one process)."""
    if trainer.world_size == 1:
        return lambda t: t
    return lambda t: trainer.strategy.reduce(t, reduce_op="mean")


def _reduced_operator(
    trainer: Trainer,
    pl_module: LightningModule,
    batches: list[Any],
    loss_fn: LossFn | None,
    hvp: HvpMethod,
    mode: OperatorMode,
    params: list[Tensor] | None = None,
    curvature: Curvature = "hessian",
    output_fn: OutputFn | None = None,
    spec: LossSpec | None = None,
) -> ReducedOperator:
    """The curvature of the mean loss over ``batches`` with respect to ``params`` (default: every trainable
    parameter), averaged over the data-parallel ranks: the operator of the curvature callbacks and of ``lightning-gd
    analyze``. The Hessian of ``loss_fn`` (default: the module's ``training_step``, logging silenced), or the GGN /
    empirical Fisher of ``output_fn``'s outputs (default: the module's ``curvature_outputs``) under ``spec``."""
    op: CurvatureOperator
    if curvature == "hessian" and sharding(trainer.strategy) is not None:
        # Sharded parameters: central differences of the strategy's own gradients, which its backward already
        # averages over the data-parallel ranks (no further mean), on vectors that are each rank's shards.
        loss = _mean_loss(loss_fn or _training_step_loss)
        return ReducedOperator(sharded_operator(trainer, pl_module, loss, batches, params, mode), lambda t: t)
    if curvature == "hessian":
        loss = _mean_loss(loss_fn or _training_step_loss)
        # Under DDP the products never go through the DDP wrapper (and its comm hook, e.g. a compression hook
        # whose error-feedback memory they would corrupt): the local module's gradients, averaged below.
        op = HessianOperator(pl_module, loss, batches, params=params, hvp=hvp, mode=mode)
    else:
        cls = GGNOperator if curvature == "ggn" else EmpiricalFisherOperator
        outputs = _concatenated(output_fn or _module_outputs)
        op = cls(pl_module, outputs, spec, batches, params=params, hvp=hvp, mode=mode)
    return ReducedOperator(op, _reduce_fn(trainer))


class _CurvatureCallback(Callback):
    """Base of :class:`HessianTraceMonitor` and :class:`SharpnessTracker` (see their docs for arguments)."""

    _name = "curvature"
    _prefixes: tuple[str, str, str] = ("curvature", "curvature_ggn", "curvature_fisher")  # metric prefix per curvature

    def __init__(
        self,
        every_n_steps: int,
        batch: BatchMode,
        num_batches: int,
        loss_fn: LossFn | None,
        mode: OperatorMode,
        hvp: HvpMethod,
        seed: int,
        max_overhead: float | None,
        memory_budget: int | None = None,
        groups: Mapping[str, str | Sequence[str]] | None = None,
        curvature: Curvature = "hessian",
        output_fn: OutputFn | None = None,
        loss: OutputLoss | LossSpec | torch.nn.Module | None = None,
        fd_tolerance: float | None = DEFAULT_STEP_TOLERANCE,
    ) -> None:
        _check_positive("every_n_steps", every_n_steps)
        if fd_tolerance is not None:
            check_number("fd_tolerance", fd_tolerance, 0, low_open=True, error=MisconfigurationException)
        self.fd_tolerance = fd_tolerance
        self.groups = _check_groups(groups)
        self._spec = _check_curvature(curvature, output_fn, loss, loss_fn)
        self.curvature = curvature
        self.output_fn = output_fn
        self.loss = loss
        self._name = self._prefixes[_CURVATURES.index(curvature)]
        if memory_budget is not None:
            _check_positive("memory_budget", memory_budget)
        # Time spent measuring against max_overhead of the training time: due checks are skipped while over it.
        self._budget = OverheadBudget(max_overhead, type(self).__name__, f"{self._name}/skipped_checks", every_n_steps)
        _check_positive("num_batches", num_batches)
        _check_choice("batch", batch, _BATCH_MODES)
        _check_choice("mode", mode, _MODES)
        _check_choice("hvp", hvp, _HVPS)
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(f"`loss_fn` must be callable, got {loss_fn!r}")
        self.every_n_steps = every_n_steps
        self.batch = batch
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.mode = mode
        self.hvp = hvp
        self.seed = seed
        self.max_overhead = max_overhead
        self.memory_budget = memory_budget
        self.history: History = {}
        self.last_metrics: dict[str, float] = {}
        self._fixed: list[Any] = []
        self._nonfinite = NonFiniteGuard(
            type(self).__name__, "loss or curvature", "this measurement is skipped (training is not affected)"
        )
        self._hvp_in_use: str | None = None  # remembered "auto" choice: probe it once, not every check
        self._last_seen = -1  # last optimizer step handled (accumulation: several batches per step)
        self._group_names: dict[str, tuple[str, ...]] = {}  # group -> names of its parameters (resolved in setup)
        self._sharding: Sharding | None = None  # how the strategy shards the parameters (set in setup)
        self._said_hvp = False
        self._said_step = False
        self._strategy_name = ""

    @property
    def skipped_checks(self) -> int:
        """Due checks skipped by the ``max_overhead`` budget (logged as ``<name>/skipped_checks``)."""
        return self._budget.skipped

    @skipped_checks.setter
    def skipped_checks(self, value: int) -> None:
        self._budget.skipped = value

    @property
    @override
    def state_key(self) -> str:
        # Several instances (different schedules or settings) may share a Trainer and a checkpoint.
        return self._generate_state_key(**self._key_args())

    def _key_args(self) -> dict[str, Any]:
        args = {"every_n_steps": self.every_n_steps, "batch": self.batch, "num_batches": self.num_batches,
                "mode": self.mode}  # fmt: skip
        if self.curvature != "hessian":  # only when set: checkpoints written before keep their key
            args["curvature"] = self.curvature
        if self.groups:
            args["groups"] = tuple(self.groups)
        return args

    # ---------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sharding = _check_strategy(trainer.strategy, type(self).__name__, self.hvp, self.curvature)
        self._strategy_name = type(trainer.strategy).__name__
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise MisconfigurationException(f"{type(self).__name__}: the model has no trainable parameters")
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(self).__name__}: with manual optimization the module's training_step is no loss;"
                " pass `loss_fn(module, batch) -> Tensor`"
            )
        self._group_names = _resolve_groups(pl_module, self.groups, type(self).__name__)
        if (
            self.curvature != "hessian"
            and self.output_fn is None
            and not callable(getattr(pl_module, "curvature_outputs", None))
        ):
            raise MisconfigurationException(
                f"{type(self).__name__}(curvature={self.curvature!r}) needs the model's outputs and targets: pass"
                " `output_fn(module, batch) -> (outputs, targets)`, or define"
                f" `{type(pl_module).__name__}.curvature_outputs(batch) -> (outputs, targets)`"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the strategy's setup: the model is on its device, in its precision, the optimizers exist.
        self._plan_memory(trainer, pl_module)
        self._warn_half_precision(pl_module)

    def _warn_half_precision(self, pl_module: LightningModule) -> None:
        """Central differences on parameters held in half precision (no float32 master weights) are coarse: say how
        coarse, once."""
        if self.hvp != "finite_difference" and self._sharding is None:
            return
        dtype = next((p.dtype for p in pl_module.parameters() if p.requires_grad), torch.float32)
        if dtype in (torch.float16, torch.bfloat16):
            rank_zero_warn(
                f"{type(self).__name__}: Hessian-vector products by finite differences on parameters held in {dtype}"
                f" (no float32 master weights): expect a relative error of about {finite_difference_error(dtype):.1%}"
                " per product (finfo(dtype).eps ** (2/3); 2.4e-05 in float32). Keep float32 weights (e.g."
                " precision='bf16-mixed') for accurate curvature. Warning once."
            )

    def _plan_memory(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Turn ``memory_budget`` into vector counts (``_fit_budget``); raise if it cannot hold one product's."""
        plan = _memory_plan(trainer, pl_module, self.memory_budget)
        if plan is not None:  # None: no trainable parameter, refused in setup
            self._fit_budget(plan, trainer)

    def _fit_budget(self, plan: _MemoryPlan, trainer: Trainer) -> None:
        """Set the vector counts of a check from ``plan``; raise ``plan.too_small(...)`` when it cannot fit."""
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._budget.start()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.batch == "fixed" and len(self._fixed) < self.num_batches:
            self._fixed.append(apply_to_collection(batch, Tensor, lambda t: t.detach().cpu().clone()))
        step = trainer.global_step
        # After an optimizer step only (global_step just changed), so accumulation windows measure once.
        if step == 0 or step == self._last_seen:
            return
        self._last_seen = step
        if step % self.every_n_steps:
            return
        # Over budget: skip this due step (decided at due steps only, so one collective per every_n_steps).
        if self._budget.over(trainer):
            self._budget.skip(trainer, step)
            return
        batches = self._batches(batch, pl_module)
        if batches is None:
            return
        with self._budget.timed():
            self._measure_and_log(trainer, pl_module, batches)

    def _measure_and_log(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> None:
        op = self._operator(trainer, pl_module, batches)
        if not self._nonfinite.finite_everywhere(trainer, op.base.loss()):
            return
        metrics = self._measure(trainer, pl_module, op, batches)
        if metrics is None:
            return
        if not self._nonfinite.finite_everywhere(trainer, torch.tensor(list(metrics.values()), dtype=torch.float64)):
            return
        metrics[f"{self._name}/skipped_checks"] = float(self.skipped_checks)
        self._log(trainer, metrics)

    # ---------------------------------------------------------------- to implement
    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, op: ReducedOperator, batches: list[Any]
    ) -> dict[str, float] | None:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    def _batches(self, batch: Any, pl_module: LightningModule) -> list[Any] | None:
        if self.batch == "current":
            return [batch]
        if len(self._fixed) < self.num_batches:
            return None
        return [move_data_to_device(b, pl_module.device) for b in self._fixed]

    def _operator(
        self, trainer: Trainer, pl_module: LightningModule, batches: list[Any], group: str | None = None
    ) -> ReducedOperator:
        """The rank-averaged curvature operator on ``batches``, over every trainable parameter or one group's."""
        params = None if group is None else self._group_params(pl_module, group)
        hvp = self.hvp if self._sharding is not None else self._hvp_in_use or self.hvp
        return _reduced_operator(
            trainer, pl_module, batches, self.loss_fn, hvp, self.mode, params=params, curvature=self.curvature,
            output_fn=self.output_fn, spec=self._spec,
        )  # fmt: skip

    def _group_params(self, pl_module: LightningModule, group: str) -> list[Tensor]:
        named = dict(pl_module.named_parameters())
        return [named[name] for name in self._group_names[group]]

    @staticmethod
    def _reduce_fn(trainer: Trainer) -> Callable[[Tensor], Tensor]:
        return _reduce_fn(trainer)

    def _remember_hvp(self, op: CurvatureOperator) -> None:
        base = op.base if isinstance(op, ReducedOperator) else op
        self._hvp_in_use = getattr(base, "hvp_method", None) or self._hvp_in_use
        if self.hvp == "auto" and self._hvp_in_use and not self._said_hvp:
            self._said_hvp = True
            why = {
                "finite_difference": "central differences of gradients, as no exact product runs here"
                + (f" ({sharding_name(self._sharding)} shards the parameters)" if self._sharding else ""),
            }.get(self._hvp_in_use, "exact products")
            rank_zero_info(f"{type(self).__name__}(hvp='auto'): using {self._hvp_in_use!r}: {why}.")

    def _step_check(
        self, trainer: Trainer, op: CurvatureOperator, v: Tensor | None, what: str
    ) -> tuple[dict[str, float], bool]:
        """Central-difference products only: whether they are step-independent along ``v`` (``None``: a probe),
        and ``<name>/fd_step_change`` to log. The change comes from rank-averaged or all-reduced products, so every
        rank decides the same; a failed check warns once (:mod:`lightning_gd.curvature.step_check`)."""
        if self.fd_tolerance is None or not uses_central_differences(op):
            return {}, True
        check = finite_difference_check(op, v, tolerance=self.fd_tolerance, generator=self._generator(trainer))
        if not check.passed and not self._said_step:
            self._said_step = True
            rank_zero_warn(
                f"{type(self).__name__}: the central-difference Hessian-vector products depend on their step here:"
                f" doubling it changed the product along {what} by {check.change:.1%} (fd_tolerance"
                f" {self.fd_tolerance:g}), so the figures would be wrong and checks like this one are skipped"
                f" (`{self._name}/fd_step_change` logs the change at every check). Likely causes: kinks of the loss"
                " (ReLU, max-pooling: a product straddles the units near zero, in float64 as in float32) or"
                " gradients computed in half precision. Measure this model with exact products (an unsharded"
                " strategy such as DDP, hvp='auto'), or with smooth activations (GELU, SiLU); fd_tolerance=None"
                " reports the figures anyway. Warning once."
            )
        return {f"{self._name}/fd_step_change": check.change}, check.passed

    @property
    def _sharded(self) -> bool:
        """Whether vectors are each rank's shards (every rank takes part in every product)."""
        return self._sharding is not None

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        self.last_metrics = metrics
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((step, value))
        log_to_loggers(trainer, metrics, step=step)

    @staticmethod
    def _lr(trainer: Trainer) -> float:
        return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan

    def _generator(self, trainer: Trainer, rank: int = 0) -> torch.Generator:
        # Seeded by (seed, step, rank): reproducible, and independent of the global RNG.
        return torch.Generator().manual_seed(hash((self.seed, trainer.global_step, rank)) & 0x7FFF_FFFF)

    # ---------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": history_to_state(self.history),
            "fixed_batches": self._fixed,
            "hvp_in_use": self._hvp_in_use,
            "last_seen": self._last_seen,
            **self._budget.state_dict(),  # spent_s, last_cost_s, elapsed_s, skipped_checks
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = history_from_state(state_dict.get("history", {}))
        self._fixed = list(state_dict.get("fixed_batches", []))
        self._hvp_in_use = state_dict.get("hvp_in_use")
        self._last_seen = int(state_dict.get("last_seen", state_dict.get("last_step", -1)))  # older checkpoints
        self._budget.load_state_dict(state_dict)
