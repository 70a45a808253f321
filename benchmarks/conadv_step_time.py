"""Step time of vanilla vs ConAdv vs sequential adversarial training, and images/s against a plain PyTorch loop.

Claims checked (issue 12, the GPU part): on one GPU with ResNet-50 in bf16, a ConAdv step (the attack for the
next batch on a CUDA side stream, overlapping the main forward/backward) costs at most 1.15x a vanilla step, where
sequential adversarial training (the same attack on the main stream, ``ConAdvStrategy(concurrent=False)``) costs
about 2x; and Lightning's vanilla loop reaches the images/s of a hand-written PyTorch loop of the same model.

Setup: timm ``--model`` (resnet50), ``--batch-size`` random images of ``--image-size`` in [0, 1], normalized, on
the device (an in-memory dataset, so data loading is not measured), channels_last, bf16-mixed autocast, SGD with
momentum. Each configuration runs ``--warmup`` + ``--steps`` optimizer steps; the time of the last ``--steps``
steps (a callback with CUDA synchronization at the window's ends) gives s/step and images/s (clean images).
The plain loop: forward + cross entropy + backward + step with the same autocast and memory format.

Command (one H100/H200; about 3 minutes)::

    python benchmarks/conadv_step_time.py --device cuda --model resnet50 --batch-size 256 --steps 30

CPU smoke run (seconds; figures meaningless)::

    python benchmarks/conadv_step_time.py --device cpu --model resnet10t --batch-size 8 \\
        --image-size 32 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import time

import _harness  # noqa: F401  (the checkout on sys.path)
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.recipes.image_classifier import ImageClassifierModule  # noqa: E402
from lightning_gd.strategies import ConAdvStrategy  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Timer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        if trainer.global_step == self.warmup:
            self._sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self._sync(pl_module.device)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def _data(n: int, size: int, classes: int, device: str) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, size, size, generator=gen)
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=n // 4, shuffle=False, drop_last=True)


def lightning_run(mode: str, args: argparse.Namespace) -> float:
    seed_everything(0, verbose=False)
    model = ImageClassifierModule(
        args.model, num_classes=1000, channels_last=args.device == "cuda",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0),
    )  # fmt: skip
    strategy = {
        "vanilla": "auto",
        "conadv": ConAdvStrategy(mean=MEAN, std=STD, concurrent=True),
        "sequential": ConAdvStrategy(mean=MEAN, std=STD, concurrent=False),
    }[mode]
    timer = _Timer(args.warmup)
    trainer = Trainer(accelerator=args.device, devices=1, strategy=strategy, max_steps=args.warmup + args.steps,
                      precision="bf16-mixed" if args.device == "cuda" else "32-true", callbacks=[timer],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)  # fmt: skip
    trainer.fit(model, _data(4 * args.batch_size, args.image_size, 1000, args.device))
    if dist.is_initialized():
        dist.destroy_process_group()
    return (timer.end - timer.start) / max(1, timer.steps)


def plain_loop(args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, num_classes=1000).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(x.to(device), y.to(device)) for x, y in _data(4 * args.batch_size, args.image_size, 1000, "cpu")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    results = {"plain_loop": plain_loop(args)}
    for mode in ("vanilla", "conadv", "sequential"):
        results[mode] = lightning_run(mode, args)
        print(json.dumps({mode: results[mode]}), flush=True)
    base = results["vanilla"]
    print(f"\n{args.model}, batch {args.batch_size}, {args.image_size}px, {args.device}\n")
    print("| run | s / step | images / s | x vanilla |")
    print("|---|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t:.4f} | {args.batch_size / t:.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
