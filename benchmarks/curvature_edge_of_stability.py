"""Edge of stability (Cohen et al. 2021) reproduced with SharpnessTracker in a real Trainer.

Claim checked: under full-batch gradient descent, the sharpness lambda_max of the training loss rises
("progressive sharpening") until it reaches about 2/lr, then hovers there while the loss keeps
decreasing non-monotonically.

Setup: two-arm 2D spiral (300 points, labels +-1, seeded noise), tanh MLP 2-64-64-1 (4,417 parameters,
float64), MSE loss, plain SGD (no momentum) at lr 0.05 (2/lr = 40) on the full batch (one batch per
epoch, so ``batch="current"`` is the full batch), ``max_steps`` 4,000; ``SharpnessTracker(every_n_steps=20,
max_overhead=None)`` (a check every 20 steps) with its other settings at default (warm-started Lanczos, tol
1e-2); every 200 steps a tight cold Lanczos (tol 1e-9) checks the tracked value. Reports the first step at which
lambda_max >= 0.9 * 2/lr and the mean of lambda_max / (2/lr) over the last 30% of training, and saves
``benchmarks/figures/edge_of_stability.png`` (lambda_max with the 2/lr line; training loss below).

Command (2-core CPU, about 1 minute)::

    python benchmarks/curvature_edge_of_stability.py
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
import warnings

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gd.callbacks import SharpnessTracker  # noqa: E402
from lightning_gd.curvature import HessianOperator, lanczos  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "edge_of_stability.png")


def spiral(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = n // 2
    t = torch.linspace(0.25, 3 * math.pi, k, dtype=torch.float64)
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / (3 * math.pi)
    X = torch.cat([arm, -arm]) + 0.02 * torch.randn(2 * k, 2, generator=g, dtype=torch.float64)
    y = torch.cat([torch.ones(k), -torch.ones(k)]).to(torch.float64).unsqueeze(1)
    return X, y


class GD(L.LightningModule):
    def __init__(self, width: int, depth: int, lr: float) -> None:
        super().__init__()
        layers, d = [], 2
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))
        self.lr = lr
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Not in training_step: the tracker's default loss_fn calls training_step while measuring.
        self.losses.append((self.global_step - 1, outputs["loss"].item()))  # loss before step's update

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Reference(L.Callback):
    """Every ``every`` steps, after the tracker: a tight cold Lanczos (tol 1e-9, up to 300 products)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.values: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        op = HessianOperator(pl_module, lambda m, b: nn.functional.mse_loss(m.net(b[0]), b[1]), batch)
        res = lanczos(op, tol=1e-9, max_iter=300, generator=torch.Generator().manual_seed(step))
        self.values[step] = float(res.eigenvalues[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=FIGURE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)

    X, y = spiral(args.points, args.seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=len(X), shuffle=False)  # full batch: one per epoch
    module = GD(args.width, args.depth, args.lr)
    tracker = SharpnessTracker(every_n_steps=args.every, plot=False, max_overhead=None)  # every 20 steps exactly
    reference = Reference(args.every * 10)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, precision="64-true", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=[tracker, reference],
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(module, loader)
        wall = time.perf_counter() - t0

    threshold = 2.0 / args.lr
    steps, lam = zip(*tracker.history["sharpness/lambda_max"], strict=True)
    hvps = [v for _, v in tracker.history["sharpness/num_hvps"]]
    first = next((s for s, v in zip(steps, lam, strict=True) if v >= 0.9 * threshold), None)
    tail = [v / threshold for s, v in zip(steps, lam, strict=True) if s > 0.7 * args.steps]
    loss_steps, losses = zip(*module.losses, strict=True)
    n_params = sum(p.numel() for p in module.parameters())

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(steps, lam, lw=1.2, label=r"$\lambda_{max}$ (SharpnessTracker)")
    ax1.axhline(threshold, color="black", ls="--", lw=1, label=f"2/lr = {threshold:g}")
    if first is not None:
        ax1.axvline(first, color="gray", ls=":", lw=1, label=f"first >= 0.9 x 2/lr (step {first})")
    ax1.set_ylabel("sharpness")
    ax1.set_title(
        f"Edge of stability: full-batch GD, lr={args.lr:g}, tanh MLP ({n_params:,} params), spiral, MSE", fontsize=10
    )
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.semilogy(loss_steps, losses, lw=0.8, color="tab:red")
    ax2.set_ylabel("training loss (MSE)")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)

    print(
        f"Full-batch GD, lr {args.lr:g} (2/lr = {threshold:g}), {args.steps} steps, {n_params:,} parameters,"
        f" {len(steps)} checks; wall {wall:.0f} s"
    )
    print("\n| quantity | value |\n|---|---|")
    print(f"| lambda_max at first check (step {steps[0]}) | {lam[0]:.2f} ({lam[0] / threshold:.2f} x 2/lr) |")
    print(f"| first step with lambda_max >= 0.9 x 2/lr | {first} |")
    print(
        f"| mean lambda_max / (2/lr), last 30% of training (steps > {int(0.7 * args.steps)}) |"
        f" {statistics.fmean(tail):.3f} |"
    )
    print(f"| min / max of lambda_max / (2/lr), same window | {min(tail):.3f} / {max(tail):.3f} |")
    print(f"| training loss: first / at first crossing / final | {losses[0]:.4f} / "
          f"{dict(module.losses).get(first, float('nan')):.4f} / {losses[-1]:.4f} |")  # fmt: skip
    up = sum(1 for a, b in zip(losses[:-1], losses[1:], strict=True) if b > a)
    print(f"| steps where the loss went up (non-monotone GD) | {up} of {len(losses) - 1} |")
    assert len(losses) == args.steps, len(losses)
    print(f"| HVPs per check: first (cold) / mean of the rest | {hvps[0]:.0f} / {statistics.fmean(hvps[1:]):.1f} |")
    tracked = dict(tracker.history["sharpness/lambda_max"])
    errs = [abs(tracked[s] - v) / v for s, v in reference.values.items()]
    print(f"| tracker vs tight cold Lanczos (tol 1e-9), {len(errs)} checks: worst / median rel. error |"
          f" {max(errs):.1e} / {statistics.median(errs):.1e} |")  # fmt: skip
    print(f"\nFigure: {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
