"""Hessian-trace speed: lightning_gd vs PyHessian 0.1 vs curvlinops 3.0 at EQUAL probe counts.

Claim checked: one Hutchinson trace estimate (N Rademacher probes, same model, same batch, eval mode,
float32) with ``lightning_gd.curvature.hutchinson_trace`` is >= 2x faster than PyHessian's
``hessian(...).trace(maxIter=N, tol=-inf)`` and no slower than curvlinops'
``hutchinson_trace(HessianLinearOperator(...), N)``; the three estimates agree within a few standard
errors.

Timed: one full estimate from a fresh operator (construction + N products + reduction), for every tool:
PyHessian's constructor does the create_graph backward, curvlinops' constructor is built with
``check_deterministic=False`` (its default True adds extra products; we give the peer its fastest
setting). ``tol=-inf`` makes PyHessian run exactly N probes (its early stop ``|mean - prev| / (prev +
1e-6) < tol`` can never fire; with tol=0 a negative running trace would stop it at once); the script
asserts that N values came back. Rows are interleaved round-robin and each timing is the median over
``--repeats`` (after a 2-probe warm-up of every row), so background load hits all tools alike. One
intra-op thread by default (``--threads``): on the shared 2-core machine two threads made single timings
swing 5-10x whenever the other engineer's jobs ran. Table (c) times one single-vector product, the
Lanczos / SharpnessTracker path, for both HVP methods.

Models: (a) ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, BatchNorm with non-trivial running
statistics, 272K params) on a random batch of 32 images 32x32x3, cross-entropy over 10 classes;
(b) MLP 784-512-512-10 (ReLU, 670K params), batch 256.

Command (2-core CPU, about 3.5 minutes)::

    python benchmarks/curvature_trace_speed.py --probes 20 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_gd.curvature import HessianOperator, hutchinson_trace

warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def make_resnet(batch: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = ResNet20()
    # Non-trivial BN running statistics (as after training), then eval mode for every tool.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(batch, 3, 32, 32))
    model.eval()
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def make_mlp(batch: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model.eval()
    return model, torch.randn(batch, 784), torch.randint(0, 10, (batch,))


# ---------------------------------------------------------------------------------------------- runners
def run_ours(model, x, y, n, hvp, ppm, seed):
    crit = nn.CrossEntropyLoss()
    op = HessianOperator(model, lambda m, b: crit(m(b[0]), b[1]), (x, y), hvp=hvp, mode="eval")
    est = hutchinson_trace(op, n, generator=torch.Generator().manual_seed(seed), probes_per_matmat=ppm)
    assert est.num_matvecs == n
    return est.value, est.stderr


def run_pyhessian(model, x, y, n, seed):
    from pyhessian import hessian

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    vals = h.trace(maxIter=n, tol=float("-inf"))
    model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph gradients in .grad
    assert len(vals) == n, f"PyHessian ran {len(vals)} probes, not {n}"
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(n)


def run_curvlinops(model, x, y, n, seed):
    from curvlinops import HessianLinearOperator
    from curvlinops import hutchinson_trace as cl_trace

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    return float(cl_trace(H, n)), math.nan  # curvlinops returns the estimate only


def bench(name, model, x, y, args):
    numel = sum(p.numel() for p in model.parameters())
    n = args.probes
    ppm = args.ppm
    runners = {
        f"ours double_backward, probes_per_matmat={ppm}": lambda n, s: run_ours(
            model, x, y, n, "double_backward", ppm, s
        ),
        f"ours forward_over_reverse, probes_per_matmat={ppm}": lambda n, s: run_ours(
            model, x, y, n, "forward_over_reverse", ppm, s
        ),
        f"ours auto, probes_per_matmat={ppm}": lambda n, s: run_ours(model, x, y, n, "auto", ppm, s),
        f"ours auto, probes_per_matmat={n}": lambda n, s: run_ours(model, x, y, n, "auto", n, s),
        "PyHessian 0.1 trace": lambda n, s: run_pyhessian(model, x, y, n, s),
        "curvlinops 3.0.1 hutchinson_trace": lambda n, s: run_curvlinops(model, x, y, n, s),
    }
    times = {k: [] for k in runners}
    values = {k: [] for k in runners}
    for fn in runners.values():  # warm-up (allocator, vmap tracing), 2 probes
        fn(2, 0)
    for r in range(args.repeats):  # round-robin: background load hits every tool alike
        for i, (key, fn) in enumerate(runners.items()):
            t0 = time.perf_counter()
            val, se = fn(n, args.seed + 1000 * i + r)  # independent probes for every tool and repeat
            times[key].append(time.perf_counter() - t0)
            values[key].append((val, se))
    med = {k: statistics.median(v) for k, v in times.items()}
    t_py = med["PyHessian 0.1 trace"]
    t_cl = med["curvlinops 3.0.1 hutchinson_trace"]
    se_ref = statistics.median(se for k, v in values.items() if not math.isnan(v[0][1]) for _, se in v)
    print(f"\n### {name}: {numel:,} parameters, batch {x.shape[0]}, {n} probes, median of {args.repeats}\n")
    print("| method | median s / estimate | min s | PyHessian / this | curvlinops / this | trace (mean of repeats) |")
    print("|---|---|---|---|---|---|")
    for key in runners:
        mean_val = statistics.fmean(v for v, _ in values[key])
        print(
            f"| {key} | {med[key]:.3f} | {min(times[key]):.3f} | {t_py / med[key]:.2f}x | {t_cl / med[key]:.2f}x"
            f" | {mean_val:.4g} |"
        )
    # Consistency: every estimate (independent probes) against the grand mean, in units of one estimate's
    # standard error (median over the estimates that report one: the same Hutchinson estimator, same N).
    all_vals = [v for vs in values.values() for v, _ in vs]
    grand = statistics.fmean(all_vals)
    dev = {k: max(abs(v - grand) for v, _ in vs) / se_ref for k, vs in values.items()}
    print(
        f"\nConsistency: grand mean {grand:.4g}, stderr of one estimate {se_ref:.3g}; largest |estimate - mean| /"
        " stderr per tool: " + ", ".join(f"{k.split(',')[0]} {d:.1f}" for k, d in dev.items())
    )
    return med, dev


def bench_matvec(name, model, x, y, args):
    """Single-vector products (what Lanczos / SharpnessTracker use): double backward vs forward-over-reverse."""
    crit = nn.CrossEntropyLoss()
    ops = {
        hvp: HessianOperator(model, lambda m, b: crit(m(b[0]), b[1]), (x, y), hvp=hvp)
        for hvp in ("double_backward", "forward_over_reverse")
    }
    v = torch.randn(next(iter(ops.values())).numel, generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in ops}
    for op in ops.values():
        op.matvec(v)
    for _ in range(args.matvec_repeats):
        for k, op in ops.items():
            t0 = time.perf_counter()
            op.matvec(v)
            times[k].append(time.perf_counter() - t0)
    db, fr = statistics.median(times["double_backward"]), statistics.median(times["forward_over_reverse"])
    print(f"| {name} | {db * 1e3:.1f} | {fr * 1e3:.1f} | {fr / db:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--ppm", type=int, default=10, help="probes_per_matmat for the batched rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--models", default="resnet,mlp")
    parser.add_argument("--matvec-repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: robust to a busy shared 2-core machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float32, eval mode")
    models = {
        "(a) ResNet-20, 32x32": make_resnet(args.resnet_batch, args.seed),
        "(b) MLP 784-512-512-10": make_mlp(args.mlp_batch, args.seed),
    }
    if "resnet" not in args.models:
        models.pop("(a) ResNet-20, 32x32")
    if "mlp" not in args.models:
        models.pop("(b) MLP 784-512-512-10")
    for name, (model, x, y) in models.items():
        bench(name, model, x, y, args)
    print(f"\n### (c) One Hessian-vector product (matvec, as in Lanczos), median of {args.matvec_repeats}\n")
    print("| model | double_backward ms | forward_over_reverse ms | forward_over_reverse / double_backward |")
    print("|---|---|---|---|")
    for name, (model, x, y) in models.items():
        bench_matvec(name, model, x, y, args)


if __name__ == "__main__":
    main()
