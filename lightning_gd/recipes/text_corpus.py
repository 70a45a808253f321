"""Byte-level text corpus data module; by default the running interpreter's own standard library.

With no ``data_dir`` the corpus is every ``.py`` file of the Python standard library (the ``stdlib`` path
of :mod:`sysconfig`, site-packages excluded): about 30 MB of real text on any machine, with no download.

The training loader is a torchdata ``StatefulDataLoader``: Lightning saves its position in every checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and restores it on resume, so a run resumed mid-epoch reads
exactly the batches the uninterrupted run would have read. The data module's own checkpoint entry holds the
global RNG states of every rank and the data settings the position refers to.
"""

from __future__ import annotations

import copy
import math
import sysconfig
import warnings
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from lightning_gd.utils.checks import check_choice, check_positive_int
from lightning_gd.utils.rng import gather_rng_states, set_rng_states

__all__ = ["TextCorpusDataModule"]

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_STATE_VERSION = 1
# Settings that decide which windows make up an epoch and in which order: a saved data position only means
# something for the same values.
_POSITION_KEYS = ("seq_len", "batch_size", "seed", "train_windows", "corpus")


class _RandomWindows(Dataset):
    """``num_windows`` fixed windows of ``seq_len + 1`` bytes at seeded random offsets of ``data``."""

    def __init__(self, data: Tensor, seq_len: int, num_windows: int, seed: int) -> None:
        self.data, self.seq_len = data, seq_len
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - seq_len, (num_windows,), generator=gen)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = int(self.starts[i])
        chunk = self.data[s : s + self.seq_len + 1].long()  # (T + 1,)
        return chunk[:-1], chunk[1:]  # inputs and next-byte targets, (T,) each


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
    ``resume_plan`` is set by :class:`TextCorpusDataModule` from its checkpoint entry.
    """

    resume_plan: dict[str, Any] | None = None
    position_loaded: bool = False

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position_loaded = True
        plan = self.resume_plan or {}
        if plan.get("restart_epoch"):
            return  # the data settings changed: the epoch's data starts from its beginning
        samples, batches, num_workers = _loader_position(state_dict)
        old_world, new_world = plan.get("world_size", (1, 1))
        if old_world != new_world:  # the same share of the epoch, re-partitioned over the new ranks
            samples = samples * old_world // new_world
            batches = samples // (self.batch_size or 1)
        elif num_workers == self.num_workers:
            super().load_state_dict(state_dict)
            return
        template = self.state_dict()  # a fresh iterator's state in this loader's own layout
        super().load_state_dict(_at_position(template, samples, batches, self.num_workers))


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not _EXCLUDED_DIRS & set(f.relative_to(root).parts) and f.is_file()]
    return root, sorted(files)


def _in_validation(relative: str, val_fraction: float) -> bool:
    # A hash of the relative path, not the file order, decides: stable across machines and file systems.
    return zlib.crc32(relative.encode()) / 2**32 < val_fraction


def _concat(files: list[Path]) -> Tensor:
    raw = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class TextCorpusDataModule(LightningDataModule):
    """Next-byte prediction windows from a directory of text files (vocabulary 256), exactly resumable.

    Files are split into train and validation by a hash of their relative path (a deterministic split
    by file); a corpus of a single file is split by position instead (its last ``val_fraction``). Each
    split is the concatenation of its files, and a sample is a window of ``seq_len`` bytes at a seeded
    random offset with the next bytes as targets.

    Resuming: the training order is a function of ``seed`` and the epoch only (a seeded
    ``DistributedSampler``, one replica per rank), the loader is a torchdata ``StatefulDataLoader`` whose
    position Lightning checkpoints, and the data module's checkpoint entry holds every rank's global RNG
    states (restored just before the first training batch after the resume, so dropout continues exactly).
    A run resumed mid-epoch therefore continues bit-identically on the same hardware and world size, with
    any ``num_workers``. A different world size continues from the same point of the epoch with one warning
    (the epoch is re-partitioned over the ranks). A checkpoint whose data settings (``seq_len``,
    ``batch_size``, ``seed``, ``train_windows``, the corpus) differ raises, or with ``resume_mismatch="warn"``
    warns once and restarts the epoch's data; one with no saved data position (written before this data
    module was resumable) warns once and restarts the epoch's data.

    Args:
        data_dir: A directory or a single file; ``None`` reads the Python standard library's sources.
        glob: Pattern of files under ``data_dir``; default ``"**/*.py"`` for the standard library and
            ``"**/*.txt"`` for a directory.
        seq_len: Window length T.
        batch_size: Windows per batch (per device).
        val_fraction: Share of files (or bytes, for a single file) held out for validation.
        train_windows: Number of training windows in one epoch.
        val_windows: Number of (fixed) validation windows.
        seed: Seed of the window offsets and of the training order.
        num_workers: DataLoader workers.
        resume_mismatch: What a checkpoint saved with other data settings does: ``"error"`` raises,
            ``"warn"`` warns and starts the epoch's data from its beginning.

    Raises:
        MisconfigurationException: at construction, for bad arguments or a path that matches no files;
            at setup, when ``seq_len`` is longer than the shortest split; at resume, for a checkpoint saved
            with other data settings (with ``resume_mismatch="error"``).

    Example::

        dm = TextCorpusDataModule(seq_len=128, batch_size=32)  # the standard library, no download
        trainer.fit(CausalLMModule(preset="tiny"), datamodule=dm)
        trainer.fit(CausalLMModule(preset="tiny"), datamodule=dm, ckpt_path="last")  # continues exactly
    """

    def __init__(
        self,
        data_dir: str | None = None,
        glob: str | None = None,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        train_windows: int = 100_000,
        val_windows: int = 512,
        seed: int = 1234,
        num_workers: int = 0,
        resume_mismatch: Literal["error", "warn"] = "error",
    ) -> None:
        super().__init__()
        for name in ("seq_len", "batch_size", "train_windows", "val_windows"):
            check_positive_int(name, locals()[name], error=MisconfigurationException)
        check_positive_int("num_workers", num_workers, minimum=0, error=MisconfigurationException)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1:
            raise MisconfigurationException(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        check_choice("resume_mismatch", resume_mismatch, ("error", "warn"), error=MisconfigurationException)
        self.save_hyperparameters()
        self.root, self.files = self._resolve_files(data_dir, glob)
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None
        self._corpus: dict[str, int] | None = None
        self._resume_plan: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._train_loader: _ResumableLoader | None = None
        self._check_position = False

    @staticmethod
    def _resolve_files(data_dir: str | None, glob: str | None) -> tuple[Path, list[Path]]:
        if data_dir is None:
            if glob is None:
                return _stdlib_files()
            root = Path(sysconfig.get_paths()["stdlib"])
        else:
            root = Path(data_dir).expanduser()
            if not root.exists():
                raise MisconfigurationException(f"`data_dir`={data_dir!r} does not exist")
            if root.is_file():
                return root.parent, [root]
        pattern = glob or "**/*.txt"
        files = sorted(
            f for f in root.glob(pattern) if f.is_file() and not _EXCLUDED_DIRS & set(f.relative_to(root).parts)
        )
        if not files:
            raise MisconfigurationException(f"No files match `glob`={pattern!r} under `data_dir`={str(root)!r}")
        return root, files

    @property
    def vocab_size(self) -> int:
        return 256

    def _split(self) -> tuple[Tensor, Tensor]:
        frac = self.hparams.val_fraction
        if len(self.files) == 1:
            data = _concat(self.files)
            cut = int(len(data) * (1.0 - frac))
            return data[:cut], data[cut:]
        val = [f for f in self.files if _in_validation(f.relative_to(self.root).as_posix(), frac)]
        if not val:  # tiny corpora: hold out the file whose hash is smallest
            val = [min(self.files, key=lambda f: zlib.crc32(f.relative_to(self.root).as_posix().encode()))]
        if len(val) == len(self.files):
            val = val[:1]
        val_set = set(val)
        train = [f for f in self.files if f not in val_set]
        return _concat(train), _concat(val)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        train, val = self._split()
        T = self.hparams.seq_len
        shortest = min(("train", len(train)), ("validation", len(val)), key=lambda item: item[1])
        if shortest[1] <= T:
            raise MisconfigurationException(
                f"`seq_len`={T} is longer than the shortest split ({shortest[0]}: {shortest[1]} bytes);"
                " lower `seq_len` or add data"
            )
        self.train_data, self.val_data = train, val
        # The corpus identity a saved position refers to: sizes and a checksum of the training split.
        self._corpus = {"train_bytes": len(train), "crc32": zlib.crc32(train.numpy().tobytes())}

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.train_data, hp.seq_len, hp.train_windows, hp.seed)
        world_size, rank = self._world()
        # Seeded by `seed` and the epoch (Lightning calls set_epoch), never by the global RNG; one replica per
        # rank, so Lightning keeps this sampler under DDP instead of injecting its own.
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=hp.seed, drop_last=True)
        # A resumed run creates its iterator (and so draws this permutation) before Lightning calls set_epoch:
        # start at the restored epoch, or a run resumed in epoch 1 or later would read epoch 0's order.
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = _ResumableLoader(
                ds,
                batch_size=hp.batch_size,
                sampler=sampler,
                num_workers=hp.num_workers,
                drop_last=True,
                generator=torch.Generator().manual_seed(hp.seed),  # worker seeds: not from the global RNG either
            )
        loader.resume_plan = self._resume_plan
        self._train_loader = loader
        self._check_position = self.trainer is not None and self.trainer.ckpt_path is not None
        return loader

    def val_dataloader(self) -> DataLoader:
        assert self.val_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.val_data, hp.seq_len, hp.val_windows, hp.seed + 1)
        # An own generator: a validation run draws no number from the global RNG (which dropout uses).
        return DataLoader(
            ds,
            batch_size=hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
            generator=torch.Generator().manual_seed(hp.seed + 1),
        )

    test_dataloader = val_dataloader

    def _settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"seq_len": hp.seq_len, "batch_size": hp.batch_size, "seed": hp.seed,
                "train_windows": hp.train_windows, "corpus": self._corpus}  # fmt: skip

    @override
    def state_dict(self) -> dict[str, Any]:
        """Data settings, world size, workers, and every rank's global RNG states (a collective under DDP)."""
        world_size, _ = self._world()
        rng = gather_rng_states(world_size)
        return {"version": _STATE_VERSION, "settings": self._settings(), "world_size": world_size,
                "num_workers": self.hparams.num_workers, "rng": rng}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the saved data settings against this run's and plan the resume (see the class docstring)."""
        if self.train_data is None:
            self.setup("fit")
        saved, current = state_dict.get("settings", {}), self._settings()
        changed = [f"{k}={saved.get(k)!r} -> {current[k]!r}" for k in _POSITION_KEYS if saved.get(k) != current[k]]
        world_size, rank = self._world()
        old_world = int(state_dict.get("world_size", 1))
        plan: dict[str, Any] = {"world_size": (old_world, world_size)}
        if changed:
            what = ", ".join(changed)
            message = (
                f"TextCorpusDataModule: the checkpoint's data position was saved with other data settings"
                f" ({what}; checkpoint -> this run), e.g. a checkpoint of another recipe"
            )
            if self.hparams.resume_mismatch == "error":
                raise MisconfigurationException(
                    message + ". Resume with the same data settings, or pass `resume_mismatch='warn'` to continue"
                    " with the new ones from the beginning of the epoch's data."
                )
            rank_zero_warn(message + ": the epoch's data restarts from its beginning.")
            plan["restart_epoch"] = True
        elif old_world != world_size:
            rank_zero_warn(
                f"TextCorpusDataModule: resuming a checkpoint saved at world size {old_world} on world size"
                f" {world_size}: the rest of the epoch is re-partitioned over the ranks and ranks without a saved"
                " RNG state take rank 0's, so the run continues from the same point of the epoch but not"
                " bit-identically to an uninterrupted run."
            )
        elif int(state_dict.get("num_workers", self.hparams.num_workers)) != self.hparams.num_workers:
            rank_zero_info(
                f"TextCorpusDataModule: resuming with num_workers={self.hparams.num_workers} (checkpoint:"
                f" {state_dict['num_workers']}); the data position carries over exactly."
            )
        rng = state_dict.get("rng") or []
        self._pending_rng = rng[rank] if rank < len(rng) else (rng[0] if rng else None)
        self._resume_plan = plan

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
            f"TextCorpusDataModule: the checkpoint {trainer.ckpt_path!r} holds no data-loader position (it was"
            f" written before the loaders were resumable): the data of epoch {trainer.current_epoch} restarts at"
            " the beginning of the epoch, so the resumed run reads other batches than an uninterrupted run."
        )
