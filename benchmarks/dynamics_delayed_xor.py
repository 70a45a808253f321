"""Delayed XOR with a tanh RNN, with and without gradient flossing (Engelken, NeurIPS 2023).

Claim checked: on a delayed XOR y_t = x_{t-d} XOR x_{t-2d}, at a delay where plain BPTT mostly fails, flossing
the Lyapunov exponents towards zero before (and during) training raises the success rate.

Setup (sized down from the paper's N = 80, k = 75, d = 10-70 for 2 shared CPU cores): random bits x_t fed as
+-1 to ``nn.RNN(1, N, tanh)`` (N = ``--hidden``) with torch's default initialization (exponents about -0.5 to
-0.7: gradients vanish over 2d steps), a linear readout, binary cross-entropy on every step t >= 2d of sequences
of length 2d + 10, batch 32, Adam (``--lr``), gradient-norm clipping 1.0 (the paper's task training: AdamW with
clipping), ``--steps`` optimizer steps. Flossing: ``GradientFlossing(k=--k, pre_train_steps=--pre,
every_n_steps=--every, floss_steps=--floss, max_rounds=2, sequence_length=2d + 10, warmup=10, batch_size=8,
lr=--floss-lr)`` with the task's own input distribution (bits) through ``flossing_dynamics``. A run succeeds when
its accuracy on 1,024 fresh sequences (steps t >= 2d) is at least ``--threshold`` (95%). Saves
``benchmarks/figures/dynamics_delayed_xor.png`` (accuracy per seed, and seed 0's spectrum over training) and
keeps the callback's own plot of seed 0 as ``benchmarks/figures/dynamics_delayed_xor_callback_plot.png``.

Command (2-core CPU; the timing is in RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/dynamics_delayed_xor.py --seeds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gd.callbacks import GradientFlossing  # noqa: E402
from lightning_gd.dynamics import RecurrentDynamics, recurrent_dynamics  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

FIGURE = FIGURES / "dynamics_delayed_xor.png"


def xor_data(n: int, d: int, T: int, seed: int) -> tuple[Tensor, Tensor]:
    """Bits fed as +-1, shape (n, T, 1); targets y_t = x_{t-d} XOR x_{t-2d} (0 before t = 2d), (n, T)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, T), generator=gen)
    y = torch.zeros(n, T)
    y[:, 2 * d :] = (bits[:, d : T - d] ^ bits[:, : T - 2 * d]).float()
    return (2.0 * bits - 1.0).unsqueeze(-1), y


class DelayedXOR(L.LightningModule):
    def __init__(self, hidden: int, d: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.rnn = nn.RNN(1, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, T, N)
        return self.readout(out).squeeze(-1)  # (B, T)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)[:, 2 * self.d :]
        return F.binary_cross_entropy_with_logits(logits, y[:, 2 * self.d :])

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            pred = self(x)[:, 2 * self.d :] > 0
        return (pred == y[:, 2 * self.d :].bool()).float().mean().item()

    def flossing_dynamics(self) -> RecurrentDynamics:
        dyn = recurrent_dynamics(self.rnn)

        def bits(T: int, B: int, gen: torch.Generator) -> Tensor:  # the task's own inputs, (T, B, 1)
            return 2.0 * torch.randint(0, 2, (T, B, 1), generator=gen).float() - 1.0

        return RecurrentDynamics(dyn.step, dyn.state_size, dyn.input_size, sample_inputs=bits)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def run(seed: int, floss: bool, args: argparse.Namespace, root: str) -> dict:
    L.seed_everything(seed, verbose=False)
    T = 2 * args.delay + 10
    model = DelayedXOR(args.hidden, args.delay, args.lr)
    x, y = xor_data(32 * args.steps, args.delay, T, seed)
    callbacks = []
    flosser = None
    if floss:
        flosser = GradientFlossing(
            k=args.k,
            pre_train_steps=args.pre,
            every_n_steps=args.every,
            floss_steps=args.floss,
            max_rounds=2,
            sequence_length=T,
            warmup=10,
            batch_size=8,
            lr=args.floss_lr,
            plot=seed == 0,  # GradientFlossing's own spectrum-over-training figure, kept for seed 0
            seed=seed,
        )
        callbacks.append(flosser)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    xt, yt = xor_data(1024, args.delay, T, 10_000 + seed)
    result = {"acc": model.accuracy(xt, yt), "time": time.perf_counter() - start}
    if flosser is not None:
        result["history"] = flosser.history
        png = os.path.join(root, "lyapunov_spectrum.png")
        if seed == 0 and os.path.isfile(png) and not args.no_figure:
            shutil.copy(png, FIGURE.replace(".png", "_callback_plot.png"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--delay", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pre", type=int, default=60)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--floss", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--k", type=int, default=48)
    parser.add_argument("--floss-lr", type=float, default=2e-2)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {"BPTT": [], "BPTT + flossing": []}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            for name, floss in (("BPTT", False), ("BPTT + flossing", True)):
                r = run(seed, floss, args, root)
                results[name].append(r)
                print(f"seed {seed} {name:16s} accuracy {r['acc']:.3f} ({r['time']:.0f} s)", flush=True)
    print(f"\ndelay d = {args.delay}, N = {args.hidden}, {args.steps} steps, success = accuracy >= {args.threshold}")
    print("| training | successes | accuracy per seed | mean s / run |\n|---|---|---|---|")
    for name, rs in results.items():
        accs = [r["acc"] for r in rs]
        wins = sum(a >= args.threshold for a in accs)
        mean_t = sum(r["time"] for r in rs) / len(rs)
        print(f"| {name} | {wins} / {len(rs)} | {', '.join(f'{a:.3f}' for a in accs)} | {mean_t:.0f} |")
    hist = results["BPTT + flossing"][0]["history"]
    for step, phase, lam in hist:
        print(f"seed 0 spectrum at step {step} ({phase}): max {max(lam):+.3f}, mean {sum(lam) / len(lam):+.3f}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.no_figure:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rs) in enumerate(results.items()):
        ax0.scatter([i] * len(rs), [r["acc"] for r in rs], s=40, alpha=0.7, label=name)
    ax0.axhline(args.threshold, color="black", ls="--", lw=0.8, label=f"success >= {args.threshold}")
    ax0.set_xticks([0, 1], list(results))
    ax0.set_ylabel("test accuracy (t >= 2d)")
    ax0.set_title(f"delayed XOR, d = {args.delay}, N = {args.hidden}, {args.seeds} seeds")
    ax0.legend(fontsize=8)
    for step, phase, lam in hist:
        ax1.plot(range(1, len(lam) + 1), lam, marker=".", label=f"step {step} ({phase})")
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_xlabel("exponent index i")
    ax1.set_ylabel("Lyapunov exponent lambda_i (per step)")
    ax1.set_title("seed 0: spectrum over training (GradientFlossing.history)")
    ax1.legend(fontsize=7)
    save_figure(fig, FIGURE, dpi=100)


if __name__ == "__main__":
    main()
