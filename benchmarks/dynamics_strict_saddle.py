"""Perturbed gradient descent escapes strict saddles where gradient descent stays (Jin et al. 2017).

Claim checked: started exactly at a strict saddle (zero gradient, lambda_min < 0), plain GD never moves, while
perturbed GD (``NoiseAnnealing(eta=0, grad_norm_threshold=g, radius=r)``: a uniform-ball kick when the gradient
norm is at most g and no kick happened in the last 10 steps) escapes within a few dozen steps and reaches a
minimum, which ``SharpnessTracker(smallest=True)`` shows as lambda_min going from negative to positive.

Problems (float64, full-batch SGD, no momentum, lr 0.1, 80 steps; a check of lambda_min / lambda_max every 2 steps):

* ``quartic``: f(x, y) = x^2 - y^2 + y^4 / 2, the strict saddle x^2 - y^2 at the origin (Hessian eigenvalues
  2 and -2) with a quartic wall so that escaping ends in the minima (0, +-1) (Hessian diag(2, 4)); on plain
  x^2 - y^2 lambda_min stays -2 everywhere and f is unbounded below, so the escape shows only in f;
* ``two_layer``: a two-layer linear network x -> a * (b^T x) (input 4, one hidden unit, 5 parameters) fitted to a
  linear teacher on 64 Gaussian inputs, MSE / 2 plus weight decay 0.05 / 2 * (a^2 + |b|^2), started at
  a = 0, b = 0 (zero gradient; Hessian eigenvalues 0.05 +- |E[x y]|, so lambda_min < 0).

Reports, for GD and perturbed GD, the first step at distance > 0.1 from the saddle, the final loss, the number
of perturbations and lambda_min at the start and the end; saves ``benchmarks/figures/dynamics_strict_saddle.png``.

Command (2-core CPU, well under a minute)::

    OMP_NUM_THREADS=1 python benchmarks/dynamics_strict_saddle.py
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _harness import FIGURES, save_figure  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gd.callbacks import NoiseAnnealing, SharpnessTracker  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

FIGURE = FIGURES / "dynamics_strict_saddle.png"
STEPS = 80


class Quartic(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # (x, y), at the saddle

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = self.w
        return x**2 - y**2 + y**4 / 2 + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoLayerLinear(L.LightningModule):
    def __init__(self, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
        self.weight_decay = weight_decay

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        pred = self.a * (x @ self.b)  # (n,)
        penalty = self.weight_decay / 2 * (self.a.pow(2).sum() + self.b.pow(2).sum())
        return 0.5 * (pred - y).pow(2).mean() + penalty

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Trace(Callback):
    """Loss and distance from the start (the saddle) after every step."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.dist: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(outputs["loss"]))
        self.dist.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).norm().item())


def data(problem: str) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    if problem == "quartic":
        x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    else:
        x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
        y = x @ torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=len(x))  # full batch: one batch per epoch


def run(problem: str, perturbed: bool, root: str) -> dict:
    L.seed_everything(0, verbose=False)
    model = Quartic() if problem == "quartic" else TwoLayerLinear()
    trace = Trace()
    sharp = SharpnessTracker(every_n_steps=2, smallest=True, max_overhead=None, plot=False, tol=1e-10)
    callbacks: list[Callback] = [trace, sharp]
    noise = None
    if perturbed:
        noise = NoiseAnnealing(eta=0.0, grad_norm_threshold=1e-3, radius=1e-2, perturb_interval=10, seed=0)
        callbacks.insert(0, noise)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=callbacks)  # fmt: skip
    trainer.fit(model, data(problem))
    lam_min = sharp.history["sharpness/lambda_min"]
    escape = next((t + 1 for t, d in enumerate(trace.dist) if d > 0.1), None)
    return {
        "loss": trace.loss,
        "lam_min": lam_min,
        "escape": escape,
        "perturbations": noise.perturbations if noise else 0,
        "final_loss": trace.loss[-1],
    }


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for problem in ("quartic", "two_layer"):
            for perturbed in (False, True):
                results[(problem, perturbed)] = run(problem, perturbed, root)
    print("| problem | method | first step > 0.1 from the saddle | perturbations | lambda_min first check -> last |"
          " loss at the saddle -> final |\n|---|---|---|---|---|---|")  # fmt: skip
    for (problem, perturbed), r in results.items():
        name = "perturbed GD" if perturbed else "GD"
        lam = r["lam_min"]
        print(f"| {problem} | {name} | {r['escape'] or 'never'} | {r['perturbations']} |"
              f" {lam[0][1]:+.3f} -> {lam[-1][1]:+.3f} | {r['loss'][0]:.4f} -> {r['final_loss']:.4f} |")  # fmt: skip
    print(f"wall time {time.perf_counter() - start:.0f} s")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, problem in enumerate(("quartic", "two_layer")):
        for perturbed, style in ((False, "--"), (True, "-")):
            r = results[(problem, perturbed)]
            label = "perturbed GD" if perturbed else "GD"
            axes[0, col].plot(range(1, STEPS + 1), r["loss"], style, label=label)
            steps, lam = zip(*r["lam_min"], strict=True)
            axes[1, col].plot(steps, lam, style, marker=".", label=label)
        axes[0, col].set_title({"quartic": "f = x^2 - y^2 + y^4/2 from (0, 0)",
                                "two_layer": "two-layer linear net from a = b = 0"}[problem])  # fmt: skip
        axes[0, col].set_ylabel("training loss")
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[1, col].set_ylabel("SharpnessTracker lambda_min")
        axes[1, col].set_xlabel("optimizer step")
        axes[0, col].legend()
        axes[1, col].legend()
    save_figure(fig, FIGURE, dpi=100)


if __name__ == "__main__":
    main()
