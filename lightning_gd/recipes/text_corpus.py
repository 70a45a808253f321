"""Byte-level text corpus data module; by default the running interpreter's own standard library.

With no ``data_dir`` the corpus is every ``.py`` file of the Python standard library (the ``stdlib`` path
of :mod:`sysconfig`, site-packages excluded): about 30 MB of real text on any machine, with no download.

The training loader is a torchdata ``StatefulDataLoader``: Lightning saves its position in every checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and restores it on resume, so a run resumed mid-epoch reads
exactly the batches the uninterrupted run would have read. The data module's own checkpoint entry holds the
global RNG states of every rank and the data settings the position refers to.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_gd.recipes.resumable import ResumableDataModule
from lightning_gd.recipes.stateful_data import ResumeMismatch
from lightning_gd.utils.checks import check_number, check_positive_int

__all__ = ["TextCorpusDataModule"]

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


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


class TextCorpusDataModule(ResumableDataModule):
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

        # not run: trains for minutes (the quickstart; tests/recipes train it shrunk)
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
        resume_mismatch: ResumeMismatch = "error",
    ) -> None:
        super().__init__(resume_mismatch)
        for name in ("seq_len", "batch_size", "train_windows", "val_windows"):
            check_positive_int(name, locals()[name], error=MisconfigurationException)
        check_positive_int("num_workers", num_workers, minimum=0, error=MisconfigurationException)
        check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True, error=MisconfigurationException)
        self.save_hyperparameters()
        self.num_workers = num_workers
        self.root, self.files = self._resolve_files(data_dir, glob)
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None
        self._corpus: dict[str, int] | None = None

    @staticmethod
    def _resolve_files(data_dir: str | None, glob: str | None) -> tuple[Path, list[Path]]:
        if data_dir is None:
            if glob is None:
                return _stdlib_files()
            root = Path(sysconfig.get_paths()["stdlib"])
        else:
            root = Path(data_dir).expanduser()
            if not root.exists():
                raise MisconfigurationException(
                    f"`data_dir`={data_dir!r} does not exist: give a directory or a file, or leave `data_dir` out to"
                    " read the Python standard library's sources"
                )
            if root.is_file():
                return root.parent, [root]
        pattern = glob or "**/*.txt"
        files = sorted(
            f for f in root.glob(pattern) if f.is_file() and not _EXCLUDED_DIRS & set(f.relative_to(root).parts)
        )
        if not files:
            raise MisconfigurationException(
                f"No files match `glob`={pattern!r} under `data_dir`={str(root)!r}: give the pattern of your files"
                " (e.g. '**/*.md')"
            )
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

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.train_data, hp.seq_len, hp.train_windows, hp.seed)
        return self.resumable_loader(ds, hp.batch_size, hp.seed, hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.val_data, hp.seq_len, hp.val_windows, hp.seed + 1)
        return self.evaluation_loader(ds, hp.batch_size, hp.seed + 1, hp.num_workers)

    test_dataloader = val_dataloader

    def position_settings(self) -> dict[str, Any]:
        """Which windows make up an epoch and in which order: a saved position means something only for these."""
        if self.train_data is None:
            self.setup("fit")
        hp = self.hparams
        return {"seq_len": hp.seq_len, "batch_size": hp.batch_size, "seed": hp.seed,
                "train_windows": hp.train_windows, "corpus": self._corpus}  # fmt: skip
