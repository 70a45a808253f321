"""Gradient flossing: keep the Lyapunov exponents of a recurrent network near zero (Engelken, NeurIPS 2023).

Engelken 2023, "Gradient Flossing: Improving Gradient Descent through Dynamic Control of Jacobians": the
gradients of a recurrent network over ``T`` steps scale like ``exp(lambda_i T)``, so exponents ``lambda_i``
far from zero make them explode or vanish. Flossing minimizes ``mean((lambda - target)^2)`` over the
``k`` leading exponents of the network's own forward dynamics, before and during training. The math is
:mod:`lightning_gd.dynamics.flossing` (the loss and the trajectories) over
:func:`lightning_gd.dynamics.lyapunov_spectrum`; this module only finds the dynamics, schedules the flossing
steps, averages their gradients over data-parallel ranks, logs, plots and checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_gd.callbacks._nonfinite import NonFiniteGuard
from lightning_gd.dynamics import RecurrentDynamics, recurrent_dynamics
from lightning_gd.dynamics.flossing import flossing_loss, flossing_spectrum
from lightning_gd.dynamics.lyapunov import _single_cpu_thread
from lightning_gd.utils.checks import check_number, check_positive_int
from lightning_gd.utils.deepspeed_state import deepspeed_stage, full_grads, set_fp32_params, set_grads
from lightning_gd.utils.logging import log_to_loggers
from lightning_gd.utils.plotting import new_figure, run_dir, save_figure
from lightning_gd.utils.rng import tuple_hash_seed

__all__ = ["GradientFlossing"]

_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell)
_METHOD = "flossing_dynamics"


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    return check_positive_int(name, value, minimum=minimum, error=MisconfigurationException)


def _check_float(name: str, value: Any, positive: bool = False) -> float:
    return check_number(name, value, 0 if positive else None, low_open=positive, error=MisconfigurationException)


def _find_dynamics(module: nn.Module, name: str | None) -> RecurrentDynamics:
    """The discovery protocol documented in :class:`GradientFlossing` (``MisconfigurationException`` if none)."""
    owner = type(module).__name__
    if name is not None:
        obj: Any = module
        for part in name.split("."):
            if not hasattr(obj, part):
                raise MisconfigurationException(
                    f"GradientFlossing(dynamics={name!r}): {owner} has no attribute {part!r}"
                )
            obj = getattr(obj, part)
        found = obj
    elif callable(getattr(module, _METHOD, None)):
        found = getattr(module, _METHOD)
    else:
        layers = [(n, m) for n, m in module.named_modules() if isinstance(m, _RECURRENT)]
        if len(layers) != 1:
            what = "no nn.RNN/GRU/LSTM (or cell)" if not layers else f"several ({', '.join(n for n, _ in layers)})"
            raise MisconfigurationException(
                f"GradientFlossing found {what} in {owner}: define `{_METHOD}(self) -> RecurrentDynamics` on the"
                " module, or pass `dynamics=` the name of the recurrent layer"
            )
        found = layers[0][1]
    if isinstance(found, _RECURRENT):
        try:
            return recurrent_dynamics(found)
        except ValueError as err:
            raise MisconfigurationException(f"GradientFlossing: {err}") from err
    if isinstance(found, nn.Module) or not callable(found):
        raise MisconfigurationException(
            f"GradientFlossing: {found!r} is neither an nn.RNN/GRU/LSTM (or cell) nor a method returning"
            " RecurrentDynamics"
        )
    dynamics = found()
    if not isinstance(dynamics, RecurrentDynamics):
        raise MisconfigurationException(
            f"GradientFlossing: {name or _METHOD}() must return lightning_gd.dynamics.RecurrentDynamics,"
            f" got {type(dynamics).__name__}"
        )
    return dynamics


class GradientFlossing(Callback):
    """Push the ``k`` leading Lyapunov exponents of the module's recurrent dynamics towards ``target``.

    The flossing loss is ``weight * mean((lambda - target)^2)`` over the ``k`` exponents of ``batch_size``
    trajectories of ``sequence_length`` steps (the first ``warmup`` not counted), driven by fresh random
    inputs each time. Engelken 2023's schedule: flossing before training, then again every so often.

    * **Before training** (``pre_train_steps`` > 0): that many steps of a separate AdamW (``lr``, no weight
      decay) on the flossing loss, at the start of the first fit (not again after a resume).
    * **During training**, every ``every_n_steps`` optimizer steps (``None``: never):

      - ``continuous=False``: ``floss_steps`` more flossing-optimizer steps after that training step, at most
        ``max_rounds`` times;
      - ``continuous=True``: the flossing loss is an added loss term: ``weight * grad(loss_floss)`` is added to
        the training gradients just before the training optimizer step (``every_n_steps`` defaults to 1).

    Only the parameters the dynamics reach get a flossing gradient (input, recurrent and bias weights, not a
    readout). Exponents are measured after each round (and every ``measure_every_n_steps``, and at the end)
    and logged as ``lyapunov/max``, ``lyapunov/mean`` and ``lyapunov/loss``; ``lyapunov_spectrum.png`` (run
    directory and TensorBoard) draws every exponent over training.

    **Finding the dynamics** (at setup; ``MisconfigurationException`` if nothing is found):

    1. ``dynamics="name"``: the (dotted) attribute of the LightningModule: an ``nn.RNN`` / ``nn.GRU`` /
       ``nn.LSTM`` or one of their cells, or a method returning
       :class:`~lightning_gd.dynamics.RecurrentDynamics` (a step function and its sizes);
    2. otherwise the module's method ``flossing_dynamics(self) -> RecurrentDynamics``, if defined;
    3. otherwise its single ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` / cell submodule (several are an error).

    The inputs come from ``RecurrentDynamics.sample_inputs(T, B, generator)`` when set (your task's input
    distribution), else standard Gaussian noise times ``input_std``; initial states are ``N(0, 0.1^2)``.

    **DDP:** every rank floss its own random trajectories and the flossing gradients are averaged over ranks
    (one all-reduce per flossing step), so replicas stay identical; the logged exponents are rank means.
    **DeepSpeed ZeRO-1/2** the same, with the flossed weights also written into DeepSpeed's fp32 master copies
    and the added gradient into its gradient buffers (through ``deepspeed.utils``' per-parameter API), so a run
    matches the DDP run of the same seed; ZeRO-3 and FSDP are refused at setup (they partition the recurrent
    weights).

    Args:
        k: Number of exponents (``1 <= k <= N``, the state size; checked at setup).
        target: Target exponent (0: neither exploding nor vanishing).
        weight: Factor of the flossing loss.
        pre_train_steps: Flossing steps before training (0: none).
        every_n_steps: Flossing during training every that many optimizer steps (``None``: never).
        floss_steps: Flossing steps per round during training (``continuous=False``).
        sequence_length: Steps ``T`` of each trajectory.
        warmup: Transient steps not counted (``< sequence_length``).
        batch_size: Trajectories per flossing step and rank.
        dynamics: Where to find the dynamics (see above).
        continuous: Add the flossing gradient to the training gradient instead of separate steps.
        max_rounds: At most that many flossing rounds during training (``None``: no limit).
        lr: Learning rate of the flossing AdamW.
        reorth_every: Steps between QR re-orthonormalizations.
        measure_every_n_steps: Also measure (without flossing) every that many steps (``None``: never).
        input_std: Scale of the Gaussian inputs when the dynamics bring no ``sample_inputs``.
        plot: Write ``lyapunov_spectrum.png`` at the end of training.
        seed: Seed of the trajectories' inputs, initial states and tangent bases (global RNG untouched).

    Example::

        trainer = L.Trainer(callbacks=[GradientFlossing(k=32, pre_train_steps=500, every_n_steps=1000,
                                                        floss_steps=100, sequence_length=300, warmup=30)])
    """

    def __init__(
        self,
        k: int,
        target: float = 0.0,
        weight: float = 1.0,
        pre_train_steps: int = 100,
        every_n_steps: int | None = None,
        floss_steps: int = 20,
        sequence_length: int = 100,
        warmup: int = 20,
        batch_size: int = 8,
        dynamics: str | None = None,
        continuous: bool = False,
        max_rounds: int | None = None,
        lr: float = 1e-3,
        reorth_every: int = 1,
        measure_every_n_steps: int | None = None,
        input_std: float = 1.0,
        plot: bool = True,
        seed: int = 0,
    ) -> None:
        _check_int("k", k)
        self.target = _check_float("target", target)
        self.weight = _check_float("weight", weight, positive=True)
        _check_int("pre_train_steps", pre_train_steps, minimum=0)
        if continuous and every_n_steps is None:
            every_n_steps = 1
        if every_n_steps is not None:
            _check_int("every_n_steps", every_n_steps)
        _check_int("floss_steps", floss_steps)
        _check_int("sequence_length", sequence_length)
        _check_int("warmup", warmup, minimum=0)
        if warmup >= sequence_length:
            raise MisconfigurationException(
                f"`warmup` must be smaller than `sequence_length` = {sequence_length}, got {warmup}"
            )
        _check_int("batch_size", batch_size)
        if dynamics is not None and (not isinstance(dynamics, str) or not dynamics):
            raise MisconfigurationException(f"`dynamics` must be an attribute name or None, got {dynamics!r}")
        if not isinstance(continuous, bool):
            raise MisconfigurationException(f"`continuous` must be a bool, got {continuous!r}")
        if max_rounds is not None:
            _check_int("max_rounds", max_rounds)
        self.lr = _check_float("lr", lr, positive=True)
        _check_int("reorth_every", reorth_every)
        if measure_every_n_steps is not None:
            _check_int("measure_every_n_steps", measure_every_n_steps)
        self.input_std = _check_float("input_std", input_std, positive=True)
        self.k = k
        self.pre_train_steps = pre_train_steps
        self.every_n_steps = every_n_steps
        self.floss_steps = floss_steps
        self.sequence_length = sequence_length
        self.warmup = warmup
        self.batch_size = batch_size
        self.dynamics = dynamics
        self.continuous = continuous
        self.max_rounds = max_rounds
        self.reorth_every = reorth_every
        self.measure_every_n_steps = measure_every_n_steps
        self.plot = plot
        self.seed = seed
        # (step, phase, spectrum) with phase in {"initial", "pre_train", "round", "measure", "end"}
        self.history: list[tuple[int, str, list[float]]] = []
        self.last_metrics: dict[str, float] = {}
        self.pretrained = False
        self.rounds = 0
        self._draws = 0  # trajectories drawn so far: seeds the next draw, so a resumed run draws the same
        self._last_seen = -1
        self._dyn: RecurrentDynamics | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._zero = False  # DeepSpeed ZeRO-1/2: gradients and master weights live in its partitions (set at setup)
        self._nonfinite = NonFiniteGuard(
            "GradientFlossing", "Lyapunov exponents", "this flossing step (or measurement) is skipped"
        )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, target=self.target, every_n_steps=self.every_n_steps,
                                        continuous=self.continuous, dynamics=self.dynamics)  # fmt: skip

    # ---------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise MisconfigurationException(
                f"GradientFlossing does not support {type(trainer.strategy).__name__}: FSDP shards the recurrent"
                " weights across ranks, and the Lyapunov spectrum needs the whole weights in every step function"
                " call. Use DDP, or DeepSpeed ZeRO stage 1 or 2 (`strategy='deepspeed_stage_2'`)."
            )
        if deepspeed_stage(trainer.strategy) == 3:
            raise MisconfigurationException(
                "GradientFlossing does not support DeepSpeed ZeRO stage 3: it partitions the recurrent weights across"
                " ranks, and the Lyapunov spectrum needs the whole weights in every step function call. Use DeepSpeed"
                " ZeRO stage 1 or 2 (`strategy='deepspeed_stage_2'`), which keep whole weights on every rank, or DDP."
            )
        self._zero = (deepspeed_stage(trainer.strategy) or 0) > 0
        self._dyn = _find_dynamics(pl_module, self.dynamics)
        if self.k > self._dyn.state_size:
            raise MisconfigurationException(
                f"`k` must be at most the state size N = {self._dyn.state_size} of the recurrent dynamics, got {self.k}"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pretrained or self.pre_train_steps == 0:
            return
        self._record(trainer, pl_module, "initial")
        self._floss(trainer, pl_module, self.pre_train_steps)
        self.pretrained = True
        self._record(trainer, pl_module, "pre_train")

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.continuous or trainer.global_step % self.every_n_steps:  # type: ignore[operator]
            return
        grads = self._flossing_grads(trainer, pl_module)
        if grads is None:
            return
        if self._zero:
            # DeepSpeed ZeRO keeps the reduced gradients in its own buffers (`p.grad` is None here): add to them
            # through its per-parameter API (a collective; every rank has the same `grads`).
            params = [p for p, _ in grads]
            with torch.no_grad():
                training = full_grads(params)
                for t, (_, g) in zip(training, grads, strict=True):
                    t.add_(g.to(t.dtype))
                set_grads(params, training)
            return
        with torch.no_grad():
            for p, g in grads:
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_seen:  # once per optimizer step (gradient accumulation)
            return
        self._last_seen = step
        due_round = (
            not self.continuous
            and self.every_n_steps is not None
            and step % self.every_n_steps == 0
            and (self.max_rounds is None or self.rounds < self.max_rounds)
        )
        if due_round:
            self._floss(trainer, pl_module, self.floss_steps)
            self.rounds += 1
            self._record(trainer, pl_module, "round")
        elif (self.continuous and step % self.every_n_steps == 0) or (  # type: ignore[operator]
            self.measure_every_n_steps is not None and step % self.measure_every_n_steps == 0
        ):
            self._record(trainer, pl_module, "measure")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module, "end")
        if not self.plot:
            return
        log_dir = run_dir(trainer)  # every rank: broadcasts under DDP
        if trainer.is_global_zero and self.history:
            save_figure(trainer, self._figure(), log_dir, "lyapunov_spectrum.png", tag="lyapunov/spectrum")

    # ---------------------------------------------------------------- flossing
    def _spectrum(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        """Exponents ``(B, k)`` of fresh trajectories (differentiable when grad is enabled)."""
        assert self._dyn is not None
        gen = torch.Generator().manual_seed(tuple_hash_seed(self.seed, trainer.global_rank, self._draws, bits=31))
        self._draws += 1
        return flossing_spectrum(
            self._dyn, self.k, self.sequence_length, self.batch_size, self.warmup, gen, self.reorth_every,
            self.input_std, like=next(p for p in pl_module.parameters()),
        )  # fmt: skip

    def _loss(self, lam: Tensor) -> Tensor:
        return flossing_loss(lam, self.target, self.weight)

    def _flossing_grads(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[Tensor, Tensor]] | None:
        """``(parameter, rank-averaged gradient of the flossing loss)`` for every parameter the dynamics reach."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with torch.enable_grad(), _single_cpu_thread(params[0].device):  # small kernels: threads only cost
            loss = self._loss(self._spectrum(trainer, pl_module))
            if not self._nonfinite.finite_everywhere(trainer, loss):
                return None
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        if not reached:
            raise MisconfigurationException(
                "GradientFlossing: the flossing loss reaches no trainable parameter of the module; the step"
                " function must use the module's own parameters"
            )
        if trainer.world_size > 1:  # one all-reduce of the flattened gradients: replicas stay in sync
            flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for _, g in reached]), reduce_op="mean")
            grads_avg = flat.split([g.numel() for _, g in reached])
            reached = [(p, ga.view_as(g)) for (p, g), ga in zip(reached, grads_avg, strict=True)]
        return reached

    def _floss(self, trainer: Trainer, pl_module: LightningModule, steps: int) -> None:
        for _ in range(steps):
            reached = self._flossing_grads(trainer, pl_module)
            if reached is None:
                continue
            optimizer = self._flossing_optimizer([p for p, _ in reached])
            saved = [p.grad for p, _ in reached]  # the training gradients are left as found
            for p, g in reached:
                p.grad = g.to(p.dtype)
            optimizer.step()
            for (p, _), old in zip(reached, saved, strict=True):
                p.grad = old
            if self._zero:
                # DeepSpeed ZeRO steps its fp32 master copies and copies them back into the module after every
                # training step: the flossed weights must go into the masters too, or that copy undoes them.
                with torch.no_grad():
                    set_fp32_params([p for p, _ in reached], [p.detach() for p, _ in reached])

    def _flossing_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
            if self._optimizer_state is not None:
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        return self._optimizer

    def _record(self, trainer: Trainer, pl_module: LightningModule, phase: str) -> None:
        """Measure (no flossing), average over ranks, log and keep in the history."""
        with torch.no_grad():
            lam = self._spectrum(trainer, pl_module).mean(dim=0).double()  # (k,)
        if trainer.world_size > 1:
            lam = trainer.strategy.reduce(lam, reduce_op="mean")
        if not self._nonfinite.finite_everywhere(trainer, lam):
            return
        step = trainer.global_step
        self.history.append((step, phase, lam.tolist()))
        self.last_metrics = {
            "lyapunov/max": lam.max().item(),
            "lyapunov/mean": lam.mean().item(),
            "lyapunov/loss": self._loss(lam).item(),
        }
        log_to_loggers(trainer, self.last_metrics, step=step)

    def _figure(self) -> Any:
        fig, ax = new_figure()
        spectra = torch.tensor([lam for _, _, lam in self.history])  # (records, k)
        x = list(range(len(self.history)))
        k = spectra.shape[1]
        for i in range(k):
            ax.plot(x, spectra[:, i].tolist(), color=_colormap(i / max(k - 1, 1)), lw=1.0)
        ax.axhline(self.target, color="black", ls="--", lw=0.8, label=f"target {self.target:g}")
        every = max(1, len(x) // 12)  # at most about 12 labels
        ax.set_xticks(x[::every])
        ax.set_xticklabels([f"{s} {p}" for s, p, _ in self.history[::every]], fontsize=7, rotation=60, ha="right")
        ax.set_xlabel("training step / phase")
        ax.set_ylabel("Lyapunov exponent (per step)")
        ax.set_title(f"Lyapunov spectrum over training (k = {k}; first exponent dark)")
        ax.legend(loc="lower right", fontsize=8)
        return fig

    # ---------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [[s, p, list(lam)] for s, p, lam in self.history],
            "pretrained": self.pretrained,
            "rounds": self.rounds,
            "draws": self._draws,
            "last_seen": self._last_seen,
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), str(p), [float(v) for v in lam]) for s, p, lam in state_dict.get("history", [])]
        self.pretrained = bool(state_dict.get("pretrained", False))
        self.rounds = int(state_dict.get("rounds", 0))
        self._draws = int(state_dict.get("draws", 0))
        self._last_seen = int(state_dict.get("last_seen", -1))
        self._optimizer_state = state_dict.get("optimizer")
        self._optimizer = None


def _colormap(fraction: float) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["viridis"](fraction)
