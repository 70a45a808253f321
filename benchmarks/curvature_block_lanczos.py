"""Top-k eigenvalues with their multiplicities: block Lanczos against restarted Lanczos with locking (issue 21).

Single-vector Lanczos cannot see the second copy of a repeated eigenvalue (its Krylov space holds one vector per
eigenspace). Two ways out, measured here on the same operators from the same random starts:

* ``block``: ``lanczos(op, k, block_size=k)``, block Lanczos in Ruhe's band form (one ``matmat`` of k products per
  block, shared forward and first backward for a Hessian);
* ``locking``: restarted single-vector Lanczos with locking and deflation, as PyHessian deflates its power
  iteration: ``lanczos(k=1)`` to convergence, lock the Ritz vector, restart from a random vector on the deflated
  operator ``(I - Y Y^T) A (I - Y Y^T)``, k times;
* ``single``: today's single-vector ``lanczos(op, k, block_size=1)`` for reference (it misses the copies).

Ground truth: ``torch.linalg.eigvalsh`` of the dense operator (float64). Reported per method: median products,
median wall time, worst relative error of the k values (copies included) over ``--starts`` random starts.

Operators: dense 400 x 400 matrices with a bulk in [0, 3] and top eigenvalues designed as a pair, a triple, a
cluster 1e-6 apart and distinct ones; the Hessian of a ``Linear(32, 2)`` with BoringModel's loss (MSE against
ones: every eigenvalue twice), float64, batch 64; a 10-class MLP classifier (cross-entropy: C - 1 = 9 outlier
eigenvalues close together, Sagun et al. 2017); the tanh MLP of ``curvature_lambda_max.py`` (distinct top values).

Command (2-core CPU, a few minutes)::

    python benchmarks/curvature_block_lanczos.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gd.curvature import DenseOperator, HessianOperator, lanczos


class _Deflated:
    """``(I - Y Y^T) A (I - Y Y^T)`` for orthonormal columns ``Y`` (the locked eigenvectors)."""

    def __init__(self, op, Y: Tensor) -> None:
        self.op, self.Y = op, Y
        self.numel, self.dtype, self.device = op.numel, op.dtype, op.device

    def _project(self, v: Tensor) -> Tensor:
        return v - self.Y @ (self.Y.T @ v) if self.Y.numel() else v

    def matvec(self, v: Tensor) -> Tensor:
        return self._project(self.op.matvec(self._project(v)))


def locking(op, k: int, tol: float, max_iter: int, gen: torch.Generator):
    """Restarted Lanczos with locking: k deflated single-vector runs, each from a random start."""
    Y = torch.zeros(op.numel, 0, dtype=op.dtype)
    values, products = [], 0
    for _ in range(k):
        start = torch.randn(op.numel, generator=gen, dtype=op.dtype)
        start -= Y @ (Y.T @ start)
        res = lanczos(_Deflated(op, Y), k=1, tol=tol, max_iter=max_iter, init=start, generator=gen)
        products += res.num_matvecs
        values.append(res.eigenvalues[0].item())
        y = res.eigenvectors[:, :1] - Y @ (Y.T @ res.eigenvectors[:, :1])
        Y = torch.cat([Y, y / y.norm()], dim=1)
    return torch.tensor(values, dtype=torch.float64).sort(descending=True).values, products


def spectrum_matrix(top: list[float], n: int = 400, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    bulk = 3.0 * torch.rand(n - len(top), generator=g, dtype=torch.float64) ** 2
    eigs = torch.cat([torch.tensor(top, dtype=torch.float64), bulk])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs) @ Q.T


def boring_hessian_op():
    torch.manual_seed(0)
    layer = nn.Linear(32, 2).double()
    x = torch.randn(64, 32, dtype=torch.float64)

    def loss(m, b):
        out = m(b)
        return F.mse_loss(out, torch.ones_like(out))  # Lightning's BoringModel.loss

    return HessianOperator(layer, loss, x)


def classifier_op():
    g = torch.Generator().manual_seed(1)
    centers = 3.0 * torch.randn(10, 20, generator=g, dtype=torch.float64)
    y = torch.arange(10).repeat_interleave(20)
    x = centers[y] + torch.randn(200, 20, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))


def tanh_mlp_op():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 12, generator=g, dtype=torch.float64)
    W1 = torch.randn(12, 64, generator=g, dtype=torch.float64) / 12**0.5
    W2 = torch.randn(64, 3, generator=g, dtype=torch.float64) / 8.0
    Y = torch.tanh(X @ W1) @ W2 * 2.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    return HessianOperator(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (X, Y))


def dense_of(op) -> Tensor:
    if isinstance(op, DenseOperator):
        return op.matrix
    return op.matmat(torch.eye(op.numel, dtype=op.dtype))


def run(name: str, op, ks: list[int], tols: list[float], starts: int, max_iter: int) -> None:
    truth = torch.linalg.eigvalsh(dense_of(op)).flip(0)
    print(f"\n{name} (n = {op.numel}); top eigenvalues: " + ", ".join(f"{v:.6g}" for v in truth[:6].tolist()))
    print("| k | tol | method | median products | median ms | worst rel. error |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        for tol in tols:
            for method in ("single", "block", "locking"):
                prods, times, errs = [], [], []
                for s in range(starts):
                    gen = torch.Generator().manual_seed(100 + s)
                    t0 = time.perf_counter()
                    if method == "locking":
                        values, n = locking(op, k, tol, max_iter, gen)
                    else:
                        res = lanczos(op, k=k, tol=tol, max_iter=max_iter, generator=gen,
                                      block_size=1 if method == "single" else k)  # fmt: skip
                        values, n = res.eigenvalues, res.num_matvecs
                    times.append(1e3 * (time.perf_counter() - t0))
                    prods.append(n)
                    errs.append(((values - truth[:k]).abs() / truth[:k].abs()).max().item())
                print(f"| {k} | {tol:g} | {method} | {statistics.median(prods):g} | {statistics.median(times):.1f} |"
                      f" {max(errs):.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tols = [1e-2, 1e-6]
    for label, top in [
        ("dense, a pair on top [9, 9, 7, 5]", [9.0, 9.0, 7.0, 5.0]),
        ("dense, a triple on top [9, 9, 9, 5]", [9.0, 9.0, 9.0, 5.0]),
        ("dense, a cluster 1e-6 apart [9 + 1e-6, 9, 9 - 1e-6, 7]", [9.0 + 1e-6, 9.0, 9.0 - 1e-6, 7.0]),
        ("dense, distinct [9, 8, 7, 5]", [9.0, 8.0, 7.0, 5.0]),
    ]:
        run(label, DenseOperator(spectrum_matrix(top)), [2, 3], tols, args.starts, args.max_iter)
    run("Hessian of Linear(32, 2), BoringModel's MSE loss, batch 64", boring_hessian_op(), [2, 3], tols,
        args.starts, 66)  # fmt: skip
    run("Hessian of a 10-class MLP classifier (20-32-10, cross-entropy)", classifier_op(), [3, 9], tols,
        args.starts, args.max_iter)  # fmt: skip
    run("Hessian of the tanh MLP of curvature_lambda_max.py (MSE)", tanh_mlp_op(), [2, 3], tols, args.starts,
        args.max_iter)  # fmt: skip


if __name__ == "__main__":
    main()
