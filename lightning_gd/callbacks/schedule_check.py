"""Say which learning-rate schedule length a resumed run follows when its length changed."""

from __future__ import annotations

from typing import Literal, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_gd.optim.warmup_decay import WarmupDecayLR
from lightning_gd.utils.checks import check_choice

__all__ = ["ScheduleLengthCheck"]

ScheduleLength = Literal["checkpoint", "this_run"]


class ScheduleLengthCheck(Callback):
    """On resume, compare each :class:`~lightning_gd.optim.WarmupDecayLR`'s length in the checkpoint with the
    length this run computed (``max_steps`` or the data changed); when they differ, warn once naming both, the
    one followed and how to choose the other.

    A scheduler's ``load_state_dict`` takes every attribute from the checkpoint, ``total_steps`` included, so a
    run resumed with a larger ``max_steps`` silently keeps the old schedule (its lr stays at the floor after the
    old end). ``use="this_run"`` stretches the schedule to this run's length from the resumed step on (the lr
    jumps to the new schedule's value there). The ``lightning-gd`` command adds this callback to every ``fit``
    (``--resume_schedule checkpoint | this_run``).

    Args:
        use: ``"checkpoint"`` keeps the checkpoint's length (an exact continuation of the stopped run);
            ``"this_run"`` follows the length this run computed.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(max_steps=2000, callbacks=[ScheduleLengthCheck(use="this_run")])
        >>> # trainer.fit(model, ckpt_path="run_to_1000_steps.ckpt"): the schedule stretches to 2000 steps
    """

    def __init__(self, use: ScheduleLength = "checkpoint") -> None:
        check_choice("use", use, get_args(ScheduleLength), error=MisconfigurationException)
        self.use = use
        self._built: dict[int, int] = {}

    def _schedulers(self, trainer: Trainer) -> list[WarmupDecayLR]:
        return [c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, WarmupDecayLR)]

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_optimizers, before the checkpoint's scheduler state is loaded: this run's own lengths.
        self._built = {id(s): s.total_steps for s in self._schedulers(trainer) if s.total_steps is not None}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for scheduler in self._schedulers(trainer):
            built, saved = self._built.get(id(scheduler)), scheduler.total_steps
            if built is None or saved is None or built == saved:
                continue
            step = scheduler.last_epoch
            old_lr, new_lr = (scheduler.base_lrs[0] * _factor(scheduler, n, step) for n in (saved, built))
            if self.use == "this_run":
                scheduler.set_total_steps(built)
                rank_zero_warn(
                    f"ScheduleLengthCheck: the checkpoint's learning-rate schedule is {saved} steps long and this run's"
                    f" is {built}: following this run's {built} steps (resume_schedule='this_run'); the lr moves from"
                    f" {old_lr:.3g} to {new_lr:.3g} at step {step}. `--resume_schedule checkpoint` keeps the"
                    f" checkpoint's {saved} steps instead."
                )
            else:
                rank_zero_warn(
                    f"ScheduleLengthCheck: the checkpoint's learning-rate schedule is {saved} steps long and this run's"
                    f" (max_steps or the data changed) would be {built}: following the checkpoint's {saved} steps"
                    f" (lr {old_lr:.3g} now), as the stopped run would have. `--resume_schedule this_run`"
                    f" (ScheduleLengthCheck(use='this_run')) follows {built} steps instead (lr {new_lr:.3g} now)."
                )


def _factor(scheduler: WarmupDecayLR, total_steps: int, step: int) -> float:
    """The lr factor at ``step`` of ``scheduler``'s shape with ``total_steps``, leaving the scheduler unchanged."""
    saved = scheduler.total_steps
    scheduler.total_steps = total_steps
    try:
        return scheduler.lr_factor(max(0, step))
    finally:
        scheduler.total_steps = saved
