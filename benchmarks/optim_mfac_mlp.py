"""M-FAC against SGD (momentum) and Adam on a small MLP, equal steps, with the memory M-FAC used.

Data: scikit-learn's digits (1,797 8x8 images, 10 classes; 1,438 train / 359 test, fixed split), inputs scaled
to [0, 1]. Model: MLP 64-64-10 with tanh (4,810 parameters). Mini-batches of 32, ``--steps`` steps, each
optimizer at every learning rate of its grid (best by final training loss reported), constant lr, ``--seeds``
seeds. M-FAC: a window of ``--num-grads`` gradients, damp ``--damp`` (the paper's optimizer defaults are 1024 and
1e-5; its runs used damp 1e-6 to 1e-4 and 512-1024 gradients on ResNets).

    python benchmarks/optim_mfac_mlp.py --steps 400 --seeds 0 1 2

Prints a Markdown table and writes ``benchmarks/figures/optim_mfac_mlp.png`` (training loss of the best lr).
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _harness import FIGURES, save_figure  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gd.optim import MFAC  # noqa: E402


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return x[:1438], y[:1438], x[1438:], y[1438:]


def _run(make, steps: int, seed: int, data) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed + 100)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(xtr), ytr).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"curve": losses, "train_loss": train_loss, "acc": acc, "state_bytes": state, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--damp", type=float, default=1e-4)
    parser.add_argument("--out", default=str(FIGURES / "optim_mfac_mlp.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = _data()
    grids = {
        "SGD (momentum 0.9)": {
            lr: (lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9)) for lr in (0.03, 0.1, 0.3, 1.0)
        },
        "Adam": {lr: (lambda p, lr=lr: torch.optim.Adam(p, lr=lr)) for lr in (1e-3, 3e-3, 1e-2, 3e-2)},
        f"M-FAC (m={args.num_grads})": {
            lr: (lambda p, lr=lr: MFAC(p, lr=lr, num_grads=args.num_grads, damp=args.damp))
            for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        },
    }  # fmt: skip
    start = time.perf_counter()
    print("| optimizer | best lr | final train loss (mean of seeds) | test accuracy | optimizer state | time / step |")
    print("|---|---|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, grid in grids.items():
        results = {lr: [_run(make, args.steps, s, data) for s in args.seeds] for lr, make in grid.items()}
        finite = {lr: r for lr, r in results.items() if all(x["train_loss"] == x["train_loss"] for x in r)}
        best = min(finite, key=lambda lr: statistics.mean(x["train_loss"] for x in finite[lr]))
        rs = results[best]
        loss = statistics.mean(x["train_loss"] for x in rs)
        acc = statistics.mean(x["acc"] for x in rs)
        per_step = statistics.mean(x["wall_s"] for x in rs) / args.steps * 1e3
        grid_txt = ", ".join(f"{lr:g}: {statistics.mean(x['train_loss'] for x in r):.3f}" for lr, r in results.items())
        print(
            f"| {name} | {best:g} | {loss:.4f} | {100 * acc:.1f}% | {rs[0]['state_bytes'] / 1024:.1f} KiB | "
            f"{per_step:.2f} ms |  <!-- grid: {grid_txt} -->"
        )
        curve = torch.tensor([x["curve"] for x in rs]).mean(0)
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], 20, 1)[0, 0]
        ax.plot(range(10, 10 + len(smooth)), smooth, label=f"{name}, lr {best:g}")
    params = sum(p.numel() for p in nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).parameters())
    print(f"\n{params} parameters; M-FAC window {args.num_grads} x {params} floats = "
          f"{args.num_grads * params * 4 / 1024:.1f} KiB; total {time.perf_counter() - start:.0f} s")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average of 20 batches)")
    ax.set_title(f"Digits MLP: M-FAC vs SGD and Adam (best lr each, {len(args.seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, args.out, dpi=120)


if __name__ == "__main__":
    main()
