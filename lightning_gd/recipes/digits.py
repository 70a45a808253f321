"""scikit-learn's handwritten digits (1,797 8x8 grayscale images, shipped inside the package) as a DataModule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule"]

# Pixel statistics of the whole set after scaling to [0, 1] (sklearn's values are 0..16).
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3761,)
_INSTALL = 'pip install "lightning-gd[vision]"'


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            f"The digits dataset needs scikit-learn, the `vision` extra: {_INSTALL} (or pip install scikit-learn)"
        ) from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(LightningDataModule):
    """scikit-learn's digits (10 classes), resized to ``image_size`` and normalized; a seeded train/val split.

    Pixels are in [0, 1] and normalized with :data:`DIGITS_MEAN` / :data:`DIGITS_STD`, so an attack budget of
    ``epsilon`` is a fraction of the ink range (0.1 = 1.6 of sklearn's 16 grey levels). The whole set lives in
    memory (0.1 MB at 8x8). scikit-learn is the optional extra ``lightning-gd[vision]``; without it,
    constructing the data fails with a one-line message giving the install command.

    Args:
        image_size: Side after bilinear resizing (8 keeps the original).
        batch_size: Per device.
        val_fraction: Share of the images held out (stratified by a seeded permutation).
        seed: Seed of the split.
        num_workers: DataLoader workers (0: in-process; the data is in memory).

    Example::

        trainer.fit(ImageClassifierModule("resnet10t", num_classes=10, in_chans=1), DigitsDataModule(batch_size=256))
    """

    mean = DIGITS_MEAN
    std = DIGITS_STD
    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 128,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise MisconfigurationException(f"`image_size` must be >= 8, got {image_size!r}")
        if batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise MisconfigurationException(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._images, self._labels = _load_digits()  # fails early, with the install command, without the extra
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def pixels(self) -> tuple[Tensor, Tensor]:
        """All images in pixel units [0, 1] at ``image_size``, and the labels."""
        images = self._images
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False).clamp(0, 1)
        return images, self._labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pixels, labels = self.pixels()
        x = (pixels - DIGITS_MEAN[0]) / DIGITS_STD[0]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(labels))
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train], labels[train])
        self.val_set = TensorDataset(x[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=512, num_workers=self.num_workers)
