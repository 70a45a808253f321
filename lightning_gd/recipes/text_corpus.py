"""Byte-level text corpus data module; by default the running interpreter's own standard library.

With no ``data_dir`` the corpus is every ``.py`` file of the Python standard library (the ``stdlib`` path
of :mod:`sysconfig`, site-packages excluded): about 30 MB of real text on any machine, with no download.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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


class TextCorpusDataModule(LightningDataModule):
    """Next-byte prediction windows from a directory of text files (vocabulary 256).

    Files are split into train and validation by a hash of their relative path (a deterministic split
    by file); a corpus of a single file is split by position instead (its last ``val_fraction``). Each
    split is the concatenation of its files, and a sample is a window of ``seq_len`` bytes at a seeded
    random offset with the next bytes as targets.

    Args:
        data_dir: A directory or a single file; ``None`` reads the Python standard library's sources.
        glob: Pattern of files under ``data_dir``; default ``"**/*.py"`` for the standard library and
            ``"**/*.txt"`` for a directory.
        seq_len: Window length T.
        batch_size: Windows per batch (per device).
        val_fraction: Share of files (or bytes, for a single file) held out for validation.
        train_windows: Number of training windows in one epoch.
        val_windows: Number of (fixed) validation windows.
        seed: Seed of the window offsets.
        num_workers: DataLoader workers.

    Raises:
        MisconfigurationException: at construction, for bad arguments or a path that matches no files;
            at setup, when ``seq_len`` is longer than the shortest split.

    Example::

        dm = TextCorpusDataModule(seq_len=128, batch_size=32)  # the standard library, no download
        trainer.fit(CausalLMModule(preset="tiny"), datamodule=dm)
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
    ) -> None:
        super().__init__()
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("train_windows", train_windows),
        ):
            if value < 1:
                raise MisconfigurationException(f"`{name}` must be >= 1, got {value}")
        if val_windows < 1:
            raise MisconfigurationException(f"`val_windows` must be >= 1, got {val_windows}")
        if not 0.0 < val_fraction < 1.0:
            raise MisconfigurationException(f"`val_fraction` must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise MisconfigurationException(f"`num_workers` must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.root, self.files = self._resolve_files(data_dir, glob)
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None

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

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.train_data, hp.seq_len, hp.train_windows, hp.seed)
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=True, num_workers=hp.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_data is not None, "call setup() first"
        hp = self.hparams
        ds = _RandomWindows(self.val_data, hp.seq_len, hp.val_windows, hp.seed + 1)
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=False, num_workers=hp.num_workers)

    test_dataloader = val_dataloader
