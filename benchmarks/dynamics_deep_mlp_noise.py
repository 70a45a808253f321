"""A 20-layer MLP from a poor initialization, with and without annealed gradient noise (Neelakantan et al. 2015).

Claim checked: annealed Gaussian gradient noise, variance eta / (1 + t)^0.55, lets a very deep, badly initialized
network train where plain training stalls.

Setup (sized down from the paper's MNIST for 2 shared CPU cores, no download): 4,096 points of a synthetic
5-class problem (10 Gaussian inputs, labels from a random one-hidden-layer tanh teacher), a 20-layer ReLU MLP of
width 50 (10-50-...-50-5, 47K parameters), batch 128, ``--steps`` steps, and a poor initialization: ``--init
normal`` (default; weights N(0, 0.1^2), zero biases: the signal shrinks about 2x per layer) or ``--init zero``
(every gradient but the last layer's is exactly 0). Optimizer ``--optimizer adam`` (default; lr 1e-3) or ``sgd``
(momentum 0.9, lr 0.01), with ``--clip`` gradient-norm clipping. With noise: ``NoiseAnnealing(eta=--eta,
gamma=0.55)``. Reports the training loss (mean over the last 50 steps) for each of ``--seeds`` seeds and saves
``benchmarks/figures/dynamics_deep_mlp_noise.png``.

Commands (2-core CPU; the timings are in RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/dynamics_deep_mlp_noise.py --seeds 3      # Adam, 1,000 steps: not reproduced
    OMP_NUM_THREADS=1 python benchmarks/dynamics_deep_mlp_noise.py --seeds 3 --steps 4000 --optimizer sgd \
        --clip 10 --eta 0.3                                                       # reproduced
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import FIGURES, save_figure  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gd.callbacks import NoiseAnnealing  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

FIGURE = FIGURES / "dynamics_deep_mlp_noise.png"


def teacher_data(n: int = 4096, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    w1, w2 = torch.randn(10, 32, generator=gen), torch.randn(32, 5, generator=gen)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


class DeepMLP(L.LightningModule):
    def __init__(self, depth: int = 20, width: int = 50, optimizer: str = "sgd", init: str = "normal") -> None:
        super().__init__()
        self.optimizer = optimizer
        dims = [10] + [width] * (depth - 1) + [5]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                if init == "zero":  # Neelakantan et al.'s "bad init": every gradient but the last layer's is 0
                    nn.init.zeros_(m.weight)
                else:  # their "simple init": the signal shrinks about 2x per layer
                    nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def run(
    seed: int, eta: float | None, steps: int, root: str, optimizer: str, init: str, clip: float | None = None
) -> list[float]:
    L.seed_everything(seed, verbose=False)
    model = DeepMLP(optimizer=optimizer, init=init)
    losses = Losses()
    callbacks: list[Callback] = [losses]
    if eta is not None:
        callbacks.insert(0, NoiseAnnealing(eta=eta, gamma=0.55, seed=seed))
    x, y = teacher_data()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=callbacks, gradient_clip_val=clip)  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True))
    return losses.values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--init", choices=("zero", "normal"), default="normal")
    parser.add_argument("--clip", type=float, default=None, help="gradient-norm clipping (the paper clips at 10)")
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    curves: dict[str, list[list[float]]] = {"no noise": [], f"gradient noise eta={args.eta}": []}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            for name, eta in zip(curves, (None, args.eta), strict=True):
                curves[name].append(run(seed, eta, args.steps, root, args.optimizer, args.init, args.clip))
                print(f"seed {seed} {name}: final loss {statistics.mean(curves[name][-1][-50:]):.4f}", flush=True)
    print(f"\nchance level: log 5 = {math.log(5):.4f}")
    print("| training | final training loss per seed (mean of the last 50 steps) | mean |\n|---|---|---|")
    for name, runs in curves.items():
        finals = [statistics.mean(c[-50:]) for c in runs]
        print(f"| {name} | {', '.join(f'{v:.4f}' for v in finals)} | {statistics.mean(finals):.4f} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.no_figure:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("tab:blue", "tab:orange"), strict=True):
        for i, c in enumerate(runs):
            smooth = [statistics.mean(c[max(0, t - 24) : t + 1]) for t in range(len(c))]
            ax.plot(smooth, color=color, alpha=0.8, label=name if i == 0 else None)
    ax.axhline(math.log(5), color="black", ls="--", lw=0.8, label="chance (log 5)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (25-step mean)")
    init = "zero" if args.init == "zero" else "N(0, 0.1^2)"
    opt = "Adam lr 1e-3" if args.optimizer == "adam" else "SGD momentum 0.9, lr 0.01"
    clip = f", clip {args.clip:g}" if args.clip else ""
    ax.set_title(f"20-layer MLP, {init} init, {opt}{clip}, {args.seeds} seeds")
    ax.legend()
    save_figure(fig, FIGURE, dpi=100)


if __name__ == "__main__":
    main()
