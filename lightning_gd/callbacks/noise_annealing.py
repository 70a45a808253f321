"""Annealed gradient or weight noise, and perturbed gradient descent, as a Lightning callback.

* Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep Networks":
  ``g_t <- g_t + N(0, sigma_t^2)`` with the *variance* ``sigma_t^2 = eta / (1 + t)^gamma`` (the paper's
  definition; some implementations, e.g. ESPnet, use it as the standard deviation), ``eta`` in
  {0.01, 0.3, 1.0}, ``gamma = 0.55``.
* Zhou et al. 2019, "Towards Understanding the Importance of Noise in Training Neural Networks": noise on the
  weights, annealed in steps (their standard deviation shrinks by a factor per epoch).
* Jin et al. 2017, "How to Escape Saddle Points Efficiently": perturbed gradient descent adds a point drawn
  uniformly from the ball of radius ``r`` when ``||grad|| <= g_thres`` and no perturbation happened in the last
  ``t_thres`` steps.
* Adilova et al., "Introducing Noise in Decentralized Training of Neural Networks": independent noise on
  each replica of local SGD, between model averagings.

The schedule, the Gaussian noise and the ball kick are :mod:`lightning_gd.dynamics.noise`; this callback
decides when and where they apply, keeps ranks in step, logs and checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_gd._compat import ddp_comm_state, model_averager
from lightning_gd.callbacks._nonfinite import NonFiniteGuard
from lightning_gd.dynamics.noise import (
    DeviceGenerators,
    NoiseSchedule,
    add_gaussian_,
    noise_std,
    uniform_ball_,
    whole,
)
from lightning_gd.utils.checks import check_choice, check_number, check_positive_int
from lightning_gd.utils.deepspeed_state import (
    deepspeed_stage,
    full_fp32_params,
    full_grads,
    set_fp32_params,
    set_grads,
)
from lightning_gd.utils.logging import log_to_loggers
from lightning_gd.utils.rng import tuple_hash_seed

__all__ = ["NoiseAnnealing"]

Target = Literal["gradient", "weights"]


def _check_nonnegative(name: str, value: Any, positive: bool = False) -> float:
    return check_number(name, value, 0, low_open=positive, error=MisconfigurationException)


def _averages_models(trainer: Trainer) -> bool:
    """Whether replicas are averaged every few steps: Lightning's post-local-SGD model averager, or torch's
    ``PostLocalSGDOptimizer``."""
    from torch.distributed.optim import PostLocalSGDOptimizer

    if model_averager(trainer.strategy) is not None:
        return True
    return any(isinstance(opt, PostLocalSGDOptimizer) for opt in trainer.optimizers)


def _clip_norm_(params: list[Tensor], grads: list[Tensor], max_norm: float, zero: bool) -> None:
    """Rescale the gradients in place so that their joint 2-norm is at most ``max_norm`` (torch's arithmetic)."""
    if not zero:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    # DeepSpeed's gradients are tensors of their own, not `p.grad`: clip_grad_norm_'s two halves on them.
    total = torch.nn.utils.get_total_norm(grads)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))


def _local_sgd_start(trainer: Trainer) -> int:
    """The optimizer step at which local SGD starts (before it, replicas are kept equal by gradient all-reduce)."""
    state = ddp_comm_state(trainer.strategy)
    if state is not None and hasattr(state, "start_localSGD_iter"):
        return int(state.start_localSGD_iter)
    averagers = [getattr(opt, "averager", None) for opt in trainer.optimizers]
    return min((int(getattr(a, "warmup_steps", 0)) for a in averagers if a is not None), default=0)


class NoiseAnnealing(Callback):
    """Add annealed Gaussian noise to the gradients or the weights, and/or perturb at saddles (perturbed GD).

    At optimizer step ``t`` (``trainer.global_step``, the steps already taken) the noise has standard deviation
    ``sigma_t`` per entry, with

    * ``schedule="polynomial"`` (default for gradients, Neelakantan et al.): ``sigma_t^2 = eta / (1 + t)^gamma``;
    * ``schedule="step"`` (default for weights, Zhou et al.): ``sigma_t^2 = eta * gamma^(2 j)``, the standard
      deviation shrinking by ``gamma`` every period, ``j = t // decay_steps`` (or the epoch when
      ``decay_steps=None``); needs ``gamma <= 1``.

    ``target="gradient"`` adds ``N(0, sigma_t^2)`` to every ``.grad`` of the optimizer's parameters;
    ``target="weights"`` adds it to the parameters themselves (``w <- w + xi_t``, then the optimizer steps with
    the gradient taken at ``w``). With ``grad_norm_threshold`` set, perturbed GD (Jin et al.) also adds to the
    weights a point uniform in the ball of radius ``radius`` (over all the optimizer's parameters jointly)
    whenever the gradient norm is at most the threshold and no perturbation happened in the last
    ``perturb_interval`` steps; ``eta=0`` then gives pure perturbed GD.

    **Where in the step** (Lightning 2.x, ``Precision._after_closure`` / ``MixedPrecision.optimizer_step``):
    backward, DDP gradient all-reduce, AMP ``unscale_``, then the callbacks' ``on_before_optimizer_step`` (the
    noise is added here), the module's ``on_before_optimizer_step``, *then* Lightning's gradient clipping
    (``gradient_clip_val``), then ``optimizer.step()``. So Trainer clipping clips the noisy gradient. For the
    papers' order (clip, then noise) leave ``gradient_clip_val`` unset and pass ``clip_norm``: this callback then
    clips the gradient norm itself before adding noise (a warning says so when both are set).

    **Ranks and reproducibility.** The noise of step ``t`` comes from a generator seeded by
    ``(seed, t, optimizer index)``, so every DDP rank adds the same noise to the same (all-reduced) gradient and
    replicas stay identical; with ``per_rank=True`` the rank joins the seed and each replica draws its own
    noise from the step local SGD starts (``start_localSGD_iter``; before it replicas are plain DDP and get the
    shared noise). That only makes sense when replicas are averaged every few steps (local SGD: Lightning's
    ``DDPStrategy(ddp_comm_state=PostLocalSGDState(...), ddp_comm_hook=post_localSGD_hook,
    model_averaging_period=H)`` or torch's ``PostLocalSGDOptimizer``; anything else is refused at the start of
    fit). Lightning 2.x registers DDP comm hooks on CUDA only: on CPU (gloo) DDP keeps all-reducing the gradients
    and only the periodic model averaging runs, so per-rank noise is then what separates the replicas.

    **DeepSpeed ZeRO-1/2/3 and FSDP2.** DeepSpeed's optimizer steps flat fp32 partitions, not the module's
    parameters, and keeps the reduced gradients in its own buffers, where writing ``p.grad`` or ``p`` would change
    nothing. Under a ``DeepSpeedStrategy`` with ZeRO on, the callback reads and writes each parameter's whole
    gradient and fp32 master weight through DeepSpeed's per-parameter API (``deepspeed.utils.safe_get_full_grad``
    and friends: an all-reduce per parameter per step, on every rank). The noise is drawn in the module's parameter
    order, so a run matches the DDP run of the same seed bit for bit when the optimizer was given
    ``self.parameters()`` (tested on ZeRO-1, 2 and 3); with parameter groups in another order the noise has the
    same law but other draws. Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) each rank adds its shard
    of the whole noise (tested: DDP's weights); FSDP1's flat shards (``FSDPStrategy``) are refused at setup.

    This counter-based generator *is* the RNG state: the checkpoint holds the seed and the perturbation
    bookkeeping, and the step comes from the Trainer's own checkpointed ``global_step``, so a resumed run draws
    exactly the noise of an uninterrupted one. The global RNG is never consumed, and with ``eta=0`` (and no
    threshold) nothing is touched: the run is bit-identical to one without the callback.

    Logs ``noise/std`` (``sigma_t``) and ``noise/perturbations`` (the count so far) to the loggers every
    ``trainer.log_every_n_steps`` steps (``trainer.callback_metrics`` holds them every step). A non-finite
    gradient norm skips that step's perturbation decision (one warning).

    Args:
        eta: Initial noise variance (``>= 0``).
        gamma: Annealing exponent (``schedule="polynomial"``) or per-period factor of the standard deviation
            (``schedule="step"``, ``0 <= gamma <= 1``).
        target: ``"gradient"`` or ``"weights"``.
        schedule: ``"polynomial"`` or ``"step"``; ``None``: polynomial for gradients, step for weights.
        decay_steps: Period of the step schedule in optimizer steps (``None``: one epoch).
        grad_norm_threshold: Perturbed GD's ``g_thres`` (``None``: off).
        radius: Perturbed GD's ball radius ``r``.
        perturb_interval: Perturbed GD's ``t_thres``: steps after a perturbation before the next may happen.
        clip_norm: Clip the gradient norm to this value before adding gradient noise (``None``: no clipping).
        per_rank: Independent noise on each rank (local SGD only).
        seed: Seed of the noise.

    Example::

        trainer = L.Trainer(callbacks=[NoiseAnnealing(eta=0.3, gamma=0.55)])  # Neelakantan et al.
        trainer = L.Trainer(callbacks=[NoiseAnnealing(eta=0.0, grad_norm_threshold=1e-3, radius=0.1)])  # Jin et al.
    """

    def __init__(
        self,
        eta: float = 0.01,
        gamma: float = 0.55,
        target: Target = "gradient",
        schedule: NoiseSchedule | None = None,
        decay_steps: int | None = None,
        grad_norm_threshold: float | None = None,
        radius: float = 0.01,
        perturb_interval: int = 10,
        clip_norm: float | None = None,
        per_rank: bool = False,
        seed: int = 0,
    ) -> None:
        self.eta = _check_nonnegative("eta", eta)
        self.gamma = _check_nonnegative("gamma", gamma)
        check_choice("target", target, get_args(Target), error=MisconfigurationException)
        if schedule is None:
            schedule = "polynomial" if target == "gradient" else "step"
        check_choice("schedule", schedule, get_args(NoiseSchedule), error=MisconfigurationException)
        if schedule == "step" and self.gamma > 1:
            raise MisconfigurationException(f"`gamma` must be at most 1 with schedule='step', got {gamma!r}")
        if decay_steps is not None:
            check_positive_int("decay_steps", decay_steps, error=MisconfigurationException)
        self.grad_norm_threshold = (
            None if grad_norm_threshold is None else _check_nonnegative("grad_norm_threshold", grad_norm_threshold)
        )
        self.radius = _check_nonnegative("radius", radius, positive=True)
        check_positive_int("perturb_interval", perturb_interval, error=MisconfigurationException)
        self.clip_norm = None if clip_norm is None else _check_nonnegative("clip_norm", clip_norm, positive=True)
        if not isinstance(per_rank, bool):
            raise MisconfigurationException(f"`per_rank` must be a bool, got {per_rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"`seed` must be an integer, got {seed!r}")
        self.target: Target = target
        self.schedule: NoiseSchedule = schedule
        self.decay_steps = decay_steps
        self.perturb_interval = perturb_interval
        self.per_rank = per_rank
        self.seed = seed
        self.perturbations = 0
        self.last_perturbation: int | None = None  # step of the latest perturbed-GD perturbation
        self.last_std = 0.0
        self._start = 0  # first step of local SGD (per-rank noise before it would split plain-DDP replicas)
        self._nonfinite = NonFiniteGuard("NoiseAnnealing", "gradient norm", "no perturbation decided")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            eta=self.eta,
            gamma=self.gamma,
            target=self.target,
            seed=self.seed,
            per_rank=self.per_rank,
            grad_norm_threshold=self.grad_norm_threshold,
        )

    def std(self, step: int, epoch: int = 0) -> float:
        """``sigma_t``, the noise's standard deviation at optimizer step ``step`` (and epoch ``epoch``)."""
        period = epoch if self.decay_steps is None else step // self.decay_steps
        return noise_std(self.schedule, self.eta, self.gamma, step, period)

    # ---------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, FSDPStrategy):
            raise MisconfigurationException(
                "NoiseAnnealing does not support FSDPStrategy (FSDP1): its optimizer holds flat shards of the"
                " parameters, where the noise would not match any layout. Use ModelParallelStrategy with"
                " `fully_shard` (FSDP2, supported), DDP, or DeepSpeed ZeRO-1/2/3."
            )
        if stage == "fit" and self.clip_norm is not None and trainer.gradient_clip_val:
            rank_zero_warn(
                "NoiseAnnealing(clip_norm=...) with the Trainer's gradient_clip_val: Lightning clips after this"
                " callback adds the noise, so the noisy gradient is clipped again; set only one of them."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = _local_sgd_start(trainer) if self.per_rank else 0
        if self.per_rank and not _averages_models(trainer):
            raise MisconfigurationException(
                "NoiseAnnealing(per_rank=True) needs a strategy that averages models every few steps (local SGD):"
                " DDPStrategy(ddp_comm_state=PostLocalSGDState(...), ddp_comm_hook=post_localSGD_hook,"
                f" model_averaging_period=H) or torch's PostLocalSGDOptimizer; got {type(trainer.strategy).__name__}"
                " without model averaging, where per-rank noise would make the replicas drift apart"
            )

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        std = self.std(step, trainer.current_epoch)
        self.last_std = std
        if std > 0 or self.clip_norm is not None or self.grad_norm_threshold is not None:
            self._apply(trainer, pl_module, optimizer, step, std)
        metrics = {"noise/std": std, "noise/perturbations": float(self.perturbations)}
        if step % max(trainer.log_every_n_steps, 1) == 0:
            log_to_loggers(trainer, metrics, step=step)
        else:  # current values for other callbacks (progress bar, early stopping); loggers every log_every_n_steps
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _apply(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer, step: int, std: float
    ) -> None:
        """Clip, decide the perturbation, add the noise and the perturbation, on the gradients and weights the
        optimizer step will use."""
        zero = (deepspeed_stage(trainer.strategy) or 0) > 0
        if zero:
            # DeepSpeed's optimizer holds flat fp32 partitions, not the module's parameters, and the reduced
            # gradients live in its buffers: read and write them per module parameter through DeepSpeed's API
            # (collectives: every rank, same parameters, same order). The noise is drawn in the module's parameter
            # order, which is the optimizer's when it was given `self.parameters()`.
            params = [p for p in pl_module.parameters() if p.requires_grad]
            grads = full_grads(params)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
        if not params:
            return
        opt_idx = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        # Per-rank noise only once local SGD runs: in its warm-up replicas are plain DDP and must stay equal.
        rank = trainer.global_rank if self.per_rank and step >= self._start else 0
        with torch.no_grad():
            if self.clip_norm is not None:
                _clip_norm_(params, grads, self.clip_norm, zero)
            perturb = self._perturb_due(trainer, grads, step)
            weights = None
            if self.target == "weights" or perturb:
                weights = full_fp32_params(params) if zero else params
            if std > 0:
                noisy = grads if self.target == "gradient" else weights
                add_gaussian_(noisy, std, DeviceGenerators(tuple_hash_seed(self.seed, step, opt_idx, rank, 0)))
            if perturb:
                uniform_ball_(
                    weights, self.radius, DeviceGenerators(tuple_hash_seed(self.seed, step, opt_idx, rank, 1))
                )
                self.perturbations += 1
                self.last_perturbation = step
            if zero:
                set_grads(params, grads)
                if weights is not None:
                    set_fp32_params(params, weights)

    # ---------------------------------------------------------------- perturbed GD
    def _perturb_due(self, trainer: Trainer, grads: list[Tensor], step: int) -> bool:
        if self.grad_norm_threshold is None:
            return False
        if self.last_perturbation is not None and step - self.last_perturbation < self.perturb_interval:
            return False
        norm = torch.linalg.vector_norm(torch.stack([whole(torch.linalg.vector_norm(g.double())) for g in grads]))
        finite = bool(torch.isfinite(norm))
        due = finite and norm.item() <= self.grad_norm_threshold
        if trainer.world_size > 1 and not self.per_rank:  # one decision, or replicas drift apart
            due = bool(trainer.strategy.broadcast(due, src=0))
            finite = bool(trainer.strategy.broadcast(finite, src=0))
        if not finite:
            self._nonfinite.warn(step)
        return due

    # ---------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        # The noise generator is counter-based (seeded by seed, step, optimizer and rank): these numbers are
        # its whole state, so a resumed run draws what an uninterrupted one would.
        return {
            "seed": self.seed,
            "perturbations": self.perturbations,
            "last_perturbation": self.last_perturbation,
            "last_std": self.last_std,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self.perturbations = int(state_dict.get("perturbations", 0))
        last = state_dict.get("last_perturbation")
        self.last_perturbation = None if last is None else int(last)
        self.last_std = float(state_dict.get("last_std", 0.0))
