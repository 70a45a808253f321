"""A base DataModule whose map-style training data resumes exactly from a mid-epoch checkpoint.

Three things make a resumed run read, augment and drop out exactly as the uninterrupted one:

- **Position.** The training loader is a torchdata ``StatefulDataLoader``; Lightning saves its position in every
  checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it on resume.
- **Order and augmentation.** The order is a seeded ``DistributedSampler`` (a function of ``seed`` and the epoch
  only), and with ``per_sample_seed=True`` every sample is read under RNGs seeded by ``(seed, epoch, index)``
  (:func:`~lightning_gd.utils.rng.seeded_rngs`): random crops and flips do not depend on the global RNG, on the
  worker count or on the world size, and do not disturb the global streams that dropout uses.
- **Global RNGs.** The data module's checkpoint entry holds every rank's global RNG states, put back just
  before the first training batch after the resume.

Subclasses build their loaders with :meth:`ResumableDataModule.resumable_loader` and
:meth:`ResumableDataModule.evaluation_loader` and name what a saved position refers to in
:meth:`ResumableDataModule.position_settings`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from lightning_gd.utils.checks import check_choice
from lightning_gd.utils.rng import gather_rng_states, seeded_rngs, set_rng_states

__all__ = ["ResumableDataModule"]

_STATE_VERSION = 1


class _EpochSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` that yields ``(epoch, index)``, so a sample knows its epoch in any process."""

    @override
    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class _SeededSamples(Dataset):
    """``dataset[index]`` read under RNGs seeded by ``(seed, epoch, index)``: augmentation is a function of the key."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        # In a worker process nothing else reads the global streams: seed them, but skip saving and restoring.
        with seeded_rngs(self.seed, epoch, index, restore=get_worker_info() is None):
            return self.dataset[index]


def _loader_position(state: dict[str, Any]) -> tuple[int, int, int]:
    """``(samples, batches, num_workers)`` of a ``StatefulDataLoader`` state, single- or multi-process."""
    if "_snapshot" in state:
        main = state["_snapshot"]["_main_snapshot"]
        return (
            int(main["_sampler_iter_state"]["samples_yielded"]),
            int(main["_sampler_iter_yielded"]),
            int(main["_num_workers"]),
        )
    return int(state["_sampler_iter_state"]["samples_yielded"]), int(state["_num_yielded"]), 0


def _at_position(template: dict[str, Any], samples: int, batches: int, num_workers: int) -> dict[str, Any]:
    """A fresh loader's state moved to ``samples``/``batches``: valid for a stateless sampler and dataset."""
    state = copy.deepcopy(template)
    if "_snapshot" in state:
        snapshot = state["_snapshot"]
        main = snapshot["_main_snapshot"]
        snapshot["_snapshot_step"] = batches
        snapshot["_last_yielded_worker_id"] = (batches - 1) % num_workers  # in-order: the next is batches % w
        main["_sampler_iter_state"]["samples_yielded"] = samples
        main["_sampler_iter_yielded"] = batches
    else:
        state["_sampler_iter_state"]["samples_yielded"] = samples
        state["_sampler_iter_yielded"] = state["_num_yielded"] = batches
    return state


class _ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose saved position also loads under another worker count or world size.

    Same worker count and world size: torchdata restores its own state unchanged. Otherwise the position
    (samples read in this epoch) is carried over to the other layout, which is exact for a different worker
    count because the sampler and the dataset are stateless (the order depends on seed and epoch only).
    ``resume_plan`` is set by :class:`ResumableDataModule` from its checkpoint entry.
    """

    resume_plan: dict[str, Any] | None = None
    position_loaded: bool = False

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        samples, batches, num_workers = _loader_position(state_dict)
        if num_workers == self.num_workers and not self._world_changed() and not self._restarting():
            self.position_loaded = True
            super().load_state_dict(state_dict)
            return
        self._move_to(samples, batches)

    def seek(self, batches: int) -> int:
        """Start the next epoch iterator after ``batches`` batches without reading them; returns the batches skipped.

        For wrappers that save their own position (``ConAdvStrategy``'s look-ahead) instead of this loader's.
        """
        return self._move_to(batches * (self.batch_size or 1), batches)

    def _world_changed(self) -> bool:
        old, new = (self.resume_plan or {}).get("world_size", (1, 1))
        return old != new

    def _restarting(self) -> bool:
        return bool((self.resume_plan or {}).get("restart_epoch"))

    def _move_to(self, samples: int, batches: int) -> int:
        self.position_loaded = True
        if self._restarting():
            return 0  # the data settings changed: the epoch's data starts from its beginning
        old_world, new_world = (self.resume_plan or {}).get("world_size", (1, 1))
        if old_world != new_world:  # the same share of the epoch, re-partitioned over the new ranks
            samples = samples * old_world // new_world
            batches = samples // (self.batch_size or 1)
        template = self.state_dict()  # a fresh iterator's state in this loader's own layout
        super().load_state_dict(_at_position(template, samples, batches, self.num_workers))
        return batches


class ResumableDataModule(LightningDataModule):
    """Base of the data modules whose training data resumes bit-identically from a mid-epoch checkpoint.

    A subclass builds its training loader with :meth:`resumable_loader`, its validation loaders with
    :meth:`evaluation_loader`, and returns from :meth:`position_settings` the settings that decide which
    samples make up an epoch and in which order (batch size, seed, dataset size, ...). On resume:

    - same settings, world size and worker count: the run continues bit-identically;
    - another ``num_workers``: the position carries over exactly (one info message);
    - another world size: the rest of the epoch is re-partitioned over the ranks, with one warning (the run
      continues from the same point of the epoch, not bit-identically);
    - other settings: an error naming them, or with ``resume_mismatch="warn"`` one warning and the epoch's data
      restarts from its beginning;
    - a checkpoint without a loader position (written before the loaders were resumable): one warning, and the
      epoch's data restarts from its beginning.

    Subclasses that override :meth:`on_before_batch_transfer` call this class's first.

    Args:
        resume_mismatch: What a checkpoint saved with other data settings does: ``"error"`` raises,
            ``"warn"`` warns and starts the epoch's data from its beginning.

    Example::

        class MyData(ResumableDataModule):
            def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
                super().__init__()
                self.batch_size, self.seed = batch_size, seed

            def position_settings(self) -> dict[str, Any]:
                return {"batch_size": self.batch_size, "seed": self.seed, "samples": 1000}

            def train_dataloader(self) -> DataLoader:
                return self.resumable_loader(MyDataset(1000), self.batch_size, self.seed, per_sample_seed=True)
    """

    def __init__(self, resume_mismatch: Literal["error", "warn"] = "error") -> None:
        super().__init__()
        check_choice("resume_mismatch", resume_mismatch, ("error", "warn"), error=MisconfigurationException)
        self.resume_mismatch = resume_mismatch
        self._resume_plan: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._train_loader: _ResumableLoader | None = None
        self._check_position = False
        self._num_workers = 0

    def position_settings(self) -> dict[str, Any]:
        """The settings a saved data position refers to (plain values); checked on resume."""
        raise NotImplementedError(f"{type(self).__name__} must implement position_settings()")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def resumable_loader(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        per_sample_seed: bool = False,
        **loader_kwargs: Any,
    ) -> StatefulDataLoader:
        """The training loader: a seeded ``DistributedSampler`` (one replica per rank) and a ``StatefulDataLoader``.

        Args:
            dataset: A map-style dataset.
            batch_size: Per device.
            seed: Seed of the order (and of the per-sample augmentation RNGs).
            num_workers: Loader worker processes.
            per_sample_seed: Read every sample under RNGs seeded by ``(seed, epoch, index)``; for datasets that
                augment with the global RNGs (torchvision and timm transforms).
            loader_kwargs: Further ``DataLoader`` arguments (``pin_memory``, ``persistent_workers``, ...).
        """
        world_size, rank = self._world()
        sampler_class = _EpochSampler if per_sample_seed else DistributedSampler
        if per_sample_seed:
            dataset = _SeededSamples(dataset, seed)
        # Seeded by `seed` and the epoch (Lightning calls set_epoch), never by the global RNG; one replica per
        # rank, so Lightning keeps this sampler under DDP instead of injecting its own.
        sampler = sampler_class(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        # A resumed run creates its iterator (and so draws this permutation) before Lightning calls set_epoch:
        # start at the restored epoch, or a run resumed in epoch 1 or later would read epoch 0's order.
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = _ResumableLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=num_workers,
                drop_last=True,
                generator=torch.Generator().manual_seed(seed),  # worker seeds: not from the global RNG either
                **loader_kwargs,
            )
        loader.resume_plan = self._resume_plan
        self._train_loader = loader
        self._num_workers = num_workers
        self._check_position = self.trainer is not None and self.trainer.ckpt_path is not None
        return loader

    @staticmethod
    def evaluation_loader(
        dataset: Any, batch_size: int, seed: int, num_workers: int = 0, **loader_kwargs: Any
    ) -> DataLoader:
        """An unshuffled loader with its own generator: a validation run draws nothing from the global RNG."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
            **loader_kwargs,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Data settings, world size, workers, and every rank's global RNG states (a collective under DDP)."""
        world_size, _ = self._world()
        rng = gather_rng_states(world_size)
        return {"version": _STATE_VERSION, "settings": self.position_settings(), "world_size": world_size,
                "num_workers": self._num_workers, "rng": rng}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the saved data settings against this run's and plan the resume (see the class docstring)."""
        name = type(self).__name__
        saved, current = state_dict.get("settings", {}), self.position_settings()
        changed = [f"{k}={saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
        world_size, rank = self._world()
        old_world = int(state_dict.get("world_size", 1))
        plan: dict[str, Any] = {"world_size": (old_world, world_size)}
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
            plan["restart_epoch"] = True
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
                f" {state_dict['num_workers']}); the data position carries over exactly."
            )
        rng = state_dict.get("rng") or []
        self._pending_rng = rng[rank] if rank < len(rng) else (rng[0] if rng else None)
        self._resume_plan = plan
        if self._train_loader is not None:
            self._train_loader.resume_plan = plan

    def _current_workers(self) -> int:
        return int(getattr(self, "num_workers", self._num_workers))

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
        restarted = self._resume_plan is not None and self._resume_plan.get("restart_epoch")
        if loader is None or loader.position_loaded or not mid_epoch or restarted:
            return
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint {trainer.ckpt_path!r} holds no data-loader position (it was"
            f" written before the loaders were resumable): the data of epoch {trainer.current_epoch} restarts at"
            " the beginning of the epoch, so the resumed run reads other batches than an uninterrupted run."
        )
