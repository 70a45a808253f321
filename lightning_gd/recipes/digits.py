"""scikit-learn's handwritten digits (1,797 8x8 grayscale images, shipped inside the package) as a DataModule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.recipes.resumable import ResumableDataModule
from lightning_gd.recipes.stateful_data import ResumeMismatch
from lightning_gd.utils.checks import check_number, check_positive_int

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


class DigitsDataModule(ResumableDataModule):
    """scikit-learn's digits (10 classes), resized to ``image_size`` and normalized; a seeded train/val split.

    Pixels are in [0, 1] and normalized with :data:`DIGITS_MEAN` / :data:`DIGITS_STD`, so an attack budget of
    ``epsilon`` is a fraction of the ink range (0.1 = 1.6 of sklearn's 16 grey levels). The whole set lives in
    memory (0.1 MB at 8x8). scikit-learn is the optional extra ``lightning-gd[vision]``; without it,
    constructing the data fails with a one-line message giving the install command.

    Exactly resumable (:class:`~lightning_gd.recipes.resumable.ResumableDataModule`): the training order is a
    function of ``seed`` and the epoch, and the loader position and the global RNG states are in the checkpoint.

    Args:
        image_size: Side after bilinear resizing (8 keeps the original).
        batch_size: Per device.
        val_fraction: Share of the images held out (stratified by a seeded permutation).
        seed: Seed of the split and of the training order.
        num_workers: DataLoader workers (0: in-process; the data is in memory).
        resume_mismatch: What a checkpoint saved with other data settings does: ``"error"`` raises, ``"warn"``
            warns and restarts the epoch's data.

    Example::

        # not run: trains (the quickstart-vision recipe; tests/recipes train it shrunk)
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
        resume_mismatch: ResumeMismatch = "error",
    ) -> None:
        super().__init__(resume_mismatch)
        if image_size < 8:
            raise MisconfigurationException(f"`image_size` must be >= 8, got {image_size!r}")
        check_positive_int("batch_size", batch_size, error=MisconfigurationException)
        check_positive_int("num_workers", num_workers, minimum=0, error=MisconfigurationException)
        check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True, error=MisconfigurationException)
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
        return self.resumable_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self.evaluation_loader(self.val_set, 512, self.seed + 1, self.num_workers)

    def position_settings(self) -> dict[str, Any]:
        """Batch size, seed and the split: what a saved position refers to."""
        return {"batch_size": self.batch_size, "seed": self.seed, "val_fraction": self.val_fraction}
