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
import json
import math
import statistics
import time
import typing
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_gd.curvature import DenseOperator, HessianOperator, hutchinson_trace
from lightning_gd.recipes.llama import Llama, LlamaConfig

warnings.filterwarnings("ignore")
GRID = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
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
    return model, loss_fn, windows(4), nn.CrossEntropyLoss()


class _Flat(nn.Module):
    """For PyHessian, whose loss is ``criterion(model(x), y)``: the decoder's logits as ``(batch * time, vocab)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits.reshape(-1, logits.shape[-1])


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

    if batch[1].ndim > 1:  # a sequence model: flatten its logits and targets
        model, batch = _Flat(model), (batch[0], batch[1].reshape(-1))
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    # PyHessian fails on the decoder as is ("derivative for ..._scaled_dot_product_flash_attention_for_cpu_backward
    # is not implemented": the fused attention kernel has no double backward). It is given the math kernel.
    with sdpa_kernel(SDPBackend.MATH):
        h = hessian(model, criterion, data=batch, cuda=False)
        vals = h.trace(maxIter=m, tol=float("-inf"))
    model.zero_grad(set_to_none=True)
    assert len(vals) == m
    return vals


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
    curves = cache.with_suffix(f".errors{args.seeds}.json") if cache is not None else None
    if curves is not None and curves.is_file():
        errors = {k: {int(m): e for m, e in v.items()} for k, v in json.loads(curves.read_text()).items()}
    for method in () if errors else ("hutchinson", "hutch++", "xtrace"):
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
    if curves is not None:
        curves.write_text(json.dumps(errors))
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
        """The smallest grid budget from which on the median error stays within the target (10 seeds are noisy:
        a first lucky crossing is not counted)."""
        if method == "hutchinson":
            return hutchinson_needs(target)
        measured = [m for m in grid if m in errors[method]]
        ok = [m for i, m in enumerate(measured) if all(errors[method][k] <= target for k in measured[i:])]
        return ok[0] if ok else None

    print("\n| method | target | products | s per estimate | PyHessian s / this |")
    print("|---|---|---|---|---|")
    jobs = {}  # (target, method) -> (products, timed products, function of a budget)
    for target in TARGETS:
        for method in ("hutchinson", "hutch++", "xtrace"):
            m = products_to(method, target)
            if m is not None:
                fn = lambda k, method=method: ours(model, loss_fn, batch, method, k, 0)  # noqa: E731
                jobs[target, method] = (m, min(m, args.time_limit), fn)
        m = products_to("hutchinson", target)  # PyHessian's estimator is Hutchinson's: the same products
        fn = lambda k: pyhessian_values(model, criterion, batch, k, 0)  # noqa: E731
        jobs[target, "PyHessian (Hutchinson)"] = (m, min(m, args.time_limit), fn)
    # Round-robin repeats, so that the machine's load hits every row alike; beyond --time-limit products an
    # estimate is timed at --time-limit and scaled linearly (Hutchinson's cost is linear in its probes).
    samples: dict = {key: [] for key in jobs}
    for _ in range(args.repeats):
        for key, (m, k, fn) in jobs.items():
            t0 = time.perf_counter()
            fn(k)
            samples[key].append((time.perf_counter() - t0) * m / k)
    for target in TARGETS:
        ref = statistics.median(samples[target, "PyHessian (Hutchinson)"])
        for method in ("hutchinson", "hutch++", "xtrace", "PyHessian (Hutchinson)"):
            if (target, method) not in jobs:
                print(f"| {method} | {target:.1%} | > {grid[-1]} | | |")
                continue
            m, k, _ = jobs[target, method]
            t = statistics.median(samples[target, method])
            scaled = f" (timed at {k})" if k < m else ""
            print(f"| {method} | {target:.1%} | {m}{scaled} | {t:.3g} | {ref / t:.2f}x |")


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
