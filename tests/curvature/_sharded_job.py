"""One 2-process gloo job for ``test_curvature_sharded.py``: the estimators on sharded operators against unsharded ones.

Each rank (``torch.multiprocessing.spawn``; ``tests/helpers/ddp.py``'s runner gives ``MASTER_ADDR``/``MASTER_PORT``)
runs every scenario and saves ``OUT/rank<r>.pt``; the test compares. No Lightning: this is the math layer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gd.curvature import (
    FiniteDifferenceOperator,
    HessianOperator,
    hutchinson_trace,
    lanczos,
    spectral_density,
)
from lightning_gd.curvature._utils import _gaussian, _rademacher


class ShardedDense:
    """A dense symmetric matrix whose vectors are split across ranks along ``segments`` (non-contiguous, uneven):
    the exact reference for the sharded estimators (no finite-difference error)."""

    def __init__(self, A: Tensor, segments: list[tuple[int, int]]) -> None:
        self.A, self.segments, self.global_numel = A, tuple(segments), A.shape[0]
        self.index = torch.cat([torch.arange(s, s + n) for s, n in segments])
        self.numel, self.dtype, self.device = len(self.index), A.dtype, A.device
        self.param_names, self.param_numels = ("a", "b"), (self.numel // 2, self.numel - self.numel // 2)

    def allreduce(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def _full(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.global_numel, V.shape[1], dtype=V.dtype)
        full[self.index] = V
        dist.all_reduce(full)
        return full

    def matmat(self, V: Tensor) -> Tensor:
        return (self.A @ self._full(V))[self.index]

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.unsqueeze(1))[:, 0]


class LocalDense(ShardedDense):
    """The same matrix, unsharded (no ``allreduce``)."""

    allreduce = None

    def __init__(self, A: Tensor, numels: tuple[int, int]) -> None:
        self.A, self.numel, self.dtype, self.device = A, A.shape[0], A.dtype, A.device
        self.param_names, self.param_numels = ("a", "b"), numels

    def matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


def _estimates(op: Any, seed: int = 3) -> dict[str, Any]:
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - the same probes for every estimator
    out: dict[str, Any] = {}
    top = lanczos(op, k=2, tol=1e-10, max_iter=60, generator=gen())
    out["top"] = top.eigenvalues.tolist()
    out["top_vectors"] = top.eigenvectors
    out["bottom"] = lanczos(op, which="smallest", tol=1e-10, max_iter=60, generator=gen()).eigenvalues.tolist()
    out["restarted"] = lanczos(op, k=2, tol=1e-8, max_iter=60, max_basis=6, generator=gen()).eigenvalues.tolist()
    for method, probes in (("hutchinson", 6), ("hutch++", 9), ("xtrace", 8)):
        est = hutchinson_trace(op, probes, method=method, generator=gen(), per_param=True, probes_per_matmat=4)
        out[method] = (est.value, est.stderr, est.per_param)
    density = spectral_density(op, num_runs=2, num_steps=5, generator=gen())
    out["density"] = (density.nodes, density.weights)
    out["rademacher"] = _rademacher((3, op.numel), gen(), op)
    out["gaussian"] = _gaussian((3, op.numel), gen(), op)
    return out


def dense_scenario(rank: int) -> dict[str, Any]:
    """A float64 matrix with a repeated top eigenvalue, split unevenly and out of order across 2 ranks."""
    n = 37
    gen = torch.Generator().manual_seed(0)
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(-2, 3, n, dtype=torch.float64)
    eig[-2] = eig[-1]
    A = (Qm * eig) @ Qm.T
    A = 0.5 * (A + A.T)
    segments = [[(0, 5), (20, 3), (30, 7)], [(5, 15), (23, 7)]][rank]
    sharded = ShardedDense(A, segments)
    local = LocalDense(A, sharded.param_numels)  # per-parameter split differs: compared in total only
    return {"sharded": _estimates(sharded), "whole": _estimates(local), "index": sharded.index, "eig": eig}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(rank: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)


def fsdp_scenario(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 (fully_shard on a 1-D mesh) in float64: central differences of the sharded backward's gradients, against
    the exact Hessian of the global batch's loss on an unsharded copy, with the same probes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain, model = _mlp(0), _mlp(0)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    x, y = _batch(rank)
    batches = [_batch(r) for r in range(world)]

    def loss_fn() -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def gradient_fn() -> list[Tensor | None]:
        loss_fn().backward()  # FSDP2's reduce-scatter: each rank's shard of the global batch's mean gradient
        return [p.grad for p in model.parameters()]

    def global_loss(m: nn.Module, bs: list[tuple[Tensor, Tensor]]) -> Tensor:
        return sum(nn.functional.cross_entropy(m(bx), by) for bx, by in bs) / len(bs)

    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)  # found gradients, to be left as they are
    found = [p.grad for p in model.parameters()]
    before = [p.detach().to_local().clone() for p in model.parameters()]
    op = FiniteDifferenceOperator(model, gradient_fn, loss_fn=loss_fn)
    exact = HessianOperator(plain, global_loss, batches, hvp="double_backward")
    out = {"sharded": _estimates(op), "whole": _estimates(exact), "segments": op.segments, "numel": op.numel,
           "global_numel": op.global_numel, "loss": float(op.loss())}  # fmt: skip
    with torch.no_grad():  # a forward with grad and no backward would leave FSDP2 waiting for one
        out["local_loss"] = float(loss_fn())
    v = torch.randn(op.global_numel, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    index = torch.cat([torch.arange(s, s + n) for s, n in op.segments])
    out["product"] = (op.matvec(v[index]), exact.matvec(v)[index])
    shards = [p.detach().to_local() for p in model.parameters()]
    out["weights_equal"] = all(torch.equal(p, b) for p, b in zip(shards, before, strict=True))
    out["grads_kept"] = all(p.grad is g for p, g in zip(model.parameters(), found, strict=True))
    return out


def run(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"dense": dense_scenario(rank), "fsdp": fsdp_scenario(rank, world)}
        results["lightning_imported"] = any(m == "lightning" or m.startswith("lightning.") for m in sys.modules)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
