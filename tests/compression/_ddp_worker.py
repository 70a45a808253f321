"""The ranks of a 2-process gloo DDP job exercising ``compressed_allreduce_hook`` (run by the tests).

``test_compression_ddp.py`` runs :func:`run` on two ranks through ``tests/helpers/ddp.py``'s job runner. Every
scenario records, per step and bucket, the local gradient entering the hook, the averaged tensor it returns, the
bucket's parameter names, and the hook statistics; ``OUT_DIR/rank{RANK}.pt`` receives the records and the test
process checks them against hand computations.
"""

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_gd.compression import (
    QSGD,
    CompressionHookState,
    Compressor,
    RandomK,
    Sign,
    TopK,
    compressed_allreduce_hook,
)

IN_DIM, HIDDEN, OUT_DIM, BATCH = 8, 16, 4, 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, IN_DIM, generator=gen), torch.randn(BATCH, OUT_DIM, generator=gen)


def _ddp(model: nn.Module, bucket_cap_mb: float = 0.0001) -> DDP:
    # Tiny default cap: DDP starts with one bucket and rebuilds two after step 0 (layout change).
    # With the large cap it keeps one bucket but reverses its parameter order at the rebuild.
    return DDP(model, bucket_cap_mb=bucket_cap_mb)


class _Recorder:
    """Wraps the hook to record what enters and leaves it."""

    def __init__(self, state: CompressionHookState, names: dict[int, str]) -> None:
        self.state, self.names, self.step = state, names, 0
        self.records: list[dict[str, Any]] = []
        self.stats: list[dict[str, float]] = []

    def hook(self, state: CompressionHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        rec = {
            "step": self.step,
            "bucket": bucket.index(),
            "params": [self.names[p.data_ptr()] for p in bucket.parameters()],
            "grad_in": bucket.buffer().clone(),
        }
        fut = compressed_allreduce_hook(state, bucket)

        def _done(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            rec["out"] = f.value().clone()
            return f.value()

        self.records.append(rec)
        return fut.then(_done)


def _train(
    rank: int,
    compressor: Compressor,
    steps: range,
    model: nn.Module | None = None,
    opt_state: dict[str, Any] | None = None,
    hook_state: dict[str, Any] | None = None,
    bind: bool = True,
    save_at: int | None = None,
    gather: bool = False,
    bucket_cap_mb: float = 0.0001,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run SGD steps with the hook; optionally snapshot everything after step ``save_at``."""
    model = model if model is not None else _model()
    ddp = _ddp(model, bucket_cap_mb)
    state = CompressionHookState(compressor, module=model if bind else None, **kwargs)
    if hook_state is not None:
        state.load_state_dict(hook_state)
    rec = _Recorder(state, {p.data_ptr(): n for n, p in model.named_parameters()})
    ddp.register_comm_hook(state, rec.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    out: dict[str, Any] = {"grads": {}}
    for step in steps:
        rec.step = step
        opt.zero_grad()
        x, y = _batch(rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        out["grads"][step] = {n: p.grad.clone() for n, p in model.named_parameters()}
        rec.stats.append(state.stats())
        opt.step()
        if step == save_at:
            out["snapshot"] = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(),
                "hook": state.state_dict() if gather else _own_rank_only(state.state_dict(), rank),
            }
    out["records"], out["stats"] = rec.records, rec.stats
    return out


def _own_rank_only(state_dict: dict[str, Any], rank: int) -> dict[str, Any]:
    """A checkpoint in which each rank kept only its own state (as if saved to one file per rank)."""
    return {**state_dict, "ranks": {rank: state_dict["ranks"][rank]}}


def _dense_reference(rank: int, steps: range) -> dict[int, dict[str, torch.Tensor]]:
    """Plain DDP (default allreduce) gradients for the same data."""
    model = _model()
    ddp = _ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    grads = {}
    for step in steps:
        opt.zero_grad()
        x, y = _batch(rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        grads[step] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return grads


def _resume(
    rank: int, gather: bool, bind: bool, save_at: int = 2, total: int = 5, bucket_cap_mb: float = 25
) -> dict[str, Any]:
    """Save after step ``save_at``, rebuild model/DDP/hook state from the snapshot, continue.

    One bucket, so top-k selections do not depend on the bucket layout; the restarted DDP still
    uses its initial (reversed) parameter order in the first resumed step.
    """
    first = _train(
        rank, TopK(0.1), range(save_at + 1), bind=bind, save_at=save_at, gather=gather, bucket_cap_mb=bucket_cap_mb
    )
    snap = first["snapshot"]
    model = _model()
    model.load_state_dict(snap["model"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _train(
            rank,
            TopK(0.1),
            range(save_at + 1, total),
            model=model,
            opt_state=snap["opt"],
            hook_state=snap["hook"],
            bind=bind,
            bucket_cap_mb=bucket_cap_mb,
        )
    second["warnings"] = [str(w.message) for w in caught]
    return second


SCENARIOS: dict[str, Callable[[int], Any]] = {
    "dense_ref": lambda r: _dense_reference(r, range(3)),
    "topk_full": lambda r: _train(r, TopK(1.0), range(3)),
    "topk10": lambda r: _train(r, TopK(0.1), range(4)),
    "randomk": lambda r: _train(r, RandomK(0.25, seed=5), range(3), error_feedback=False),
    "sign": lambda r: _train(r, Sign(), range(3), error_feedback=False),
    "qsgd": lambda r: _train(r, QSGD(4, seed=1), range(3)),
    "dgc": lambda r: _train(r, TopK(0.25), range(3), momentum_correction=0.9),
    "warmup": lambda r: _train(r, TopK(0.1), range(3), warmup_steps=1, min_numel=100),
    "warmup_bf16": lambda r: _train(r, TopK(0.1), range(2), warmup_steps=1, warmup_dtype="bfloat16"),
    "uninterrupted": lambda r: _train(r, TopK(0.1), range(5), bucket_cap_mb=25),
    "resume_gather": lambda r: _resume(r, gather=True, bind=True),
    "resume_local": lambda r: _resume(r, gather=False, bind=True),
    "resume_unbound": lambda r: _resume(r, gather=False, bind=False),
    # Two buckets: the restarted DDP sends everything in one bucket in its first step, then regroups.
    "uninterrupted_buckets": lambda r: _train(r, TopK(0.1), range(5)),
    "resume_buckets": lambda r: _resume(r, gather=True, bind=True, bucket_cap_mb=0.0001),
}


def run(rank: int, world: int, out_dir: str) -> None:
    """One rank (``torch.multiprocessing.spawn``'s entry point): every scenario, saved to ``OUT_DIR/rank{rank}.pt``.

    ``tests/helpers/ddp.py``'s runner sets ``MASTER_ADDR`` / ``MASTER_PORT`` for the job.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {name: fn(rank) for name, fn in SCENARIOS.items()}
        results["lightning_imported"] = any(m == "lightning" or m.startswith("lightning.") for m in sys.modules)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
