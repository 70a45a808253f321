"""Track sharpness (top and bottom Hessian eigenvalues) against the edge of stability, with spectra plots.

Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability":
under full-batch GD, lambda_max rises to about 2/lr and hovers there. Cohen et al. 2022, "Adaptive
Gradient Methods at the Edge of Stability": for Adam the preconditioned sharpness lambda_max(P^-1 H),
P_t = (1 - beta1^t) diag(sqrt(v_hat_t) + eps), hovers at (2 + 2 beta1) / ((1 - beta1) lr), 38/lr for
beta1 = 0.9.
Ghorbani et al. 2019 and Sagun et al. 2017 ("Empirical Analysis of the Hessian") for the density.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd.callbacks._curvature import BatchMode, LossFn, _check_positive, _CurvatureCallback, _MemoryPlan
from lightning_gd.curvature import (
    HvpMethod,
    OperatorMode,
    PreconditionedOperator,
    ReducedOperator,
    lanczos,
    spectral_density,
)
from lightning_gd.curvature.preconditioned import adam_preconditioner
from lightning_gd.utils.optim_state import adam_moments, is_adam_family
from lightning_gd.utils.plotting import new_figure, run_dir, save_figure

__all__ = ["SharpnessTracker"]


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


def _adam_preconditioner(optimizer: torch.optim.Optimizer, params: tuple[Tensor, ...]) -> tuple[Tensor, float] | None:
    """Flat diagonal of Adam's preconditioner over ``params`` and beta1 (``None`` if a parameter has no moments)."""
    moments = adam_moments([optimizer], params)
    if any(m is None for m in moments):
        return None
    diag = torch.cat([adam_preconditioner(m.exp_avg_sq, m.step, m.beta1, m.beta2, m.eps).flatten() for m in moments])
    return diag, moments[-1].beta1


def _has_adam_moments(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is from the Adam family and has created its moments."""
    if optimizer is None or not all(is_adam_family(g) for g in optimizer.param_groups):
        return False
    return any(
        m is not None for m in adam_moments([optimizer], [p for g in optimizer.param_groups for p in g["params"]])
    )


class SharpnessTracker(_CurvatureCallback):
    """Track lambda_max (and optionally lambda_min) of the training-loss Hessian with warm-started Lanczos.

    The threshold compares like with like: with plain (momentum) SGD, lambda_max of H against 2/lr; with an
    Adam-family optimizer (``preconditioned="auto"``, the default, detects it at the first check), the
    preconditioned lambda_max of P^-1 H against 38/lr. By default a due check is skipped while measuring would
    take more than ``max_overhead`` (2.5%) of the training time: the first skip warns once, naming the cost of
    a check, and ``sharpness/skipped_checks`` counts them. Pass ``max_overhead=None`` to measure at every due
    step, or use a larger ``every_n_steps``.

    Logged every ``every_n_steps`` optimizer steps (the same numbers on every rank):

    * ``sharpness/lambda_max`` and ``sharpness/edge_of_stability`` = lr * lambda_max / 2 (1 = the GD stability
      edge 2/lr); with ``k > 1`` also ``sharpness/eig_2`` ... ``sharpness/eig_k``;
    * with ``smallest=True``, ``sharpness/lambda_min`` (negative: a direction of negative curvature, a saddle);
    * with ``preconditioned=True`` (Adam-family optimizers), ``sharpness/preconditioned_lambda_max`` of
      P^-1/2 H P^-1/2, P_t = (1 - beta1^t) diag(sqrt(v_hat_t) + eps), and ``sharpness/edge_of_stability`` against
      (2 + 2 beta1) / ((1 - beta1) lr), i.e. 38/lr at beta1 = 0.9;
    * ``sharpness/num_hvps``: Hessian-vector products spent in this check;
    * ``sharpness/skipped_checks``: due checks skipped so far by the ``max_overhead`` budget.

    Every ``density_every_n_steps`` steps the spectral density (stochastic Lanczos quadrature) is plotted to
    ``<log_dir>/spectral_density_step<N>.png`` and TensorBoard; at the end of fitting, lambda_max against the
    stability threshold over training goes to ``<log_dir>/sharpness.png``. The warm-start vectors, the fixed
    batch and the history are checkpointed. Measuring never perturbs training; under DDP every product is
    averaged over ranks, so all ranks run the same Lanczos; FSDP and DeepSpeed ZeRO-3 are refused at setup.

    Args:
        every_n_steps: Measure after every this many optimizer steps (see ``max_overhead``).
        k: Number of top eigenvalues.
        smallest: Also compute lambda_min.
        warm_start: Start Lanczos from the previous check's eigenvector (few products per check).
        density_every_n_steps: Plot the spectral density this often (``None``: never).
        preconditioned: ``True``: track the Adam-preconditioned sharpness (needs an optimizer with Adam moments);
            ``False``: the raw Hessian's against 2/lr, whatever the optimizer; ``"auto"``: preconditioned when the
            optimizer has Adam moments (betas, eps, ``exp_avg_sq``) at the first check, raw otherwise.
        loss_fn: ``loss_fn(module, batch) -> Tensor``; default: the module's own ``training_step`` with its
            logging silenced.
        batch: ``"current"`` or ``"fixed"`` (see :class:`HessianTraceMonitor`).
        num_batches: Batches averaged in ``"fixed"`` mode.
        mode: ``"eval"`` or ``"train"`` (see :class:`~lightning_gd.curvature.HessianOperator`).
        hvp: ``"auto"``, ``"double_backward"`` or ``"forward_over_reverse"``.
        tol: Relative residual tolerance of Lanczos. Ritz-value errors scale like ``tol**2``: the default
            1e-2 measured worst 2.7e-4 relative error at at most 10 products per warm-started check
            (benchmarks/RESULTS.md).
        max_iter: Most Lanczos iterations per eigenvalue side.
        density_num_runs: SLQ runs per density.
        density_num_steps: Lanczos steps per SLQ run.
        plot: Write the end-of-fit plot.
        seed: Seed of the cold-start vectors and density probes.
        max_overhead: Largest fraction of the training wall time spent measuring, default 2.5%; due checks are
            skipped while over it (see :class:`HessianTraceMonitor`). ``None``: exactly every ``every_n_steps``.
        memory_budget: Bytes of extra device memory a check may use beyond autograd's own Hessian-vector-product memory,
            for its parameter-sized vectors (in the working dtype: float32, float64 for float64 models). A check holds
            the Lanczos basis (at most ``max_basis`` vectors), the block's ``k`` products (one is the residual) and the
            ``k`` Ritz vectors, plus 4 with the Adam preconditioner (its diagonal, ``P^-1/2`` and the two scaled vectors
            of a product); the warm-start vectors stay in host memory. ``max_basis`` = what the budget leaves, at most
            ``max_iter``; below the iterations a check needs, Lanczos thick-restarts (more products, same accuracy) and
            the density reorthogonalises against the latest ``max_basis`` vectors only. ``None``: 25% of the device's
            memory (a GPU's total memory; the host's physical memory on CPU), the smallest over ranks. A budget below
            ``2k + 1`` basis vectors raises at the start of fitting, stating the numbers.

    Precision: products in the parameters' dtype (float32 under ``bf16-mixed``), basis and Gram-Schmidt in float32
    (float64 for float64 models), Ritz values from a float64 projected matrix.

    Example::

        trainer = Trainer(callbacks=[SharpnessTracker(every_n_steps=20, smallest=True, density_every_n_steps=500)])

    Raises:
        MisconfigurationException: for a bad argument (naming it and its value), a model without trainable
            parameters, a sharded strategy, or ``preconditioned=True`` with an optimizer without Adam moments.
    """

    _name = "sharpness"

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
    ) -> None:
        super().__init__(every_n_steps, batch, num_batches, loss_fn, mode, hvp, seed, max_overhead, memory_budget)
        _check_positive("k", k)
        _check_positive("max_iter", max_iter)
        _check_positive("density_num_runs", density_num_runs)
        _check_positive("density_num_steps", density_num_steps)
        if density_every_n_steps is not None:
            _check_positive("density_every_n_steps", density_every_n_steps)
        if not tol > 0:
            raise MisconfigurationException(f"`tol` must be > 0, got {tol!r}")
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
        self._init: dict[str, Tensor] = {}  # warm-start vectors: "max", "min" (host memory)
        self._max_basis: int | None = None  # Lanczos vectors stored at once, from memory_budget (None: max_iter)
        self._preconditioned: bool | None = None  # resolved at the first check (``"auto"``), then fixed
        self._last_density_step = 0
        self.density_paths: list[str] = []
        self.plot_path: str | None = None

    def _key_args(self) -> dict[str, Any]:
        return {**super()._key_args(), "k": self.k, "preconditioned": self.preconditioned}

    @property
    def _key(self) -> str:
        return "sharpness/preconditioned_lambda_max" if self._preconditioned else "sharpness/lambda_max"

    def _resolve_preconditioned(self, trainer: Trainer) -> bool:
        """The choice of ``"auto"``, made once at the first check (the optimizer has moments by then)."""
        if self._preconditioned is None:
            if self.preconditioned == "auto":
                self._preconditioned = _has_adam_moments(trainer.optimizers[0] if trainer.optimizers else None)
                rank_zero_info(
                    "SharpnessTracker(preconditioned='auto'): "
                    + ("Adam moments found: tracking lambda_max(P^-1 H) against (2 + 2 beta1) / ((1 - beta1) lr)."
                       if self._preconditioned else "no Adam moments: tracking lambda_max(H) against 2/lr.")
                )  # fmt: skip
            else:
                self._preconditioned = bool(self.preconditioned)
        return self._preconditioned

    def _fit_budget(self, plan: _MemoryPlan, trainer: Trainer) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        adam_like = optimizer is not None and all("betas" in g and "eps" in g for g in optimizer.param_groups)
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
        if self.preconditioned is True:
            group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
            if "betas" not in group or "eps" not in group:
                raise MisconfigurationException(
                    "SharpnessTracker(preconditioned=True) needs an Adam-family optimizer (betas, eps and"
                    f" exp_avg_sq state); got {type(trainer.optimizers[0]).__name__ if trainer.optimizers else None}"
                )

    def _measure(self, trainer: Trainer, pl_module: LightningModule, op: ReducedOperator) -> dict[str, float] | None:
        lr = self._lr(trainer)
        metrics: dict[str, float] = {}
        target: Any = op
        threshold = 2.0 / lr
        if self._resolve_preconditioned(trainer):
            pre = _adam_preconditioner(trainer.optimizers[0], op.base.params)
            if pre is None:
                rank_zero_warn("SharpnessTracker: no Adam second moments yet; skipping this measurement.")
                return None
            diag, beta1 = pre
            target = PreconditionedOperator(op, diag)
            threshold = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
        num_hvps = 0
        try:
            top = self._lanczos(target, "largest", trainer)
            bottom = self._lanczos(target, "smallest", trainer) if self.smallest else None
        except torch.linalg.LinAlgError:
            # Non-finite products (a finite loss can still have them) reach Lanczos' tridiagonal eigensolver. A NaN
            # result is skipped, with one warning, by the caller's finite check; every rank averages the same
            # products, so every rank gets here together.
            return {self._key: math.nan}
        num_hvps += top.num_matvecs
        lam = top.eigenvalues.tolist()
        metrics[self._key] = lam[0]
        metrics["sharpness/edge_of_stability"] = lam[0] / threshold
        metrics["sharpness/threshold"] = threshold
        for i, value in enumerate(lam[1:], start=2):
            metrics[f"sharpness/eig_{i}"] = value
        if bottom is not None:
            num_hvps += bottom.num_matvecs
            metrics["sharpness/lambda_min"] = bottom.eigenvalues[0].item()
        metrics["sharpness/num_hvps"] = float(num_hvps)
        self._remember_hvp(op)
        step = trainer.global_step
        # Checks skipped by max_overhead may miss a multiple of density_every_n_steps: plot at the next check.
        if (
            self.density_every_n_steps
            and step // self.density_every_n_steps > self._last_density_step // self.density_every_n_steps
        ):
            self._last_density_step = step
            self._plot_density(trainer, target, step)
        return metrics

    def _lanczos(self, op: Any, which: str, trainer: Trainer) -> Any:
        side = "max" if which == "largest" else "min"
        init = self._init.get(side) if self.warm_start else None  # on the host: copied into the basis directly
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
        path = save_figure(trainer, fig, log_dir, f"spectral_density_step{step}.png", tag="sharpness/spectral_density")
        self.density_paths.append(path)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        key = self._key
        log_dir = run_dir(trainer)  # on every rank: a collective under DDP
        if not self.plot or not trainer.is_global_zero or not self.history.get(key):
            return
        steps, lam = zip(*self.history[key], strict=True)
        _, thresholds = zip(*self.history["sharpness/threshold"], strict=True)
        fig, ax = new_figure()
        ax.plot(steps, lam, marker="o", markersize=3, label=key.split("/")[1])
        bound = "(2 + 2 beta1) / ((1 - beta1) lr)" if self._preconditioned else "2/lr"
        ax.plot(steps, thresholds, linestyle="--", color="black", label=bound)
        values = [*lam, *thresholds]
        if "sharpness/lambda_min" in self.history:
            s_min, l_min = zip(*self.history["sharpness/lambda_min"], strict=True)
            ax.plot(s_min, l_min, marker="v", markersize=3, label="lambda_min")
            values += l_min
        _wide_range_scale(ax, values)
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue")
        ax.set_title("Sharpness against the stability threshold")
        ax.grid(alpha=0.3)
        ax.legend()
        self.plot_path = save_figure(trainer, fig, log_dir, "sharpness.png", tag="sharpness/vs_threshold")
        rank_zero_info(f"SharpnessTracker: wrote {self.plot_path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["warm_start"] = {side: v.detach().cpu() for side, v in self._init.items()}
        state["last_density_step"] = self._last_density_step
        state["preconditioned_in_use"] = self._preconditioned
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init = dict(state_dict.get("warm_start", {}))
        self._last_density_step = int(state_dict.get("last_density_step", 0))
        in_use = state_dict.get("preconditioned_in_use")
        self._preconditioned = None if in_use is None else bool(in_use)
