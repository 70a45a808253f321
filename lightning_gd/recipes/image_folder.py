"""An ImageFolder (ImageNet layout) DataModule on timm's data pipeline: ``create_dataset`` and ``create_transform``.

Exactly resumable (:class:`~lightning_gd.recipes.resumable.ResumableDataModule`): the training loader is a
torchdata ``StatefulDataLoader`` over a seeded order, and every image is decoded and augmented under RNGs seeded by
``(seed, epoch, index)``, so timm's random crops, flips, RandAugment and random erasing are the same in a resumed
run, with any number of workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_gd.recipes.resumable import ResumableDataModule
from lightning_gd.recipes.stateful_data import ResumeMismatch
from lightning_gd.utils.checks import check_positive_int

__all__ = ["ImageFolderDataModule", "image_batch_size", "make_tiny_image_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_batch_size(batch: Any) -> int:
    """Images in an ``(images, labels)`` batch: the ``batch_size_fn`` of Lightning's ``ThroughputMonitor``."""
    return int(batch[0].shape[0])


def make_tiny_image_folder(root: str | os.PathLike, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """Write a tiny ImageFolder (``train/`` and ``val/``, ``classes`` folders of random JPEGs) for smoke tests.

    Each class has its own mean colour, so a model can learn something. Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = torch.tensor([(c * 97) % 256, (c * 57) % 256, (c * 31) % 256], dtype=torch.float32)
                img = (base.view(1, 1, 3) + 40 * torch.randn(size, size, 3, generator=gen)).clamp(0, 255)
                Image.fromarray(img.to(torch.uint8).numpy()).save(folder / f"{i:04d}.jpg")
    return root


class ImageFolderDataModule(ResumableDataModule):
    """Train / validation splits of an ImageFolder root through timm's data pipeline.

    ``data_dir`` holds ``train/<class>/*`` and ``val/<class>/*`` (or ``validation/``), the ImageNet layout;
    ``timm.data.create_dataset`` reads it and ``timm.data.create_transform`` builds the augmentation (random
    resized crop, flip, colour jitter, optional RandAugment / AutoAugment and random erasing: timm's own, none
    re-implemented here) and the evaluation transform (resize, centre crop at ``crop_pct``). A missing root is an
    error at construction, before any training.

    Resuming: the training order is a function of ``seed`` and the epoch, and each image's augmentation a function
    of ``(seed, epoch, index)``; the loader position and every rank's global RNG states are in the checkpoint. A run
    resumed mid-epoch continues bit-identically on the same hardware and world size, with any ``num_workers``
    (see :class:`~lightning_gd.recipes.resumable.ResumableDataModule` for a different world size, other data
    settings, and checkpoints written before this).

    Args:
        data_dir: The ImageFolder root.
        train_split: Name of the training split folder.
        val_split: Name of the validation split folder (timm also finds ``validation`` for ``val``).
        image_size: Training and evaluation crop side.
        batch_size: Per device (the global batch is ``batch_size * devices * accumulate_grad_batches``).
        num_workers: DataLoader workers per device.
        mean: Normalization mean (pixel units in [0, 1]); the same goes to ``ConAdvStrategy``.
        std: Normalization standard deviation.
        interpolation: Resize interpolation (``bilinear``, ``bicubic``, ...).
        crop_pct: Evaluation centre-crop fraction (timm's default 0.875 when ``None``).
        train_transform: Further ``create_transform`` arguments for training (``auto_augment: rand-m9-mstd0.5``,
            ``re_prob: 0.25``, ``color_jitter: 0.4``, ``scale: [0.08, 1.0]``, ...).
        pin_memory: Pinned host memory for faster, asynchronous copies to the GPU.
        persistent_workers: Keep workers alive between epochs.
        generate_tiny: When ``data_dir`` does not exist, write a tiny random ImageFolder there first (3 classes,
            a few JPEGs) so the recipe runs end to end without ImageNet: smoke tests, the recipe resume test.
        seed: Seed of the training order and of the per-image augmentation RNGs (not of the model's
            initialization, which ``seed_everything`` sets).
        resume_mismatch: What a checkpoint saved with other data settings (batch size, seed, number of
            training images or classes) does: ``"error"`` raises, ``"warn"`` warns and restarts the epoch's data.

    Example::

        # not run: needs an ImageFolder at /data/imagenet (tests/recipes generate a tiny one)
        data = ImageFolderDataModule("/data/imagenet", batch_size=256, num_workers=10,
                                     train_transform={"auto_augment": "rand-m9-mstd0.5"})

    Raises:
        MisconfigurationException: for a missing ``data_dir`` (naming the expected layout) or a bad argument.
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        train_split: str = "train",
        val_split: str = "val",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        interpolation: str = "bilinear",
        crop_pct: float | None = None,
        train_transform: dict[str, Any] | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        generate_tiny: bool = False,
        seed: int = 0,
        resume_mismatch: ResumeMismatch = "error",
    ) -> None:
        super().__init__(resume_mismatch)
        check_positive_int("batch_size", batch_size, error=MisconfigurationException)
        check_positive_int("num_workers", num_workers, minimum=0, error=MisconfigurationException)
        if image_size < 8:
            raise MisconfigurationException(f"`image_size` must be >= 8, got {image_size!r}")
        root = Path(os.path.expanduser(data_dir))
        if not root.is_dir() and generate_tiny:
            make_tiny_image_folder(root, size=max(image_size + image_size // 4, 16))
        if not root.is_dir():
            raise MisconfigurationException(
                f"ImageFolder root {str(root)!r} not found: expected {root}/{train_split}/<class>/*.JPEG and"
                f" {root}/{val_split}/<class>/*.JPEG (the ImageNet layout). Pass --data.init_args.data_dir"
                " /path/to/imagenet, or --data.init_args.generate_tiny true for a tiny random stand-in"
            )
        if not (root / train_split).is_dir():
            raise MisconfigurationException(
                f"ImageFolder root {str(root)!r} has no {train_split!r} folder of class folders"
            )
        self.save_hyperparameters()
        self.data_dir = str(root)
        self.train_split, self.val_split = train_split, val_split
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.train_transform = dict(train_transform or {})
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.train_set: Any = None
        self.val_set: Any = None

    def setup(self, stage: str | None = None) -> None:
        from timm.data import create_dataset, create_transform

        if self.train_set is None and stage in (None, "fit"):
            self.train_set = create_dataset("", root=self.data_dir, split=self.train_split, is_training=True)
            self.train_set.transform = create_transform(
                self.image_size, is_training=True, mean=self.mean, std=self.std, interpolation=self.interpolation,
                **self.train_transform,
            )  # fmt: skip
        if self.val_set is None:
            self.val_set = create_dataset("", root=self.data_dir, split=self.val_split, is_training=False)
            self.val_set.transform = create_transform(
                self.image_size, is_training=False, mean=self.mean, std=self.std, interpolation=self.interpolation,
                crop_pct=self.crop_pct,
            )  # fmt: skip

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"pin_memory": self.pin_memory and torch.cuda.is_available(),
                "persistent_workers": self.persistent_workers}  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self.resumable_loader(
            self.train_set, self.batch_size, self.seed, self.num_workers, per_sample_seed=True, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self.evaluation_loader(self.val_set, self.batch_size, self.seed + 1, self.num_workers,
                                      **self._loader_kwargs())  # fmt: skip

    def position_settings(self) -> dict[str, Any]:
        """Batch size, seed and the training set's size and classes: what a saved position refers to."""
        if self.train_set is None:
            self.setup("fit")
        classes = getattr(getattr(self.train_set, "reader", None), "class_to_idx", None)
        return {"batch_size": self.batch_size, "seed": self.seed, "train_images": len(self.train_set),
                "classes": None if classes is None else len(classes)}  # fmt: skip
