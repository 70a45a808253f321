"""Track sharpness (top and bottom Hessian eigenvalues) against the edge of stability, with spectra plots.

Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability":
under full-batch GD, lambda_max rises to about 2/lr and hovers there. Cohen et al. 2022, "Adaptive
Gradient Methods at the Edge of Stability": for Adam the preconditioned sharpness lambda_max(P^-1 H),
P_t = (1 - beta1^t) diag(sqrt(v_hat_t) + eps), hovers at (2 + 2 beta1) / ((1 - beta1) lr), 38/lr for
beta1 = 0.9 (the math: :mod:`lightning_gd.curvature.preconditioned`; the optimizer state:
:mod:`lightning_gd.utils.optim_state`). Ghorbani et al. 2019 and Sagun et al. 2017 ("Empirical Analysis of
the Hessian") for the density.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd.callbacks._curvature import (
    BatchMode,
    Curvature,
    LossFn,
    OutputFn,
    _check_positive,
    _CurvatureCallback,
    _MemoryPlan,
)
from lightning_gd.curvature import (
    HvpMethod,
    LossSpec,
    OperatorMode,
    OutputLoss,
    PreconditionedOperator,
    ReducedOperator,
    lanczos,
    spectral_density,
)
from lightning_gd.curvature.lanczos import Which
from lightning_gd.curvature.preconditioned import (
    adam_preconditioner,
    adam_threshold,
    adam_unmoved,
    combine_preconditioners,
    gd_threshold,
)
from lightning_gd.curvature.step_check import DEFAULT_STEP_TOLERANCE
from lightning_gd.utils.checks import check_number
from lightning_gd.utils.deepspeed_state import deepspeed_stage
from lightning_gd.utils.optim_state import adam_moments, is_adam_family, owner_of
from lightning_gd.utils.plotting import new_figure, run_dir, save_figure
from lightning_gd.utils.ranks import gather_from_ranks

__all__ = ["SharpnessTracker"]

_ALL = ""  # the target of every trainable parameter (groups have their own names)


def _wide_range_scale(ax: Any, values: list[float]) -> None:
    """Log (or, with negative values, symlog) y axis when the values span more than 20x: e.g. lambda_max far
    below 2/lr under a decaying learning rate, which a linear axis flattens to a line at zero."""
    magnitudes = [abs(v) for v in values if v != 0 and math.isfinite(v)]
    if not magnitudes or max(magnitudes) <= 20 * min(magnitudes):
        return
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=min(magnitudes))


class _ClipFactors:
    """The factor gradient clipping multiplied each optimizer's latest gradient by, measured, not assumed.

    Each parameter's gradient norm is recorded after every backward (``on_after_backward``: after DDP's averaging,
    and divided by the ``GradScaler``'s scale under ``16-mixed``) and again when the optimizer has stepped (a step
    post-hook: the gradient it consumed, after every clipping, Lightning's ``gradient_clip_val``, a
    ``configure_gradient_clipping`` override or the user's own ``clip_grad_norm_`` in a manual-optimization
    ``training_step``; a pre-hook would not do: in automatic optimization the backward runs inside
    ``optimizer.step(closure)``, after it). Norm clipping multiplies every parameter's gradient by the same ``c``;
    ``c`` is the median of the per-parameter ratios, so that zeroing some gradients (a mask) is not read as
    clipping, and value clipping gets its typical factor. A ratio above 1 (gradient noise) counts as 1. Only
    reads gradients; recorded only over the optimizer steps just before a due check.
    """

    def __init__(self) -> None:
        self.factors: dict[int, float] = {}  # optimizer index -> c of its latest recorded step
        self._raw: dict[int, Tensor] = {}  # optimizer index -> per-parameter gradient norms after backward
        self._handles: list[Any] = []
        self._optimizers: list[Any] = []
        self.active = False

    def attach(self, optimizers: Sequence[Any]) -> None:
        self.detach()
        self._optimizers = list(optimizers)
        for index, optimizer in enumerate(self._optimizers):
            register = getattr(optimizer, "register_step_post_hook", None)
            if callable(register):  # torch.optim contract (DeepSpeed's have none: see on_train_batch_end)
                self._handles.append(register(lambda opt, args, kwargs, i=index: self._used(i, opt)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _norms(optimizer: Any) -> Tensor:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        live = [g for g in grads if g is not None]
        if not live:
            return torch.zeros(len(grads), dtype=torch.float64)
        device = live[0].device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        norms = [
            zero if g is None else torch.linalg.vector_norm(g.detach(), dtype=torch.float64).to(device) for g in grads
        ]
        return torch.stack(norms).cpu()  # one transfer for all parameters

    def after_backward(self, scale: float) -> None:
        if self.active:
            for index, optimizer in enumerate(self._optimizers):
                self._raw[index] = self._norms(optimizer) / scale

    def _used(self, index: int, optimizer: Any) -> None:
        raw = self._raw.pop(index, None)
        if not self.active or raw is None:
            return
        used = self._norms(optimizer)
        live = raw > 0
        if used.shape != raw.shape or not bool(live.any()):
            return
        ratio = float((used[live] / raw[live]).median())
        self.factors[index] = ratio if 0 < ratio < 1 else 1.0


class SharpnessTracker(_CurvatureCallback):
    """Track lambda_max (and optionally lambda_min) of the training-loss Hessian with warm-started Lanczos.

    The threshold compares like with like: with plain (momentum) SGD, lambda_max of H against 2/lr; with Adam-family
    optimizers (``preconditioned="auto"``, the default, decides at the first check), the preconditioned lambda_max
    of the update Adam actually applies against 38/lr. By default a due check is skipped while measuring would take
    more than ``max_overhead`` (2.5%) of the training time: the first skip warns once, naming the cost of a check,
    and ``sharpness/skipped_checks`` counts them. Pass ``max_overhead=None`` to measure at every due step, or use a
    larger ``every_n_steps``.

    The preconditioned sharpness (:mod:`lightning_gd.curvature.preconditioned` derives each step):

    * **any number of optimizers**: each parameter's ``P_t`` comes from whichever optimizer owns it (a GAN's two
      Adams, several parameter groups); blocks with a different ``lr`` or ``beta1`` are scaled so that the logged
      ratio is that of the whole update, against the threshold of the first measured parameter's group;
    * **gradient clipping**: Adam's moments are built from the clipped gradient ``c g``, so ``P_c = c P`` and the
      raw ``lambda_max(P_c^-1 H)`` is ``1/c`` too large; the tracker measures ``c`` (the clipped over the unclipped
      gradient norm of each optimizer's latest step: Lightning's ``gradient_clip_val``, a
      ``configure_gradient_clipping`` override or your own ``clip_grad_norm_``; under DeepSpeed, which clips inside
      its own step, from the engine's gradient norm and its ``gradient_clipping``) and reports
      ``lambda_max(c P_c^-1 H)``, logging ``sharpness/clip_factor``;
    * **sparse or compressed gradients** (``ddp_topk``, random-k, parameters the loss does not reach): coordinates
      with ``sqrt(v_hat) < eps`` have had no gradient, Adam does not move them, and their ``P`` would put ``1/eps``
      on the diagonal (9.5e8 instead of 525 on GPT-2 under ``ddp_topk``); they are left out, said once, and
      ``sharpness/unmoved_fraction`` logs their share (chosen by measurement over a floor on ``v`` and the raw
      lambda_max: :mod:`lightning_gd.curvature.preconditioned`);
    * **sharded optimizer state**: DeepSpeed ZeRO-1/2's flat fp32 partitions and ``ZeroRedundancyOptimizer``'s
      per-rank shards are read back per parameter (:mod:`lightning_gd.utils.optim_state`, gathered across ranks):
      the same number as under DDP (tested);
    * **when some measured parameter has no Adam moments** (an SGD-trained part, a parameter no optimizer updates,
      an optimizer keeping no per-parameter second moment), the raw lambda_max(H) is tracked against 2/lr
      instead, and the first check says so, naming the parameters. No check is skipped in silence.

    Logged every ``every_n_steps`` optimizer steps (the same numbers on every rank):

    * ``sharpness/lambda_max`` and ``sharpness/edge_of_stability`` = lr * lambda_max / 2 (1 = the GD stability
      edge 2/lr); with ``k > 1`` also ``sharpness/eig_2`` ... ``sharpness/eig_k`` (block Lanczos: every copy of a
      repeated eigenvalue is returned);
    * with ``smallest=True``, ``sharpness/lambda_min`` (negative: a direction of negative curvature, a saddle);
    * preconditioned: ``sharpness/preconditioned_lambda_max`` and ``sharpness/edge_of_stability`` against
      (2 + 2 beta1) / ((1 - beta1) lr), i.e. 38/lr at beta1 = 0.9, ``sharpness/clip_factor`` and
      ``sharpness/unmoved_fraction`` (coordinates left out: see below);
    * ``sharpness/threshold``, ``sharpness/num_hvps`` (products spent in this check) and
      ``sharpness/skipped_checks`` (due checks skipped so far by the ``max_overhead`` budget);
    * with central-difference products (sharded strategies, ``hvp="finite_difference"``),
      ``sharpness/fd_step_change``: how much the product along the top eigenvector changes when the step doubles;
      above ``fd_tolerance`` it is all that check logs (see ``fd_tolerance``);
    * with ``groups``, per group ``sharpness/<group>/lambda_max`` (or ``.../preconditioned_lambda_max``),
      ``.../edge_of_stability`` and ``.../threshold``: the operator restricted to the group's parameters (its
      diagonal block of H), which answers "which block reaches the edge first?".

    Every ``density_every_n_steps`` steps the spectral density (stochastic Lanczos quadrature) is plotted to
    ``<log_dir>/spectral_density_step<N>.png`` and TensorBoard; at the end of fitting, lambda_max against the
    stability threshold over training goes to ``<log_dir>/sharpness.png``. The warm-start vectors, the fixed
    batch and the history are checkpointed. Measuring never perturbs training; under DDP every product is
    averaged over ranks, so all ranks run the same Lanczos. Under sharded strategies (FSDP2 through
    ``ModelParallelStrategy``, ``FSDPStrategy``, DeepSpeed ZeRO-3) the products are central differences of the
    strategy's own gradients, Lanczos' vectors are each rank's shards (inner products all-reduced), and the raw
    lambda_max(H) is tracked against 2/lr (the Adam-preconditioned sharpness needs whole second moments).

    Args:
        every_n_steps: Measure after every this many optimizer steps (see ``max_overhead``).
        k: Number of top eigenvalues (block Lanczos with a block of ``k``).
        smallest: Also compute lambda_min.
        warm_start: Start Lanczos from the previous check's eigenvectors (few products per check).
        density_every_n_steps: Plot the spectral density this often (``None``: never).
        preconditioned: ``True``: track the Adam-preconditioned sharpness (needs an Adam-family optimizer);
            ``False``: the raw Hessian's against 2/lr, whatever the optimizer; ``"auto"``: preconditioned when every
            measured parameter has Adam moments at the first check, raw otherwise.
        loss_fn: ``loss_fn(module, batch) -> Tensor``; default: the module's own ``training_step`` with its
            logging silenced.
        batch: ``"current"`` or ``"fixed"`` (see :class:`HessianTraceMonitor`).
        num_batches: Batches averaged in ``"fixed"`` mode.
        mode: ``"eval"`` or ``"train"`` (see :class:`~lightning_gd.curvature.HessianOperator`).
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"`` or ``"finite_difference"`` (see
            :class:`HessianTraceMonitor`; ``"auto"`` picks finite differences where no exact method runs).
        tol: Relative residual tolerance of Lanczos. Ritz-value errors scale like ``tol**2``: the default
            1e-2 measured worst 2.7e-4 relative error at at most 10 products per warm-started check
            (benchmarks/RESULTS.md).
        max_iter: Most products per Lanczos run (per eigenvalue side and group).
        density_num_runs: SLQ runs per density.
        density_num_steps: Lanczos steps per SLQ run.
        plot: Write the end-of-fit plot.
        seed: Seed of the cold-start vectors and density probes.
        max_overhead: Largest fraction of the training wall time spent measuring, default 2.5%; due checks are
            skipped while over it (see :class:`HessianTraceMonitor`). ``None``: exactly every ``every_n_steps``.
        memory_budget: Bytes of extra device memory a check may use beyond autograd's own Hessian-vector-product
            memory, for its parameter-sized vectors (in the working dtype: float32, float64 for float64 models). A
            check holds the Lanczos basis (at most ``max_basis`` vectors), the block's ``k`` products (one is the
            residual) and the ``k`` Ritz vectors, plus 4 with the Adam preconditioner (its diagonal, ``P^-1/2`` and
            the two scaled vectors of a product); the warm-start vectors stay in host memory. ``max_basis`` = what
            the budget leaves, at most ``max_iter``; below the iterations a check needs, Lanczos thick-restarts
            (more products, same accuracy) and the density reorthogonalises against the latest ``max_basis`` vectors
            only. ``None``: 25% of the device's memory (a GPU's total memory; the host's physical memory on CPU),
            the smallest over ranks. A budget below ``2k + 1`` basis vectors raises at the start of fitting,
            stating the numbers.
        groups: ``{name: pattern or [patterns]}``: also track each group's sharpness (fnmatch patterns on
            ``named_parameters()`` names, e.g. ``{"attn": "*.attn.*", "mlp": "*.mlp.*"}``). A pattern that matches
            no trainable parameter is refused at setup, naming it and a few parameter names.
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"`` (see :class:`HessianTraceMonitor`): the
            metrics are then ``sharpness_ggn/...`` or ``sharpness_fisher/...`` and the plot ``sharpness_ggn.png``.
            The GGN is PSD, so its ``lambda_min`` is 0 up to rounding, and its density is best read on a log scale.
        output_fn: ``output_fn(module, batch) -> (outputs, targets)`` for ``"ggn"``/``"fisher"``; default: the
            module's ``curvature_outputs(batch)`` method.
        loss: The loss of the outputs for ``"ggn"``/``"fisher"`` (see :class:`HessianTraceMonitor`).
        fd_tolerance: With central-difference products (sharded strategies, ``hvp="finite_difference"``): the
            largest relative change of the product along the top eigenvector when the step doubles (two more
            products per check, logged as ``sharpness/fd_step_change``). Above it the products depend on their
            step (kinks such as ReLU's, half-precision gradients) and the check's figures are skipped, with one
            warning. ``None``: no such check (see :class:`HessianTraceMonitor`).

    Precision: products in the parameters' dtype (float32 under ``bf16-mixed``), basis and Gram-Schmidt in float32
    (float64 for float64 models), Ritz values from a float64 projected matrix.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SharpnessTracker(every_n_steps=20, smallest=True, density_every_n_steps=500)])

    Raises:
        MisconfigurationException: for a bad argument (naming it and its value), a model without trainable
            parameters, a strategy whose gradients cannot be obtained (naming it; an exact ``hvp``, GGN/Fisher or
            ``preconditioned=True`` under a sharded one), ``preconditioned=True`` without an Adam-family optimizer,
            or a group pattern that matches no parameter.
    """

    _name = "sharpness"
    _prefixes = ("sharpness", "sharpness_ggn", "sharpness_fisher")

    def __init__(
        self,
        every_n_steps: int = 100,
        k: int = 1,
        smallest: bool = False,
        warm_start: bool = True,
        density_every_n_steps: int | None = None,
        preconditioned: bool | Literal["auto"] = "auto",
        loss_fn: LossFn | None = None,
        batch: BatchMode = "current",
        num_batches: int = 1,
        mode: OperatorMode = "eval",
        hvp: HvpMethod = "auto",
        tol: float = 1e-2,
        max_iter: int = 50,
        density_num_runs: int = 1,
        density_num_steps: int = 60,
        plot: bool = True,
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
        _check_positive("k", k)
        _check_positive("max_iter", max_iter)
        _check_positive("density_num_runs", density_num_runs)
        _check_positive("density_num_steps", density_num_steps)
        if density_every_n_steps is not None:
            _check_positive("density_every_n_steps", density_every_n_steps)
        check_number("tol", tol, 0, low_open=True, error=MisconfigurationException)
        if k > max_iter:
            raise MisconfigurationException(f"`k`={k} must not exceed `max_iter`={max_iter}")
        if preconditioned not in (True, False, "auto"):
            raise MisconfigurationException(f"`preconditioned` must be True, False or 'auto', got {preconditioned!r}")
        self.k = k
        self.smallest = smallest
        self.warm_start = warm_start
        self.density_every_n_steps = density_every_n_steps
        self.preconditioned = preconditioned
        self.tol = tol
        self.max_iter = max_iter
        self.density_num_runs = density_num_runs
        self.density_num_steps = density_num_steps
        self.plot = plot
        self._init: dict[str, Tensor] = {}  # warm-start vectors: "max", "min", "max/<group>" (host memory)
        self._max_basis: int | None = None  # Lanczos vectors stored at once, from memory_budget (None: max_iter)
        self._modes: dict[str, bool] = {}  # target -> preconditioned or not, decided at the first check, then fixed
        self._clip = _ClipFactors()
        self._deepspeed_clip = 0.0  # DeepSpeed's gradient_clipping (set at fit start; 0: none or not DeepSpeed)
        self._said_unmoved = False
        self._last_density_step = 0
        self.density_paths: list[str] = []
        self.plot_path: str | None = None

    def _key_args(self) -> dict[str, Any]:
        return {**super()._key_args(), "k": self.k, "preconditioned": self.preconditioned}

    @property
    def _preconditioned(self) -> bool | None:
        """Whether the whole model's sharpness is preconditioned (``None`` before the first check)."""
        return self._modes.get(_ALL)

    @_preconditioned.setter
    def _preconditioned(self, value: bool | None) -> None:
        if value is None:
            self._modes.pop(_ALL, None)
        else:
            self._modes[_ALL] = bool(value)

    def _metric(self, target: str, name: str) -> str:
        """``sharpness/<name>`` for the whole model, ``sharpness/<group>/<name>`` for a group (``sharpness_ggn``,
        ``sharpness_fisher`` for the other curvatures)."""
        return f"{self._name}/{target}/{name}" if target else f"{self._name}/{name}"

    @property
    def _key(self) -> str:
        return self._metric(_ALL, "preconditioned_lambda_max" if self._preconditioned else "lambda_max")

    # ---------------------------------------------------------------- set-up
    def _fit_budget(self, plan: _MemoryPlan, trainer: Trainer) -> None:
        adam_like = any(is_adam_family(g) for opt in trainer.optimizers for g in opt.param_groups)
        pre = 4 if self.preconditioned is True or (self.preconditioned == "auto" and adam_like) else 0
        fixed = 2 * self.k + pre  # the block's k products (one is the residual), k Ritz vectors, preconditioner
        basis = plan.vectors - fixed
        if basis < 2 * self.k + 1:
            what = f"Lanczos (k={self.k}: a basis of 2k + 1, the block's k products and k Ritz vectors" + (
                ", and 4 for the Adam preconditioner)" if pre else ")"
            )
            raise plan.too_small(f"SharpnessTracker(k={self.k})", fixed + 2 * self.k + 1, what)
        self._max_basis = None if basis >= max(self.max_iter + self.k - 1, self.density_num_steps) else basis

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        adam_like = any(is_adam_family(g) for opt in trainer.optimizers for g in opt.param_groups)
        if self.preconditioned is True and self._sharded:
            raise MisconfigurationException(
                f"SharpnessTracker(preconditioned=True) cannot run under {type(trainer.strategy).__name__}: it shards"
                " Adam's second moments with the parameters. Use preconditioned='auto' or False (the raw"
                " lambda_max(H) against 2/lr)."
            )
        if self.preconditioned is True and not adam_like:
            names = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or None
            raise MisconfigurationException(
                "SharpnessTracker(preconditioned=True) needs an Adam-family optimizer (betas, eps and exp_avg_sq"
                f" state); got {names}"
            )
        if self.preconditioned is not False and adam_like and not self._sharded:  # sharded: raw sharpness, no c
            self._clip.attach(trainer.optimizers)
        # DeepSpeed clips inside its own step, where no optimizer hook sees the gradient: its clipping threshold
        # (Lightning's gradient_clip_val, put in the config) and the engine's gradient norm give c instead.
        config = getattr(trainer.strategy, "config", None) if deepspeed_stage(trainer.strategy) is not None else None
        self._deepspeed_clip = float((config or {}).get("gradient_clipping") or 0.0)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clip.detach()
        self._plot_sharpness(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._clip.detach()  # also after an exception, when on_fit_end does not run

    # ---------------------------------------------------------------- the clipping factor
    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Record ||g|| only before the optimizer steps that lead to a due check (every optimizer may step once).
        nxt = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps
        self._clip.active = nxt - trainer.global_step <= max(1, len(trainer.optimizers))
        if self._clip.active:
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: gradients are still scaled here
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self._clip.after_backward(scale)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._deepspeed_clip > 0 and self._clip.active:
            # DeepSpeed's rule (its unscale_and_clip_grads): g * min(1, clip / (||g|| + 1e-6)), the norm before
            # clipping, which the engine keeps until its next step.
            norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None and math.isfinite(float(norm)):
                self._clip.factors[0] = min(1.0, self._deepspeed_clip / (float(norm) + 1e-6))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ---------------------------------------------------------------- measuring
    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, op: ReducedOperator, batches: list[Any]
    ) -> dict[str, float] | None:
        targets = {_ALL: op}
        for group in self._group_names:
            targets[group] = self._operator(trainer, pl_module, batches, group=group)
        notes: list[str] = []
        metrics: dict[str, float] = {}
        num_hvps = 0
        for name, target_op in targets.items():
            target, threshold, preconditioned, clip = self._target(trainer, name, target_op, notes)
            try:
                top = self._lanczos(target, "largest", trainer, name)
                bottom = self._lanczos(target, "smallest", trainer, name) if self.smallest and name == _ALL else None
            except torch.linalg.LinAlgError:
                # Non-finite products (a finite loss can still have them) reach Lanczos' projected eigensolver. A NaN
                # result is skipped, with one warning, by the caller's finite check; every rank averages the same
                # products, so every rank gets here together.
                return {self._key: math.nan}
            num_hvps += top.num_matvecs + (bottom.num_matvecs if bottom is not None else 0)
            if name == _ALL:
                # Central differences: is the product along the top eigenvector step-independent? If not, the
                # figures are wrong (kinks, half-precision gradients): skipped, the change logged, said once.
                step_metrics, trusted = self._step_check(trainer, target, top.eigenvectors[:, 0], "the top eigenvector")
                metrics.update(step_metrics)
                num_hvps += 2 if step_metrics else 0
                if not trusted:
                    self._remember_hvp(op)
                    return {**metrics, self._metric(_ALL, "num_hvps"): float(num_hvps)}
            lam = top.eigenvalues.tolist()
            metrics[self._metric(name, "preconditioned_lambda_max" if preconditioned else "lambda_max")] = lam[0]
            metrics[self._metric(name, "edge_of_stability")] = lam[0] / threshold
            metrics[self._metric(name, "threshold")] = threshold
            if name == _ALL:
                for i, value in enumerate(lam[1:], start=2):
                    metrics[self._metric(_ALL, f"eig_{i}")] = value
                if bottom is not None:
                    metrics[self._metric(_ALL, "lambda_min")] = bottom.eigenvalues[0].item()
                if preconditioned:
                    metrics.update(clip)
        metrics[self._metric(_ALL, "num_hvps")] = float(num_hvps)
        if notes:  # choices are made once per target (at its first check): so is this warning
            rank_zero_warn("SharpnessTracker: " + " ".join(notes) + " Said once.")
        self._remember_hvp(op)
        step = trainer.global_step
        # Checks skipped by max_overhead may miss a multiple of density_every_n_steps: plot at the next check.
        if (
            self.density_every_n_steps
            and step // self.density_every_n_steps > self._last_density_step // self.density_every_n_steps
        ):
            self._last_density_step = step
            self._plot_density(trainer, self._target(trainer, _ALL, op, [])[0], step)
        return metrics

    def _target(
        self, trainer: Trainer, name: str, op: ReducedOperator, notes: list[str]
    ) -> tuple[Any, float, bool, dict[str, float]]:
        """The operator to run Lanczos on, its threshold, whether it is preconditioned, and the clip factors.

        The choice (preconditioned or not) is made at the first check and kept, so that a metric never changes
        meaning mid-run; ``notes`` collects what the first check must say.
        """
        params = op.base.params
        optimizers = trainer.optimizers
        # Sharded parameters: Adam's second moments are sharded too, and not read back here: the raw sharpness.
        read = self.preconditioned is not False and not self._sharded
        moments = adam_moments(optimizers, params) if read else [None] * len(params)
        have = [m is not None for m in moments]
        if name not in self._modes:
            self._modes[name] = self.preconditioned is not False and all(have)
            self._note_choice(name, op, optimizers, have, notes)
        if self._modes[name] and not all(have):
            # Moments that existed at the first check are gone (an optimizer swapped mid-run): raw from now on.
            self._modes[name] = False
            self._note_choice(name, op, optimizers, have, notes)
        if not self._modes[name]:
            lrs = [float(o.group["lr"]) for o in owner_of(optimizers, params) if o is not None] or [self._lr(trainer)]
            lr = _lr_floor(max(lrs))
            return op, gd_threshold(lr) if lr == lr else math.nan, False, {}
        clip = {i: self._clip.factors.get(i, 1.0) for i in sorted({m.optimizer_index for m in moments})}
        diag, threshold, share = _adam_update_preconditioner(moments, clip)
        if share > 0:
            if not self._said_unmoved and name == _ALL:
                self._said_unmoved = True
                notes.append(
                    f"{share:.1%} of the measured coordinates have no gradient in Adam's second moment (sqrt(v_hat) <"
                    " eps: sparse or compressed gradients such as ddp_topk, or parameters the loss does not reach)."
                    " Adam does not move them, and their P = (1 - beta1^t) eps would put 1/eps on the diagonal of"
                    " P^-1 H (a sharpness up to 1e8 times too large), so they are left out: the number is the"
                    " preconditioned sharpness of the coordinates Adam moves (with compressed gradients, of the"
                    f" update a coordinate gets when it is sent). `{self._metric(_ALL, 'unmoved_fraction')}` logs"
                    " the share left out."
                )
        logged = {self._metric(_ALL, "clip_factor"): clip[moments[0].optimizer_index]}
        logged[self._metric(_ALL, "unmoved_fraction")] = share
        if len(clip) > 1:
            logged.update({self._metric(_ALL, f"clip_factor_{i}"): c for i, c in clip.items()})
        return PreconditionedOperator(op, diag), threshold, True, logged

    def _note_choice(
        self, name: str, op: ReducedOperator, optimizers: list[Any], have: list[bool], notes: list[str]
    ) -> None:
        what = "the whole model" if name == _ALL else f"group {name!r}"
        if self._modes[name]:
            used = sorted({type(optimizers[o.index]).__name__ for o in owner_of(optimizers, op.base.params) if o})
            rank_zero_info(
                f"SharpnessTracker: {what}: Adam moments found ({', '.join(used)}): tracking lambda_max(c P^-1 H)"
                " against (2 + 2 beta1) / ((1 - beta1) lr), with c the measured gradient-clipping factor."
            )
            return
        if self.preconditioned is False or not any(is_adam_family(g) for o in optimizers for g in o.param_groups):
            rank_zero_info(f"SharpnessTracker: {what}: tracking lambda_max(H) against 2/lr.")
            return
        if self._sharded:
            notes.append(
                f"{what}: Adam's second moments are sharded with the parameters under"
                f" {self._strategy_name}: tracking the raw"
                " lambda_max(H) against 2/lr, not the preconditioned sharpness."
            )
            return
        missing = [n for n, h in zip(op.base.param_names, have, strict=True) if not h]
        shown = ", ".join(repr(n) for n in missing[:4]) + (", ..." if len(missing) > 4 else "")
        notes.append(
            f"{what}: {len(missing)} of {len(have)} measured parameters have no Adam moments ({shown}: updated by a"
            " non-Adam optimizer, by none, or by one keeping no per-parameter second moment),"
            " so the preconditioned sharpness of the update is not defined for them: tracking the raw lambda_max(H)"
            " against 2/lr (the largest lr of their optimizers) instead."
            + (" Use `groups` to track the Adam-trained parameters preconditioned." if any(have) else "")
        )

    def _lanczos(self, op: Any, which: Which, trainer: Trainer, name: str = _ALL) -> Any:
        side = ("max" if which == "largest" else "min") + (f"/{name}" if name else "")
        init = self._init.get(side) if self.warm_start else None  # on the host: copied into the basis directly
        if init is not None and init.shape[0] != op.numel:
            init = None  # a warm start of another parameter set (a changed model): start cold
        if self._sharded and self.warm_start:
            # Sharded vectors: each rank holds its shard of the start block, so all start warm or all start cold (a
            # rank without its shard would otherwise run another sequence of collectives than the others).
            cold = op.allreduce(torch.tensor([float(init is None)], dtype=op.dtype, device=op.device))
            init = None if float(cold) > 0 else init
        k = self.k if which == "largest" else 1
        max_basis = None if self._max_basis is None else min(self._max_basis, self.max_iter + k - 1)
        result = lanczos(
            op, k=k, which=which, tol=self.tol, max_iter=self.max_iter, init=init,
            generator=self._generator(trainer), max_basis=max_basis,
        )  # fmt: skip
        if self.warm_start and torch.isfinite(result.eigenvectors).all():
            # All k Ritz vectors: the next check's start block (block Lanczos for k > 1; one vector for k = 1).
            vectors = result.eigenvectors if k > 1 else result.eigenvectors[:, 0]
            self._init[side] = vectors.detach().to(device="cpu", dtype=op.dtype, copy=True)
        return result

    # ---------------------------------------------------------------- plots
    def _plot_density(self, trainer: Trainer, op: Any, step: int) -> None:
        density = spectral_density(
            op, num_runs=self.density_num_runs, num_steps=self.density_num_steps,
            generator=self._generator(trainer, rank=1_000_003), max_basis=self._max_basis,
        )  # fmt: skip
        log_dir = run_dir(trainer)  # on every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        fig, ax = new_figure()
        ax.semilogy(density.grid.cpu().numpy(), density.density.clamp_min(1e-12).cpu().numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"Hessian spectral density, step {step}")
        ax.grid(alpha=0.3)
        path = save_figure(
            trainer, fig, log_dir, f"spectral_density_step{step}.png", tag=f"{self._name}/spectral_density"
        )
        self.density_paths.append(path)

    def _plot_sharpness(self, trainer: Trainer) -> None:
        log_dir = run_dir(trainer)  # on every rank: a collective under DDP
        if not self.plot or not trainer.is_global_zero or not self.history.get(self._key):
            return
        fig = self._sharpness_figure()
        name = "sharpness.png" if self.curvature == "hessian" else f"sharpness_{self.curvature}.png"
        self.plot_path = save_figure(trainer, fig, log_dir, name, tag=f"{self._name}/vs_threshold")
        rank_zero_info(f"SharpnessTracker: wrote {self.plot_path}")

    def _sharpness_figure(self) -> Any:
        """lambda_max (and the groups', lambda_min) against the threshold over the checks so far."""
        key = self._key
        steps, lam = zip(*self.history[key], strict=True)
        t_steps, thresholds = zip(*self.history[self._metric(_ALL, "threshold")], strict=True)
        fig, ax = new_figure()
        ax.plot(steps, lam, marker="o", markersize=4, label=key.split("/")[1])
        values = [*lam, *thresholds]
        for group in self._group_names:
            for suffix in ("preconditioned_lambda_max", "lambda_max"):
                if self._metric(group, suffix) in self.history:
                    g_steps, g_lam = zip(*self.history[self._metric(group, suffix)], strict=True)
                    ax.plot(g_steps, g_lam, marker=".", markersize=4, linewidth=1, label=f"{group}: {suffix}")
                    values += g_lam
        bound = "(2 + 2 beta1) / ((1 - beta1) lr)" if self._preconditioned else "2/lr"
        # A marker on every threshold point, and a full-width line at the last one: visible with a single check.
        label = f"{bound} (last: {thresholds[-1]:.4g})"
        ax.plot(t_steps, thresholds, linestyle="--", marker="_", markersize=14, color="black", label=label)
        ax.axhline(thresholds[-1], linestyle=":", linewidth=1, color="black")
        if self._metric(_ALL, "lambda_min") in self.history:
            s_min, l_min = zip(*self.history[self._metric(_ALL, "lambda_min")], strict=True)
            ax.plot(s_min, l_min, marker="v", markersize=4, label="lambda_min")
            values += l_min
        if len(steps) == 1:
            ax.annotate(
                f"{lam[0]:.4g}: {lam[0] / thresholds[-1]:.3g} of the threshold",
                (steps[0], lam[0]), textcoords="offset points", xytext=(8, 6),
            )  # fmt: skip
        _wide_range_scale(ax, values)
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue")
        ax.set_title("Sharpness against the stability threshold")
        ax.grid(alpha=0.3)
        ax.legend()
        return fig

    # ---------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        warm = {side: v.detach().cpu() for side, v in self._init.items()}
        if self._sharded:
            # Each rank's shard of the warm-start vectors; the checkpoint is written by rank zero (a collective: the
            # callbacks' state is taken on every rank).
            state["warm_start_by_rank"] = gather_from_ranks(warm)
        else:
            state["warm_start"] = warm
        state["last_density_step"] = self._last_density_step
        state["preconditioned_in_use"] = self._preconditioned
        state["preconditioned_groups"] = {k: v for k, v in self._modes.items() if k != _ALL}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init = dict(state_dict.get("warm_start", {}))
        by_rank = state_dict.get("warm_start_by_rank")
        if by_rank is not None:  # sharded: this rank's shard, if the run has the checkpoint's ranks (else cold)
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            self._init = dict(by_rank[rank]) if len(by_rank) == world else {}
        self._last_density_step = int(state_dict.get("last_density_step", 0))
        self._modes = {k: bool(v) for k, v in state_dict.get("preconditioned_groups", {}).items()}
        in_use = state_dict.get("preconditioned_in_use")
        self._preconditioned = None if in_use is None else bool(in_use)


def _adam_update_preconditioner(moments: Sequence[Any], clip: Mapping[int, float]) -> tuple[Tensor, float, float]:
    """Cohen et al.'s ``P`` over the measured coordinates (combined over the optimizers and groups that own them,
    each divided by its optimizer's clipping factor), its threshold, and the share of coordinates Adam never moved,
    left out with an infinite ``P`` (curvature/preconditioned.py, "Sparse or compressed gradients"). Used by
    ``SharpnessTracker`` and ``lightning-gd analyze``; ``moments`` from ``utils.optim_state.adam_moments``.
    """
    diags = [
        adam_preconditioner(m.exp_avg_sq, m.step, m.beta1, m.beta2, m.eps, clip_factor=clip.get(m.optimizer_index, 1.0))
        for m in moments
    ]
    thresholds = [adam_threshold(m.beta1, _lr_floor(m.lr)) for m in moments]
    diag, threshold = combine_preconditioners(diags, thresholds)
    unmoved = torch.cat([adam_unmoved(m.exp_avg_sq, m.step, m.beta2, m.eps).flatten() for m in moments])
    share = float(unmoved.double().mean())
    if share > 0:
        diag = diag.masked_fill(unmoved.to(diag.device), math.inf)
    return diag, threshold, share


def _lr_floor(lr: float) -> float:
    """A learning rate of 0 (a frozen group, the first warm-up step) updates nothing: an all but infinite, finite
    threshold, so that its block never sets the edge; NaN (no optimizer) stays NaN and the check is skipped."""
    return lr if not lr <= 0 else 1e-300
