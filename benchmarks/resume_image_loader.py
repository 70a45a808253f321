"""What exact resume costs the ImageNet recipes' data loading, and what a resume saves by seeking.

Claim checked: ``ImageFolderDataModule``'s resumable training loader (torchdata ``StatefulDataLoader``, a seeded
``DistributedSampler``, every image decoded and augmented under RNGs seeded by ``(seed, epoch, index)``) reads
at least 0.95x the images/s of the loader it replaced (a plain ``DataLoader(shuffle=True)`` over the same timm
dataset and transform, augmentation drawing from the global RNGs). Both read a generated ImageFolder of JPEGs
at ImageNet-like size through the resnet50 recipes' training transform (random resized crop to 224, flip), in
the main process (``--workers 0``: per-image costs are not hidden behind worker processes). ``--repeats``
pairs run interleaved and the median ratio is reported.

It also times a ConAdv mid-epoch resume: the look-ahead wrapper skipping ``--skip`` batches by reading them
(any loader) against seeking the resumable loader (no batch read).

Commands::

    python benchmarks/resume_image_loader.py                     # CPU, about 2 minutes on 2 cores
    python benchmarks/resume_image_loader.py --workers 4 --images 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_gd.recipes.image_folder import ImageFolderDataModule, make_tiny_image_folder
from lightning_gd.strategies.lookahead import LookaheadLoader

warnings.filterwarnings("ignore")


def _images_per_second(loader: DataLoader, batches: int) -> float:
    it = iter(loader)
    next(it)  # the first batch pays for iterator and worker start-up in both loaders
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def _resume_seconds(loader: DataLoader, skip: int) -> float:
    lookahead = LookaheadLoader(loader, lambda: 0)
    lookahead.load_state_dict({"epoch": 0, "consumed": skip})
    start = time.perf_counter()
    next(iter(lookahead))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768, help="training images (3 classes)")
    parser.add_argument("--size", type=int, default=320, help="side of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", type=int, default=10, help="batches already trained on at the resume")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_image_folder(Path(tmp) / "images", classes=3, per_class=args.images // 3, size=args.size)
        dm = ImageFolderDataModule(
            str(root), image_size=224, batch_size=args.batch_size, num_workers=args.workers, pin_memory=False,
            persistent_workers=False, train_transform={"scale": [0.08, 1.0], "hflip": 0.5, "color_jitter": 0.0},
        )  # fmt: skip
        dm.setup("fit")
        plain = DataLoader(dm.train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                           num_workers=args.workers)  # fmt: skip
        # The resumable loader without the per-image seeding: separates the loader's cost from the seeding's.
        unseeded = dm.resumable_loader(dm.train_set, args.batch_size, dm.seed, args.workers)
        ratios, unseeded_ratios = [], []
        for r in range(args.repeats):
            resumable = _images_per_second(dm.train_dataloader(), args.batches)
            baseline = _images_per_second(plain, args.batches)
            loader_only = _images_per_second(unseeded, args.batches)
            ratios.append(resumable / baseline)
            unseeded_ratios.append(loader_only / baseline)
            row = {"repeat": r, "resumable_img_s": round(resumable, 1), "plain_img_s": round(baseline, 1),
                   "resumable_without_seeding_img_s": round(loader_only, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
        read = _resume_seconds(plain, args.skip)
        seek = _resume_seconds(dm.train_dataloader(), args.skip)
        summary = {
            "images_per_s_ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            "without_seeding_ratio_median": round(statistics.median(unseeded_ratios), 3),
            "resume_first_batch_s": {"read_and_drop": round(read, 3), "seek": round(seek, 3), "skip": args.skip},
            "resume_speedup": round(read / seek, 1),
            "workers": args.workers,
            "batch_size": args.batch_size,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
