"""Curvature by finite differences of gradients against double backward: accuracy, cost, and a sharded run.

Three parts (``--part``, default all):

* **accuracy**: lambda_max, lambda_min (Lanczos, ``tol=1e-3``: Ritz values to ~1e-6, the same start vector) and
  the trace (Hutchinson, the same ``--probes`` Rademacher probes) of two LLaMA-style models, by
  :class:`~lightning_gd.curvature.FiniteDifferenceOperator` (gradients from an ordinary ``loss.backward()``, as the
  callbacks take them under sharded strategies) against the exact double-backward Hessian in float32. Models:
  ``quickstart`` (the quickstart recipe's model: preset ``tiny``, 128-byte windows, batch 16, after 30 AdamW steps
  on the standard library's bytes) and ``llama-tiny`` (preset ``tiny`` at its own 256-token block, batch 4, at
  initialisation). Gradient precision: ``float32``, and ``bf16-mixed`` (the gradients under CPU bf16 autocast, as a
  mixed-precision strategy computes them) with the step for bfloat16 (``eps = 0.20``) and for float32 (4.9e-3).
* **cost**: one product's wall time in training steps (forward, backward and AdamW step of the same batch, in the
  same process): finite difference against double backward.
* **fsdp2**: two gloo processes, the llama-tiny model under FSDP2 (``fully_shard`` on every block and the root),
  each rank half of the batch: lambda_max of the sharded operator (vectors are each rank's shards) against the
  unsharded finite-difference and exact operators of the same seed and whole batch (computed on rank 0 from an
  unsharded copy), and the memory of the Lanczos vectors per rank (the basis the run held, times the rank's shard
  size, 4 bytes an entry) against the unsharded run's.

Command (2-core CPU shared with other jobs; timings as ratios within one run)::

    python benchmarks/curvature_finite_difference.py
    python benchmarks/curvature_finite_difference.py --part fsdp2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _harness  # noqa: F401  (repository root on sys.path)
import torch
from _llama_problem import llama_problem, lm_loss
from torch import Tensor, nn

from lightning_gd.curvature import FiniteDifferenceOperator, HessianOperator, hutchinson_trace, lanczos

warnings.filterwarnings("ignore")
TOL, MAX_ITER = 1e-3, 40  # Ritz-value error ~ tol**2: far below the finite-difference error


def _fd(model: nn.Module, batch: Any, autocast: bool, compute_dtype: torch.dtype | None) -> FiniteDifferenceOperator:
    def gradient_fn() -> list[Tensor | None]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(model, batch)
        loss.backward()
        return [p.grad for p in model.parameters()]

    return FiniteDifferenceOperator(model, gradient_fn, compute_dtype=compute_dtype)


def _spectrum(op: Any, probes: int) -> dict[str, float]:
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same start vector / probes for every operator
    top = lanczos(op, tol=TOL, max_iter=MAX_ITER, generator=gen())
    bottom = lanczos(op, which="smallest", tol=TOL, max_iter=MAX_ITER, generator=gen())
    trace = hutchinson_trace(op, probes, method="hutchinson", generator=gen(), probes_per_matmat=1)
    return {"lambda_max": float(top.eigenvalues[0]), "lambda_min": float(bottom.eigenvalues[0]),
            "trace": trace.value, "products": top.num_matvecs + bottom.num_matvecs + trace.num_matvecs}  # fmt: skip


def _seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def accuracy_and_cost(name: str, probes: int, repeats: int) -> dict[str, Any]:
    model, batch = llama_problem(name)
    exact = HessianOperator(model, lm_loss, batch, hvp="double_backward")
    ops = {
        "float32": _fd(model, batch, False, None),
        "bf16-mixed, eps for bf16": _fd(model, batch, True, torch.bfloat16),
        "bf16-mixed, eps for fp32": _fd(model, batch, True, torch.float32),
    }
    ref = _spectrum(exact, probes)
    rows = {}
    for label, op in ops.items():
        got = _spectrum(op, probes)
        rows[label] = {k: abs(got[k] - ref[k]) / abs(ref[k]) for k in ("lambda_max", "lambda_min", "trace")}
        rows[label]["values"] = got
    # Cost: one product against one training step (forward, backward, AdamW step) of the same batch.
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay; the step's arithmetic runs

    def step() -> None:
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()

    v = torch.randn(exact.numel, generator=torch.Generator().manual_seed(5))
    t_step = _seconds(step, repeats)
    t_exact = _seconds(lambda: exact.matvec(v), repeats)
    t_fd = _seconds(lambda: ops["float32"].matvec(v), repeats)
    numel = sum(p.numel() for p in model.parameters())
    return {"model": name, "numel": numel, "reference": ref, "errors": rows,
            "steps_per_product": {"double_backward": t_exact / t_step, "finite_difference": t_fd / t_step},
            "step_s": t_step}  # fmt: skip


# ---------------------------------------------------------------------------------------------- FSDP2, 2 ranks
def fsdp2_worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, (x, y) = llama_problem("llama-tiny")
    plain, _ = llama_problem("llama-tiny")
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    half = x.shape[0] // world
    mine = (x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])

    def gradient_fn() -> list[Tensor | None]:
        lm_loss(model, mine).backward()  # FSDP2's reduce-scatter: this rank's shard of the whole batch's gradient
        return [p.grad for p in model.parameters()]

    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    op = FiniteDifferenceOperator(model, gradient_fn)
    start = time.perf_counter()
    top = lanczos(op, tol=TOL, max_iter=MAX_ITER, generator=gen())
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"rank": rank, "local_numel": op.numel, "global_numel": op.global_numel,
                              "lambda_max": float(top.eigenvalues[0]), "products": top.num_matvecs,
                              "seconds": seconds}  # fmt: skip
    if rank == 0:  # the unsharded runs of the same seed: one process, the whole batch
        whole = FiniteDifferenceOperator(plain, lambda: _whole_gradient(plain, (x, y)))
        start = time.perf_counter()
        ref = lanczos(whole, tol=TOL, max_iter=MAX_ITER, generator=gen())
        result["unsharded_seconds"] = time.perf_counter() - start
        result["unsharded_fd"] = float(ref.eigenvalues[0])
        result["unsharded_products"] = ref.num_matvecs
        exact = HessianOperator(plain, lm_loss, (x, y), hvp="double_backward")
        result["exact"] = float(lanczos(exact, tol=TOL, max_iter=MAX_ITER, generator=gen()).eigenvalues[0])
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _whole_gradient(model: nn.Module, batch: Any) -> list[Tensor | None]:
    lm_loss(model, batch).backward()
    return [p.grad for p in model.parameters()]


def fsdp2(out_dir: Path) -> dict[str, Any]:
    from _harness import run_ranks

    out_dir.mkdir(parents=True, exist_ok=True)
    run_ranks([sys.executable, __file__, "--worker", str(out_dir)], world_size=2, timeout=1200)
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    r0 = ranks[0]
    basis = r0["products"] + 1  # Lanczos' basis: one vector per product, and the start (no restart at this size)
    return {
        "ranks": ranks,
        "rel_to_unsharded_fd": abs(r0["lambda_max"] - r0["unsharded_fd"]) / abs(r0["unsharded_fd"]),
        "rel_to_exact": abs(r0["lambda_max"] - r0["exact"]) / abs(r0["exact"]),
        "vector_bytes_per_rank": [basis * r["local_numel"] * 4 for r in ranks],
        "vector_bytes_unsharded": (r0["unsharded_products"] + 1) * r0["global_numel"] * 4,
        "largest_shard_bytes": max(r["local_numel"] for r in ranks) * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "accuracy", "fsdp2"), default="all")
    parser.add_argument("--models", default="quickstart,llama-tiny")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="curvature_finite_difference.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fsdp2_worker(args.worker)
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load = os.getloadavg()
    results: dict[str, Any] = {"load_before": load}
    if args.part in ("all", "accuracy"):
        results["accuracy"] = [accuracy_and_cost(m, args.probes, args.repeats) for m in args.models.split(",")]
        for r in results["accuracy"]:
            print(f"\n{r['model']} ({r['numel']:,} parameters), exact: " + ", ".join(
                f"{k} {v:.5g}" for k, v in r["reference"].items()))  # fmt: skip
            print("| gradients | lambda_max rel. err. | lambda_min rel. err. | trace rel. err. |")
            for label, e in r["errors"].items():
                print(f"| {label} | {e['lambda_max']:.1e} | {e['lambda_min']:.1e} | {e['trace']:.1e} |")
            s = r["steps_per_product"]
            print(f"one product in training steps ({r['step_s']:.3f} s each): finite difference"
                  f" {s['finite_difference']:.2f}, double backward {s['double_backward']:.2f}")  # fmt: skip
    if args.part in ("all", "fsdp2"):
        f = results["fsdp2"] = fsdp2(Path(args.out).with_suffix("") / "fsdp2")
        r0 = f["ranks"][0]
        print(
            f"\nFSDP2, 2 ranks: lambda_max {r0['lambda_max']:.6g}; unsharded FD {r0['unsharded_fd']:.6g}"
            f" (rel. {f['rel_to_unsharded_fd']:.1e}); exact {r0['exact']:.6g} (rel. {f['rel_to_exact']:.1e})"
        )
        per_rank = ", ".join(f"{b / 2**20:.2f}" for b in f["vector_bytes_per_rank"])
        print(f"shards {[r['local_numel'] for r in f['ranks']]} of {r0['global_numel']:,}; Lanczos vectors per rank"
              f" {per_rank} MiB, unsharded {f['vector_bytes_unsharded'] / 2**20:.2f} MiB; sharded"
              f" {r0['seconds']:.1f} s, unsharded {r0['unsharded_seconds']:.1f} s")  # fmt: skip
    results["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nload average before {load}, after {results['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
