"""A base DataModule whose map-style training data resumes exactly from a mid-epoch checkpoint.

Three things make a resumed run read, augment and drop out exactly as the uninterrupted one:

- **Position.** The training loader is a torchdata ``StatefulDataLoader``; Lightning saves its state in every
  checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it on resume. The position in it is our
  sampler's own count of the samples read in the epoch, so it carries over to another worker count or world size
  without touching torchdata's internal counters.
- **Order and augmentation.** The order is a seeded ``DistributedSampler`` (a function of ``seed`` and the epoch
  only), and with ``per_sample_seed=True`` every sample is read under RNGs seeded by ``(seed, epoch, index)``
  (:func:`~lightning_gd.utils.rng.seeded_rngs`): random crops and flips do not depend on the global RNG, on the
  worker count or on the world size, and do not disturb the global streams that dropout uses.
- **Global RNGs.** The data module's checkpoint entry holds every rank's global RNG states, put back just
  before the first training batch after the resume, and the data settings checked on resume
  (:class:`~lightning_gd.recipes.stateful_data.StatefulDataModule`, shared with the streaming data module).

Subclasses build their loaders with :meth:`ResumableDataModule.resumable_loader` and
:meth:`ResumableDataModule.evaluation_loader` and name what a saved position refers to in
:meth:`ResumableDataModule.position_settings`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from lightning_gd._compat import torchdata_samples_read
from lightning_gd.recipes.stateful_data import ResumeMismatch, ResumePlan, StatefulDataModule
from lightning_gd.utils.rng import seeded_rngs

__all__ = ["ResumableDataModule"]


_POSITION = "lightning_gd_samples_read"  # our sampler's key inside torchdata's loader state


class _PositionSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` that owns the loader's position: the samples it has yielded this epoch.

    torchdata's ``StatefulDataLoader`` saves a sampler that has ``state_dict`` / ``load_state_dict`` with the batch
    it belongs to (also through its worker snapshots), so the position in a checkpoint is this plain count, not
    torchdata's internal counters. ``resume_at(samples)`` makes the next epoch iterator skip that many samples
    without reading them (the order is a function of ``seed`` and the epoch only). ``keyed=True`` yields
    ``(epoch, index)``, so that a sample knows its epoch in any process.
    """

    def __init__(self, *args: Any, keyed: bool = False, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keyed, self.num_workers = keyed, num_workers
        self.read = 0
        self._start = 0

    @override
    def __iter__(self) -> Iterator[Any]:
        # A generator: the body (and so taking the start) runs at the first draw, not at iter(). torchdata calls
        # iter() twice while it restores a state and only draws from the second iterator.
        epoch, start = self.epoch, self._start
        self._start, self.read = 0, start
        for index in itertools.islice(super().__iter__(), start, None):
            self.read += 1
            yield (epoch, index) if self.keyed else index

    def resume_at(self, samples: int) -> None:
        """Start the next iterator after ``samples`` samples of the epoch."""
        self._start = samples

    def state_dict(self) -> dict[str, int]:
        return {_POSITION: self.read, "num_workers": self.num_workers, "num_replicas": self.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at(int(state_dict[_POSITION]))


def _saved_position(state: Any) -> dict[str, int] | None:
    """Our sampler's entry anywhere in a ``StatefulDataLoader`` state (``None`` in states written before it)."""
    if isinstance(state, dict):
        if _POSITION in state:
            return state
        found = (_saved_position(v) for v in state.values())
        return next((f for f in found if f is not None), None)
    return None


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


class _ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose saved position also loads under another worker count or world size.

    Same worker count and world size: torchdata restores its own state unchanged (bit-identical, worker seeds
    included). Otherwise the position (the samples of the epoch the :class:`_PositionSampler` had yielded) starts
    a fresh iterator after those samples, which is exact for a different worker count because the sampler and
    the dataset are stateless (the order depends on seed and epoch only). ``resume_plan`` is set by
    :class:`ResumableDataModule` from its checkpoint entry.
    """

    resume_plan: ResumePlan | None = None
    position_loaded: bool = False
    sampler: _PositionSampler

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position_loaded = True
        plan = self.resume_plan or ResumePlan()
        saved = _saved_position(state_dict)
        if saved is None:  # written before the position sampler: torchdata's own count (the same order)
            self._start_at(torchdata_samples_read(state_dict), plan.world_size[0])
            return
        layout = (int(saved["num_workers"]), int(saved["num_replicas"]))
        if layout == (self.num_workers, self.sampler.num_replicas) and not plan.restart_epoch:
            super().load_state_dict(state_dict)
            return
        self._start_at(int(saved[_POSITION]), layout[1])

    def seek(self, batches: int) -> int:
        """Start the next epoch iterator after ``batches`` batches without reading them; returns the batches skipped.

        For wrappers that save their own position (``ConAdvStrategy``'s look-ahead) instead of this loader's.
        """
        plan = self.resume_plan or ResumePlan()
        return self._start_at(batches * (self.batch_size or 1), plan.world_size[0])

    def _start_at(self, samples: int, saved_world: int) -> int:
        """Start the next iterator after ``samples`` of the epoch read at world size ``saved_world``."""
        if (self.resume_plan or ResumePlan()).restart_epoch:
            samples = 0  # the data settings changed: the epoch's data starts from its beginning
        world = self.sampler.num_replicas
        if saved_world != world:  # the same share of the epoch, re-partitioned over the new ranks
            samples = samples * saved_world // world
        self.sampler.resume_at(samples)
        super().load_state_dict({})  # drop any iterator: the next one starts fresh, after `samples`
        return samples // (self.batch_size or 1)


class ResumableDataModule(StatefulDataModule):
    """Base of the data modules whose map-style training data resumes bit-identically from a mid-epoch checkpoint.

    A subclass builds its training loader with :meth:`resumable_loader`, its validation loaders with
    :meth:`evaluation_loader`, and returns from :meth:`position_settings` the settings that decide which
    samples make up an epoch and in which order (batch size, seed, dataset size, ...). The settings check, the
    RNG states and the rule on resume are :class:`~lightning_gd.recipes.stateful_data.StatefulDataModule`'s:

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

        # not run: a template: MyDataset stands for your map-style dataset
        class MyData(ResumableDataModule):
            def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
                super().__init__()
                self.batch_size, self.seed = batch_size, seed

            def position_settings(self) -> dict[str, Any]:
                return {"batch_size": self.batch_size, "seed": self.seed, "samples": 1000}

            def train_dataloader(self) -> DataLoader:
                return self.resumable_loader(MyDataset(1000), self.batch_size, self.seed, per_sample_seed=True)
    """

    def __init__(self, resume_mismatch: ResumeMismatch = "error") -> None:
        super().__init__(resume_mismatch)
        self._num_workers = 0

    @override
    def _current_workers(self) -> int:
        return int(getattr(self, "num_workers", self._num_workers))

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
        if per_sample_seed:
            dataset = _SeededSamples(dataset, seed)
        # Seeded by `seed` and the epoch (Lightning calls set_epoch), never by the global RNG; one replica per
        # rank, so Lightning keeps this sampler under DDP instead of injecting its own.
        sampler = _PositionSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True,
            keyed=per_sample_seed, num_workers=num_workers,
        )  # fmt: skip
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
        self._num_workers = num_workers
        return self.track_train_loader(loader)

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
