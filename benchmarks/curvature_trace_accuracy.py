"""Time to a given accuracy of the Hessian trace: Hutchinson, Hutch++ and XTrace against PyHessian (issue 21).

For each model the exact trace comes from the dense Hessian (float64, every column by a product). Then, for every
method and product budget ``m`` on a grid, ``--seeds`` independent estimates give the median relative error (an
estimator's error depends only on the matrix and its probes, so these run on the dense Hessian: the same code,
the same probes); the products *to* an accuracy are the smallest ``m`` of the grid whose median error is within it
(1% and 0.5%), and the time to it is the median wall time of ``--repeats`` full estimates at that ``m`` on the
model's own operator (construction, products and reduction; one intra-op thread). PyHessian 0.1's
``hessian(...).trace(maxIter=m, tol=-inf)`` is Hutchinson's estimator (Rademacher probes, one at a time): it needs
Hutchinson's products, and it is timed at that count (3 of its own runs there are printed as a check).

Models (float64, eval mode):

* ``cnn``: the vision quickstart's data (8x8 digits, 10 classes, batch 128) through a small CNN
  (conv 8 - BN - ReLU - conv 24 - BN - ReLU - pool 4x4 - linear, 5.8K parameters), after 100 SGD steps;
* ``decoder``: the package's LLaMA decoder shrunk to one block of width 16 (8.2K parameters, tied byte
  embeddings) on 4 x 32 bytes of ``typing.py``, after 100 AdamW steps.

Command (2-core CPU, ~10 minutes)::

    python benchmarks/curvature_trace_accuracy.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import typing
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gd.curvature import DenseOperator, HessianOperator, hutchinson_trace
from lightning_gd.recipes.llama import Llama, LlamaConfig

warnings.filterwarnings("ignore")
GRID = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGETS = (0.01, 0.005)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.head = nn.Linear(24 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def cnn_problem():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = SmallCNN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    batch = (x[:128], y[:128])
    return model, (lambda m, b: F.cross_entropy(m(b[0]), b[1])), batch, nn.CrossEntropyLoss()


def decoder_problem():
    text = open(typing.__file__, "rb").read()[:20000]
    data = torch.tensor(list(text), dtype=torch.long)
    cfg = LlamaConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    torch.manual_seed(0)
    model = Llama(cfg).double()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def windows(n):
        starts = torch.randint(0, len(data) - 33, (n,), generator=g)
        w = torch.stack([data[s : s + 33] for s in starts])
        return w[:, :-1], w[:, 1:]

    def loss_fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    for _ in range(100):
        batch = windows(8)
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model, loss_fn, windows(4), None


def dense_hessian(op: HessianOperator) -> torch.Tensor:
    """Every column by a product, 256 per ``matmat`` (the graph of the first backward shared between them)."""
    n = op.numel
    cols = []
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        E = torch.zeros(n, stop - start, dtype=op.dtype)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        cols.append(op.matmat(E))
    H = torch.cat(cols, dim=1)
    return 0.5 * (H + H.T)


def ours(model, loss_fn, batch, method, m, seed):
    op = HessianOperator(model, loss_fn, batch, hvp="double_backward")
    return hutchinson_trace(op, m, method=method, generator=torch.Generator().manual_seed(seed)).value


def pyhessian_values(model, criterion, batch, m, seed):
    from pyhessian import hessian

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    h = hessian(model, criterion, data=batch, cuda=False)
    vals = h.trace(maxIter=m, tol=float("-inf"))
    model.zero_grad(set_to_none=True)
    assert len(vals) == m
    return vals


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name, problem, args) -> None:
    model, loss_fn, batch, criterion = problem
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    cache = args.cache / f"curvature_trace_accuracy_{name.split()[0]}.pt" if args.cache else None
    if cache is not None and cache.is_file():
        H = torch.load(cache)
    else:
        H = dense_hessian(HessianOperator(model, loss_fn, batch, hvp="double_backward"))
        if cache is not None:
            torch.save(H, cache)
    truth = torch.trace(H).item()
    eigs = torch.linalg.eigvalsh(H)
    print(f"\n## {name}: {n} parameters, exact trace {truth:.6g} (dense Hessian, {time.perf_counter() - t0:.0f} s);"
          f" ||H||_F / tr(H) = {torch.linalg.matrix_norm(H).item() / abs(truth):.3g}; eigenvalues"
          f" {eigs[-1].item():.4g} .. {eigs[0].item():.4g}")  # fmt: skip
    # An estimator's error depends on the matrix and the probes only: the error curves are measured on the dense
    # Hessian (the same functions, the same probes), the times on the model's own operator.
    dense = DenseOperator(H)
    grid = [m for m in GRID if m <= args.max_products]
    errors: dict[str, dict[int, float]] = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        errors[method] = {}
        for m in grid:
            if method == "hutchinson" and m > 64:
                continue  # closed form below
            if m > grid[0] and min(errors[method].values()) <= min(TARGETS) / 2:
                break  # well past the targets: the larger budgets cost time and say nothing new
            errs = []
            for s in range(args.seeds):
                est = hutchinson_trace(dense, m, method=method, generator=torch.Generator().manual_seed(s))
                errs.append(abs(est.value - truth) / abs(truth))
            errors[method][m] = statistics.median(errs)
    print("\nmedian relative error over", args.seeds, "seeds:")
    print("| products | " + " | ".join(errors) + " |")
    print("|---|" + "---|" * len(errors))
    for m in grid:
        print(f"| {m} | " + " | ".join(f"{errors[k][m]:.2%}" if m in errors[k] else "" for k in errors) + " |")

    # Hutchinson's error is a mean of m i.i.d. quadratic forms of variance 2 (||H||_F^2 - sum_i H_ii^2) for
    # Rademacher probes: its median |error| is 0.6745 sigma / sqrt(m) (central limit), so the products it needs
    # follow in closed form beyond the grid (checked against the measured curve on the grid).
    var1 = 2 * (H.square().sum() - H.diagonal().square().sum()).item()

    def hutchinson_needs(target: float) -> int:
        return math.ceil(var1 * (0.6745 / (target * abs(truth))) ** 2)

    for m in (16, 64):
        print(f"Hutchinson in closed form: median error {0.6745 * math.sqrt(var1 / m) / abs(truth):.2%} at {m}"
              f" products (measured over {args.seeds} seeds: {errors['hutchinson'][m]:.2%})")  # fmt: skip

    def products_to(method, target):
        if method == "hutchinson":
            return hutchinson_needs(target)
        return next((m for m in grid if errors[method][m] <= target), None)

    # Time per estimate: measured at the products needed, or, beyond --time-limit products, measured at
    # --time-limit and scaled linearly (Hutchinson's cost is linear in its probes).
    def time_at(fn, m):
        if m <= args.time_limit:
            return timed(lambda: fn(m), args.repeats)
        return timed(lambda: fn(args.time_limit), args.repeats) * m / args.time_limit

    print("\n| method | target | products | s per estimate | PyHessian s / this |")
    print("|---|---|---|---|---|")
    for target in TARGETS:
        rows = {}
        for method in ("hutchinson", "hutch++", "xtrace"):
            m = products_to(method, target)
            fn = lambda k, method=method: ours(model, loss_fn, batch, method, k, 0)  # noqa: E731
            rows[method] = (m, time_at(fn, m) if m is not None else math.nan)
        if criterion is not None:  # PyHessian's estimator is Hutchinson's: the same products to the target
            m = rows["hutchinson"][0]
            t = time_at(lambda k: pyhessian_values(model, criterion, batch, k, 0), m)
            rows["PyHessian (Hutchinson)"] = (m, t)
        ref = rows.get("PyHessian (Hutchinson)", (None, math.nan))[1]
        for method, (m, t) in rows.items():
            shown = f"> {grid[-1]}" if m is None else str(m)
            print(f"| {method} | {target:.1%} | {shown} | {t:.3g} | {ref / t:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-products", type=int, default=1024)
    parser.add_argument("--only", choices=["cnn", "decoder"], default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-limit", type=int, default=256, help="most products timed in one estimate")
    parser.add_argument("--cache", type=Path, default=Path("/tmp"), help="keep the dense Hessians here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {__import__('os').getloadavg()[0]:.1f}")
    if args.only in (None, "cnn"):
        run("cnn (8x8 digits)", cnn_problem(), args)
    if args.only in (None, "decoder"):
        run("decoder (LLaMA, 1 block, width 16)", decoder_problem(), args)


if __name__ == "__main__":
    main()
