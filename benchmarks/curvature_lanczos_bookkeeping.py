"""Lanczos bookkeeping against the Hessian-vector product it wraps, before and after issue 13.

Runs ``lanczos(op, k=1, tol=1e-2)`` on the LLaMA-style decoder (``tiny`` preset, 771K parameters,
next-byte cross-entropy on bytes of the interpreter's own ``typing.py``) with one CPU thread, and times
separately the products (inside ``op.matvec``) and everything else (the bookkeeping: Gram-Schmidt, basis
storage, Ritz values). Two settings:

* ``float64``: the model and the products in float64 (the issue's check), batch ``--f64-batch``;
* ``float32``: the quickstart's precision and batch (16 windows x 128 bytes);
* ``restarts``: products and accuracy of the same check when the basis is capped at ``max_basis`` vectors
  (thick restart), against a tol=1e-10 reference, over ``--starts`` random start vectors.

"before" is the process of commit 95ff168 (``git show 95ff168:lightning_gd/curvature/_krylov.py`` and
``lanczos.py``, loaded as modules), "after" the working tree; they run interleaved on the same operator from the
same start vector, ``--repeats`` times each, and the medians are printed side by side.

Command (2-core CPU, about 2 minutes)::

    python benchmarks/curvature_lanczos_bookkeeping.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_gd.curvature import HessianOperator
from lightning_gd.curvature import lanczos as new_lanczos
from lightning_gd.recipes.llama import Llama, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "95ff168"


def load_old(commit: str = OLD_COMMIT) -> types.FunctionType:
    """``lanczos`` as of ``commit``, with its own ``_LanczosProcess``."""

    def source(path: str) -> str:
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout  # fmt: skip

    krylov = types.ModuleType("old_krylov")
    exec(compile(source("lightning_gd/curvature/_krylov.py"), "old_krylov.py", "exec"), krylov.__dict__)
    sys.modules["old_krylov"] = krylov
    text = source("lightning_gd/curvature/lanczos.py").replace("lightning_gd.curvature._krylov", "old_krylov")
    module = types.ModuleType("old_lanczos")
    module.__dict__["__name__"] = "old_lanczos"
    sys.modules["old_lanczos"] = module
    exec(compile(text, "old_lanczos.py", "exec"), module.__dict__)
    return module.lanczos


class Timed:
    """The operator, with the time spent inside its products accumulated."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.seconds, self.count = op, 0.0, 0
        self.numel, self.dtype, self.device = op.numel, op.dtype, op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - start
        self.count += 1
        return out


def corpus(batch: int, seq: int) -> torch.Tensor:
    data = Path(sysconfig.get_paths()["stdlib"], "typing.py").read_bytes()
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g).tolist()
    return torch.tensor([list(data[s : s + seq + 1]) for s in starts], dtype=torch.long)


def run(dtype: torch.dtype, batch: int, seq: int, repeats: int, old_lanczos, before: str = OLD_COMMIT) -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).to(dtype)
    tokens = corpus(batch, seq)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())

    op = HessianOperator(model, loss_fn, tokens, hvp="double_backward")
    init = torch.randn(op.numel, generator=torch.Generator().manual_seed(1), dtype=dtype)
    rows = {"before": [], "after": []}
    for _ in range(repeats):
        for name, fn in (("before", old_lanczos), ("after", new_lanczos)):
            timed = Timed(op)
            start = time.perf_counter()
            res = fn(timed, k=1, tol=1e-2, init=init)
            total = time.perf_counter() - start
            rows[name].append((total, timed.seconds, timed.count, res.eigenvalues[0].item()))
    print(f"\n{str(dtype).replace('torch.', '')}, batch {batch} x {seq}, {op.numel:,} parameters, one thread")
    print("| code | products | lambda_max | product ms | step ms | bookkeeping ms / step | bookkeeping / product |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        n = runs[0][2]
        product = statistics.median(r[1] / r[2] for r in runs) * 1e3
        step = statistics.median(r[0] / r[2] for r in runs) * 1e3
        book = statistics.median((r[0] - r[1]) / r[2] for r in runs) * 1e3
        print(f"| {name} ({before if name == 'before' else 'working tree'}) | {n} | {runs[0][3]:.6g} |"
              f" {product:.1f} | {step:.1f} | {book:.1f} | {book / product:.1%} |")  # fmt: skip


def restarts(batch: int, seq: int, starts: int) -> None:
    """HVPs and accuracy of ``lanczos(k=1, tol=1e-2)`` when the basis is capped (thick restart), float64."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).double()
    tokens = corpus(batch, seq)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())

    op = HessianOperator(model, loss_fn, tokens, hvp="double_backward")
    exact = new_lanczos(op, k=1, tol=1e-10, max_iter=200).eigenvalues[0].item()
    print(f"\nmax_basis against products, float64 tiny decoder, batch {batch} x {seq}, {starts} random starts;"
          f" reference lambda_max {exact:.10g} (tol 1e-10)")  # fmt: skip
    print("| max_basis | extra vectors (basis + residual + Ritz) | median HVPs | max HVPs | worst rel. error |")
    print("|---|---|---|---|---|")
    for m in (None, 8, 6, 4, 3):
        hvps, errs = [], []
        for s in range(starts):
            init = torch.randn(op.numel, generator=torch.Generator().manual_seed(100 + s), dtype=torch.float64)
            res = new_lanczos(op, k=1, tol=1e-2, init=init, max_basis=m)
            hvps.append(res.num_matvecs)
            errs.append(abs(res.eigenvalues[0].item() - exact) / abs(exact))
        size = "max_iter (none)" if m is None else str(m)
        print(f"| {size} | {'iterations + 2' if m is None else m + 2} | {statistics.median(hvps):g} | {max(hvps)} |"
              f" {max(errs):.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--f64-batch", type=int, nargs=2, default=(4, 64), metavar=("B", "T"))
    parser.add_argument("--only", choices=("float64", "float32", "restarts"), default=None)
    parser.add_argument("--starts", type=int, default=5, help="random starts in the max_basis table")
    parser.add_argument("--before", default=OLD_COMMIT, help="the commit whose Lanczos is 'before'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = load_old(args.before)
    if args.only in (None, "float64"):
        run(torch.float64, *args.f64_batch, args.repeats, old, args.before)
    if args.only in (None, "float32"):
        run(torch.float32, 16, 128, args.repeats, old, args.before)
    if args.only in (None, "restarts"):
        restarts(*args.f64_batch, args.starts)


if __name__ == "__main__":
    main()
