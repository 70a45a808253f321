"""Local SGD on 2 CPU ranks with independent per-rank weight noise against none (Adilova et al.).

Claim checked: in decentralized training (replicas averaged only every H steps), injecting independent noise into
each replica's weights is harmless to and can improve the averaged model of a non-linear network.

Setup (2 gloo ranks on a 2-core CPU, sized down): a tanh MLP 20-64-64-5 (5.8K parameters) on a synthetic 5-class
problem (2,048 training points split between the ranks by DistributedSampler, 1,024 validation points; labels from
a random one-hidden-layer teacher with 10% label noise), SGD lr 0.05, batch 32 per rank, ``--steps`` steps.
Local SGD is Lightning's post-local-SGD path, ``DDPStrategy(ddp_comm_state=PostLocalSGDState(start_localSGD_iter=0,
post_local_gradient_allreduce=False), ddp_comm_hook=post_localSGD_hook, model_averaging_period=8)``: torch's hook
keeps gradients local and torch's ``PeriodicModelAverager`` (created by Lightning) averages the replicas every 8
steps. Lightning registers DDP comm hooks only on CUDA, so this script's ``CPULocalSGD`` subclass registers the same
hook on CPU too (torch's hook and averager unchanged; no averaging code of ours). Noise:
``NoiseAnnealing(eta=--eta, gamma=0.55, target="weights", schedule="polynomial", per_rank=True)``. The run ends
right after an averaging step; the validation loss is that of the averaged model. Saves
``benchmarks/figures/dynamics_local_sgd_noise.png``.

Command (2-core CPU; the timing is in RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/dynamics_local_sgd_noise.py --seeds 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from _harness import FIGURES, save_figure  # noqa: E402
from lightning.pytorch import Callback
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.callbacks import NoiseAnnealing

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

FIGURE = FIGURES / "dynamics_local_sgd_noise.png"
PERIOD = 8


class CPULocalSGD(DDPStrategy):
    """Lightning's DDPStrategy, registering the DDP comm hook on CPU (gloo) as well as on CUDA."""

    def _register_ddp_hooks(self) -> None:
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)  # fmt: skip


def teacher_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234)  # one teacher for all splits
    w1, w2 = torch.randn(20, 32, generator=gen), torch.randn(32, 5, generator=gen)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n, generator=gen) < 0.1
    y[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=gen)
    return x, y


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ValCurve(Callback):
    """Validation loss of the (just averaged) model after every averaging step."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.points: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step - 1) % (4 * PERIOD) == 0 or trainer.global_step == trainer.max_steps:
            with torch.no_grad():
                self.points.append((trainer.global_step, F.cross_entropy(pl_module.net(self.x), self.y).item()))


def run(seed: int, eta: float | None, steps: int, root: str) -> tuple[list[tuple[int, float]], bool, int]:
    L.seed_everything(seed, verbose=False)
    model = MLP()
    xv, yv = teacher_data(1024, 999)
    curve = ValCurve(xv, yv)
    callbacks: list[Callback] = [curve]
    if eta is not None:
        noise = NoiseAnnealing(eta=eta, gamma=0.55, target="weights", schedule="polynomial", per_rank=True, seed=seed)
        callbacks.insert(0, noise)
    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=0,
                              post_local_gradient_allreduce=False)  # fmt: skip
    strategy = CPULocalSGD(ddp_comm_state=state, ddp_comm_hook=post_localSGD_hook, model_averaging_period=PERIOD)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks)  # fmt: skip
    x, y = teacher_data(2048, seed)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = trainer.strategy.all_gather(flat)  # (2, P): replicas must be equal right after averaging
    in_sync = bool(torch.equal(gathered[0], gathered[1]))
    return curve.points, in_sync, trainer.global_rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50 * PERIOD + 1)  # ends right after an averaging step
    parser.add_argument("--eta", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    curves: dict[str, list[list[tuple[int, float]]]] = {"no noise": [], f"per-rank weight noise eta={args.eta}": []}
    rank = 0
    root = tempfile.gettempdir()
    for seed in range(args.seeds):
        for name, eta in zip(curves, (None, args.eta), strict=True):
            points, in_sync, rank = run(seed, eta, args.steps, root)
            curves[name].append(points)
            if rank == 0:
                print(f"seed {seed} {name}: final val loss {points[-1][1]:.4f} (replicas equal: {in_sync})", flush=True)
    if rank != 0:
        return
    print(f"\n{args.steps} steps, averaging every {PERIOD}")
    print("| training | final validation loss per seed | mean |\n|---|---|---|")
    for name, runs in curves.items():
        finals = [c[-1][1] for c in runs]
        print(f"| {name} | {', '.join(f'{v:.4f}' for v in finals)} | {statistics.mean(finals):.4f} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("tab:blue", "tab:orange"), strict=True):
        for i, c in enumerate(runs):
            steps, vals = zip(*c, strict=True)
            ax.plot(steps, vals, color=color, alpha=0.8, marker=".", label=name if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss of the averaged model")
    ax.set_title(f"local SGD, 2 CPU ranks, averaging every {PERIOD} steps, {args.seeds} seeds")
    ax.legend()
    path = FIGURE if args.eta == 1e-4 else FIGURE.with_name(f"dynamics_local_sgd_noise_eta{args.eta:g}.png")
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
