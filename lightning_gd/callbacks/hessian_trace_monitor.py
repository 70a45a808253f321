"""Log the Hessian trace of the training loss, with a standard error, and the SGD linear-stability ratio.

Hutchinson 1989, Meyer et al. 2021 (Hutch++) and Epperly, Tropp & Webber 2024 (XTrace) for the estimators; Wu &
Su 2023, "The Implicit
Regularization of Dynamical Stability in Stochastic Gradient Descent": at a linearly stable minimum of
SGD, tr(H) <= 2 / lr (GD only constrains lambda_max).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks._curvature import (
    BatchMode,
    Curvature,
    LossFn,
    OutputFn,
    _check_choice,
    _check_positive,
    _CurvatureCallback,
    _MemoryPlan,
)
from lightning_gd.curvature import HvpMethod, LossSpec, OperatorMode, OutputLoss, ReducedOperator, hutchinson_trace
from lightning_gd.curvature.step_check import DEFAULT_STEP_TOLERANCE
from lightning_gd.curvature.trace import MIN_PROBES, TraceMethod

__all__ = ["HessianTraceMonitor"]

TraceChoice = Literal["auto", TraceMethod]  # the estimators of curvature.trace, or "auto" (chosen at fit start)
_METHODS: tuple[str, ...] = get_args(TraceChoice)
_PROBES_PER_MATMAT = 10  # probes per product call when the memory budget allows (hutchinson_trace's default)


class HessianTraceMonitor(_CurvatureCallback):
    """Estimate tr(H) of the training loss every ``every_n_steps`` optimizer steps and log it.

    By default a due check is skipped while measuring would take more than ``max_overhead`` (2.5%) of the
    training time: the first skip warns once, naming the cost of a check, and ``hessian/skipped_checks``
    counts them. Pass ``max_overhead=None`` to measure at every due step, or use a larger ``every_n_steps``.

    Logged (every rank computes the same numbers; rank zero writes them to every logger at the global step):

    * ``hessian/trace`` and ``hessian/trace_stderr``: the estimate and its standard error;
    * ``hessian/sgd_stability`` = lr * tr(H) / 2 with the first param group's lr: at or above 1, SGD is past
      its linear-stability bound tr(H) <= 2/lr;
    * ``hessian/num_hvps``: Hessian-vector products spent (per rank);
    * ``hessian/skipped_checks``: due checks skipped so far by the ``max_overhead`` budget;
    * with central-difference products (sharded strategies, ``hvp="finite_difference"``),
      ``hessian/fd_step_change``: how much a product along a probe changes when the step doubles; above
      ``fd_tolerance`` it is all that check logs (see ``fd_tolerance``);
    * with ``per_layer=True``, ``hessian/trace/<parameter name>`` from the same probes (they sum to the total);
    * with ``groups``, ``hessian/<group>/trace``: the trace of the group's diagonal block, from the same probes;
    * with ``curvature="ggn"`` or ``"fisher"``, the same under ``ggn/...`` or ``fisher/...``: the trace of the
      generalised Gauss-Newton or empirical Fisher matrix (see :class:`~lightning_gd.curvature.GGNOperator`).

    Measuring never perturbs training: weights, gradients, buffers (BatchNorm statistics), RNG states and
    train/eval modes are left exactly as they were (see :class:`~lightning_gd.curvature.HessianOperator`).
    Under DDP every rank joins and the products are split across ranks: each rank estimates the trace of its own
    batch's Hessian (whose mean over ranks is the global batch's) with ``num_probes / world_size`` products
    (Hutchinson's probes, or Hutch++'s and XTrace's sketch and residual probes, at least 1, 3 and 4), and the
    unbiased estimates are averaged, their variances added. Under sharded strategies (FSDP2 through
    ``ModelParallelStrategy``, ``FSDPStrategy``, DeepSpeed ZeRO-3) the products are central differences of the
    strategy's own gradients on each rank's shards (``hvp="auto"`` picks them there), every rank takes part in every
    product, and the probes are the global vectors an unsharded run of the same seed draws.

    Args:
        every_n_steps: Measure after every this many optimizer steps (see ``max_overhead``).
        num_probes: Rademacher probes per estimate (in total, over all ranks).
        method: ``"auto"`` (default), ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``. Hutch++ and XTrace take the
            top of the spectrum exactly from a sketch and need far fewer products to a given accuracy on Hessians,
            whose few outlier eigenvalues carry much of the trace; XTrace the fewest (``benchmarks/RESULTS.md``,
            "time to 1%"). But a sketch costs memory: 2 parameter-sized vectors per product. ``"auto"`` picks
            XTrace when its sketch fits ``memory_budget`` (and ``num_probes >= 4``), Hutchinson (2 vectors per
            probe in one call, whatever ``num_probes``) otherwise, and says so.
        batch: ``"current"`` measures on the batch just trained on; ``"fixed"`` on the first ``num_batches``
            training batches, kept (and checkpointed) for the whole run so that values are comparable.
        num_batches: Batches averaged in ``"fixed"`` mode.
        per_layer: Also log per-parameter traces.
        loss_fn: ``loss_fn(module, batch) -> Tensor``; default: the module's own ``training_step`` with its
            logging silenced (pass one if ``training_step`` has other side effects, e.g. metric updates).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"`` (BatchNorm batch statistics
            without updating them, one fixed dropout mask).
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"`` or ``"finite_difference"`` (central
            differences of two ordinary gradients: no second-order graph, about 2.4e-5 relative error in float32).
            ``"auto"`` uses an exact method where one runs, finite differences where none does (sharded parameters,
            a compiled module, a kernel without double backward), and says once which.
        seed: Seed of the probes (combined with the step and rank).
        max_overhead: Largest fraction of the training wall time this callback may spend measuring (default
            2.5%, so that both curvature callbacks together stay within 5%). A due check is skipped when one more
            check (timed like the last one) would exceed it, so with expensive products checks land on fewer
            multiples of ``every_n_steps``. The first check always runs. ``None`` measures at every multiple.
            Rank zero's clock decides for all ranks.
        groups: ``{name: pattern or [patterns]}`` (fnmatch on ``named_parameters()`` names, e.g. ``{"attn":
            "*.attn.*"}``): also log each group's trace. A pattern matching no trainable parameter is refused at
            setup, naming it and a few parameter names.
        curvature: ``"hessian"`` (default), ``"ggn"`` (generalised Gauss-Newton ``J^T H_L J``: PSD, the Hessian's
            outlier part on classification losses) or ``"fisher"`` (empirical Fisher ``G^T G / n``). The last two
            need ``loss`` and the model's outputs.
        output_fn: ``output_fn(module, batch) -> (outputs, targets)`` for ``"ggn"``/``"fisher"``; default: the
            module's ``curvature_outputs(batch)`` method.
        loss: The loss of the outputs for ``"ggn"``/``"fisher"``: ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"`` or the matching ``torch.nn`` module; any other is refused, naming the supported ones.
        fd_tolerance: With central-difference products (sharded strategies, ``hvp="finite_difference"``, or
            ``"auto"`` where no exact product runs): the largest relative change of a product along a Rademacher
            probe when the step doubles (two more products per check, logged as ``hessian/fd_step_change``). Above
            it the products depend on their step, as on networks with many ReLU or max-pooling kinks (a product
            straddles the units near zero: torchvision's ResNet-18 gives lambda_max 2.8x too large) or with
            half-precision gradients, so the check's figures are skipped, with one warning naming the change.
            Default 1e-2 (smooth float32 models change by 6e-4 at most, kinked ones by 0.67: benchmarks/RESULTS.md,
            "The step check"). ``None``: no such check.
        memory_budget: Bytes of extra device memory a check may use beyond autograd's own Hessian-vector-product
            memory, for its parameter-sized vectors (in the working dtype: float32, float64 for float64 models).
            ``"hutchinson"`` needs 2 per probe pushed through one product call (probe and product; + 2 with
            ``per_layer``), so the probes per call are ``min(10, budget // 2)``: memory does not grow with
            ``num_probes``. ``"hutch++"`` also holds its sketch: ``3 (num_probes // 3) + 4 p + 2`` vectors for ``p``
            probes per call; ``"xtrace"`` ``4 (num_probes // 2) + 2 + p`` (+ 4 with per-parameter traces), with
            ``num_probes`` per rank under DDP. ``None``: 25% of the device's memory (a GPU's total memory; the host's
            physical memory on CPU), the smallest over ranks. A budget that cannot hold one product's vectors raises
            at the start of fitting, stating the numbers.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HessianTraceMonitor(every_n_steps=50, num_probes=30)])

    Raises:
        MisconfigurationException: for a bad argument (naming it and its value), a model without trainable
            parameters, or a strategy whose gradients cannot be obtained (naming it; an exact ``hvp`` or a GGN/Fisher
            curvature on sharded parameters).
    """

    _name = "hessian"
    _prefixes = ("hessian", "ggn", "fisher")

    def __init__(
        self,
        every_n_steps: int = 100,
        num_probes: int = 30,
        method: TraceChoice = "auto",
        batch: BatchMode = "current",
        num_batches: int = 1,
        per_layer: bool = False,
        loss_fn: LossFn | None = None,
        mode: OperatorMode = "eval",
        hvp: HvpMethod = "auto",
        seed: int = 0,
        max_overhead: float | None = 0.025,
        memory_budget: int | None = None,
        groups: Mapping[str, str | Sequence[str]] | None = None,
        curvature: Curvature = "hessian",
        output_fn: OutputFn | None = None,
        loss: OutputLoss | LossSpec | torch.nn.Module | None = None,
        fd_tolerance: float | None = DEFAULT_STEP_TOLERANCE,
    ) -> None:
        super().__init__(
            every_n_steps, batch, num_batches, loss_fn, mode, hvp, seed, max_overhead, memory_budget, groups=groups,
            curvature=curvature, output_fn=output_fn, loss=loss, fd_tolerance=fd_tolerance,
        )  # fmt: skip
        _check_positive("num_probes", num_probes)
        _check_choice("method", method, _METHODS)
        if num_probes < MIN_PROBES.get(method, 1):
            raise MisconfigurationException(
                f"`num_probes` must be >= {MIN_PROBES[method]} for method={method!r}, got {num_probes}"
            )
        self.num_probes = num_probes
        self.method = method
        self._method: TraceMethod = "hutchinson" if method == "auto" else method  # resolved at the start of fitting
        self.per_layer = per_layer
        self._probes_per_matmat = _PROBES_PER_MATMAT  # sized from memory_budget at the start of fitting

    def _key_args(self) -> dict[str, Any]:
        return {**super()._key_args(), "method": self.method, "num_probes": self.num_probes}

    def _fit_budget(self, plan: _MemoryPlan, trainer: Trainer) -> None:
        # Sharded vectors: every rank runs every probe (on its shards), so the estimate is not split over ranks.
        world = 1 if self._sharded else trainer.world_size
        if self.method == "auto":
            # XTrace reaches a given accuracy with the fewest products (benchmarks/RESULTS.md, "time to 1%"), but
            # holds its sketch: 2 vectors per product. Hutchinson holds 2 per probe in one call, whatever num_probes.
            need = self._vectors("xtrace", world, _PROBES_PER_MATMAT)
            self._method = "xtrace" if self.num_probes >= 4 and plan.vectors >= need else "hutchinson"
            if self._method == "hutchinson":
                rank_zero_info(
                    f"HessianTraceMonitor(method='auto'): Hutchinson, not XTrace: XTrace's sketch of"
                    f" {self._local_probes(world)} products needs {need} parameter-sized vectors, the"
                    f" memory budget holds {plan.vectors}."
                )
        owner = f"HessianTraceMonitor(method={self._method!r}, num_probes={self.num_probes})"
        fixed = self._vectors(self._method, world, 0)
        per_call = 2 if self._method == "hutchinson" else (4 if self._method == "hutch++" else 1)
        probes = min(_PROBES_PER_MATMAT, self._local_probes(world), (plan.vectors - fixed) // per_call)
        if probes < 1:
            what = {"hutchinson": "one Hessian-vector product (a probe and its product)",
                    "hutch++": "Hutch++ (its sketch and one probe)",
                    "xtrace": "XTrace (its probes, products, Q and A Q)"}[self._method]  # fmt: skip
            raise plan.too_small(owner, fixed + per_call, what)
        self._probes_per_matmat = probes

    def _vectors(self, method: str, world_size: int, probes_per_call: int) -> int:
        """Parameter-sized vectors an estimate holds, beyond autograd's product memory."""
        m = max(math.ceil(self.num_probes / world_size), MIN_PROBES[method])
        if method == "hutchinson":
            return (2 if self._per_param else 0) + 2 * probes_per_call  # the per-parameter sums; probe and product
        if method == "hutch++":
            return 3 * (m // 3) + 2 + 4 * probes_per_call  # Q, A Q, the QR's copy, the sketch product's chunk
        return 4 * (m // 2) + 2 + (4 if self._per_param else 0) + probes_per_call  # probes, products, Q, A Q

    def _local_probes(self, world_size: int) -> int:
        """Products each rank spends: the total split over ranks, at least what one estimate needs."""
        return max(math.ceil(self.num_probes / world_size), MIN_PROBES[self._method])

    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, op: ReducedOperator, batches: list[Any]
    ) -> dict[str, float]:
        P, rank = trainer.world_size, trainer.global_rank
        # Central differences: is a product along a probe step-independent (the same probe on every rank, through
        # the rank-averaged operator)? If not, the estimate would be wrong: skipped, the change logged, said once.
        step_metrics, trusted = self._step_check(trainer, op, None, "a Rademacher probe")
        if not trusted:
            self._remember_hvp(op)
            return {**step_metrics, f"{self._name}/num_hvps": 2.0}
        if P > 1 and not self._sharded:
            # Split the products: rank r estimates tr(H_r) of its own batch with its own probes (Hutchinson's, or
            # Hutch++'s / XTrace's sketch and residual probes); tr(mean H_r) is the mean of the unbiased estimates.
            local = hutchinson_trace(
                op.base, self._local_probes(P), method=self._method, generator=self._generator(trainer, rank),
                per_param=self._per_param, probes_per_matmat=self._probes_per_matmat,
            )  # fmt: skip
            stats = torch.tensor([local.value, local.stderr**2], dtype=torch.float64, device=pl_module.device)
            gathered = trainer.strategy.all_gather(stats).reshape(P, 2)
            value = float(gathered[:, 0].mean())
            stderr = float(gathered[:, 1].sum().sqrt()) / P  # independent ranks: variances add
            per_param = local.per_param
            if per_param is not None:
                layer = torch.tensor(list(per_param.values()), dtype=torch.float64, device=pl_module.device)
                per_param = dict(zip(per_param, self._reduce_fn(trainer)(layer).tolist(), strict=True))
            num_hvps = local.num_matvecs
        else:
            est = hutchinson_trace(
                op, self.num_probes, method=self._method, generator=self._generator(trainer),
                per_param=self._per_param, probes_per_matmat=self._probes_per_matmat,
            )  # fmt: skip
            value, stderr, per_param, num_hvps = est.value, est.stderr, est.per_param, est.num_matvecs
        self._remember_hvp(op)
        metrics = {
            f"{self._name}/trace": value,
            f"{self._name}/trace_stderr": stderr,
            f"{self._name}/sgd_stability": self._lr(trainer) * value / 2.0,
            f"{self._name}/num_hvps": float(num_hvps + (2 if step_metrics else 0)),
            **step_metrics,
        }
        if per_param and self.per_layer:
            metrics.update({f"{self._name}/trace/{name}": v for name, v in per_param.items()})
        for group, names in self._group_names.items():  # the same probes: group traces sum per-parameter ones
            metrics[f"{self._name}/{group}/trace"] = sum(per_param[n] for n in names)
        return metrics

    @property
    def _per_param(self) -> bool:
        return self.per_layer or bool(self.groups)
