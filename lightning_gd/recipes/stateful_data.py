"""The loader-independent half of exact data resume: settings check, ``resume_mismatch``, every rank's RNG states.

Both resumable data modules inherit it: :class:`~lightning_gd.recipes.resumable.ResumableDataModule` (map-style
data, torchdata ``StatefulDataLoader``) and :class:`~lightning_gd.recipes.token_stream.TokenStreamDataModule`
(litdata streaming). The loaders keep their own position in the checkpoint (Lightning stores it); this base
stores, in the data module's checkpoint entry, what that position refers to and the global RNG states that
dropout draws from, and applies one rule on resume:

- same settings and world size: the loader continues from its position and the RNGs are put back just
  before the first resumed training batch (bit-identical);
- another world size: one warning; the loader continues from the same point of the epoch, not bit-identically;
- other settings (:meth:`StatefulDataModule.position_settings`): an error naming each difference, or with
  ``resume_mismatch="warn"`` one warning, and the epoch's data restarts from its beginning;
- a checkpoint holding no loader position: one warning, and the epoch's data restarts from its beginning.

A loader taking part registers through :meth:`StatefulDataModule.track_train_loader` and follows the
:class:`PlannedLoader` protocol: it reads the :class:`ResumePlan` before it restores a position and says
whether it restored one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_gd.utils.checks import check_choice
from lightning_gd.utils.rng import gather_rng_states, set_rng_states

__all__ = ["PlannedLoader", "ResumeMismatch", "ResumePlan", "StatefulDataModule"]

ResumeMismatch = Literal["error", "warn"]
_STATE_VERSION = 1


@dataclass(frozen=True)
class ResumePlan:
    """What a training loader does with the position it is given on resume.

    Attributes:
        world_size: ``(saved, current)`` world sizes; different values re-partition the rest of the epoch.
        restart_epoch: The data settings changed (``resume_mismatch="warn"``): ignore the saved position and
            start the epoch's data from its beginning.
    """

    world_size: tuple[int, int] = (1, 1)
    restart_epoch: bool = False


class PlannedLoader(Protocol):
    """A training loader that follows a :class:`ResumePlan` and says whether it restored a saved position."""

    resume_plan: ResumePlan | None
    position_loaded: bool


class StatefulDataModule(LightningDataModule):
    """Base of the data modules whose checkpoint entry holds their data settings and every rank's RNG states.

    A subclass returns from :meth:`position_settings` the settings a saved loader position refers to (plain
    values: batch size, seed, dataset, ...) and passes its training loader, a :class:`PlannedLoader`, through
    :meth:`track_train_loader`. See the module docstring for the rule applied on resume. Subclasses that
    override :meth:`on_before_batch_transfer` call this class's first.

    Args:
        resume_mismatch: What a checkpoint saved with other data settings does: ``"error"`` raises,
            ``"warn"`` warns and starts the epoch's data from its beginning.

    Example::

        # not run: a template: MyPlannedLoader stands for your loader
        class MyStream(StatefulDataModule):
            def position_settings(self) -> dict[str, Any]:
                return {"batch_size": 8, "seed": 0, "data": "s3://bucket/train"}

            def train_dataloader(self) -> Any:
                return self.track_train_loader(MyPlannedLoader(...))
    """

    #: What a change of ``num_workers`` does to the position (said in the info message on resume).
    workers_change_note = "the data position carries over exactly"

    def __init__(self, resume_mismatch: ResumeMismatch = "error") -> None:
        super().__init__()
        check_choice("resume_mismatch", resume_mismatch, get_args(ResumeMismatch), error=MisconfigurationException)
        self.resume_mismatch = resume_mismatch
        self._resume_plan: ResumePlan | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._train_loader: PlannedLoader | None = None
        self._check_position = False

    def position_settings(self) -> dict[str, Any]:
        """The settings a saved data position refers to (plain values); checked on resume."""
        raise NotImplementedError(f"{type(self).__name__} must implement position_settings()")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _current_workers(self) -> int:
        return int(getattr(self, "num_workers", 0))

    def track_train_loader(self, loader: Any) -> Any:
        """Hand ``loader`` the resume plan (now, or when the checkpoint entry loads later) and return it."""
        loader.resume_plan = self._resume_plan
        self._train_loader = loader
        self._check_position = self.trainer is not None and self.trainer.ckpt_path is not None
        return loader

    @override
    def state_dict(self) -> dict[str, Any]:
        """Data settings, world size, workers, and every rank's global RNG states (a collective under DDP)."""
        world_size, _ = self._world()
        rng = gather_rng_states(world_size)
        return {"version": _STATE_VERSION, "settings": self.position_settings(), "world_size": world_size,
                "num_workers": self._current_workers(), "rng": rng}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the saved data settings against this run's and plan the resume (see the module docstring)."""
        name = type(self).__name__
        saved, current = state_dict.get("settings", {}), self.position_settings()
        changed = [f"{k}={saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
        world_size, rank = self._world()
        # An entry without a world size (TokenStreamDataModule before this base) was saved at this one.
        old_world = int(state_dict.get("world_size", world_size))
        restart = False
        if changed:
            message = (
                f"{name}: the checkpoint's data position was saved with other data settings"
                f" ({', '.join(changed)}; checkpoint -> this run), e.g. a checkpoint of another recipe"
            )
            if self.resume_mismatch == "error":
                raise MisconfigurationException(
                    message + ". Resume with the same data settings, or pass `resume_mismatch='warn'` to continue"
                    " with the new ones from the beginning of the epoch's data."
                )
            rank_zero_warn(message + ": the epoch's data restarts from its beginning.")
            restart = True
        elif old_world != world_size:
            rank_zero_warn(
                f"{name}: resuming a checkpoint saved at world size {old_world} on world size {world_size}: the rest"
                " of the epoch is re-partitioned over the ranks and ranks without a saved RNG state take rank 0's,"
                " so the run continues from the same point of the epoch but not bit-identically to an"
                " uninterrupted run."
            )
        elif "num_workers" in state_dict and int(state_dict["num_workers"]) != self._current_workers():
            rank_zero_info(
                f"{name}: resuming with num_workers={self._current_workers()} (checkpoint:"
                f" {state_dict['num_workers']}); {self.workers_change_note}."
            )
        rng = state_dict.get("rng") or []
        self._pending_rng = rng[rank] if rank < len(rng) else (rng[0] if rng else None)
        self._resume_plan = ResumePlan((old_world, world_size), restart)
        if self._train_loader is not None:
            self._train_loader.resume_plan = self._resume_plan

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if self._pending_rng is not None:  # the RNG as the uninterrupted run had it before this step
                set_rng_states(self._pending_rng)
                self._pending_rng = None
            if self._check_position:
                self._check_position = False
                self._warn_if_position_lost(trainer)
        return batch

    def _warn_if_position_lost(self, trainer: Any) -> None:
        loader = self._train_loader
        # Lightning's own test: a checkpoint is mid-epoch when its step count is not a whole number of epochs.
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        mid_epoch = per_epoch > 0 and trainer.global_step % per_epoch != 0
        restarted = self._resume_plan is not None and self._resume_plan.restart_epoch
        if loader is None or loader.position_loaded or not mid_epoch or restarted:
            return
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint {trainer.ckpt_path!r} holds no data-loader position (it was"
            f" written before the loaders were resumable): the data of epoch {trainer.current_epoch} restarts at"
            " the beginning of the epoch, so the resumed run reads other batches than an uninterrupted run."
        )
