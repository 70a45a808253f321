"""Gradient compression: training quality after N steps vs dense DDP (Lightning, 2 CPU ranks, gloo).

Claim checked: top-k at density 1% with error feedback (``strategy="ddp_topk"``) reaches a final training loss
within 1% (relative) of dense DDP (``strategy="ddp"``) after the same number of steps, seed and data.

Task: a seeded synthetic 10-class problem built from torch only ("blobs through a random tanh layer"): 10
classes x 8 Gaussian clusters (std 1.5, centers of std 2) in 16 dimensions, pushed through a fixed random 16->64
tanh map plus noise, 8192 training and 4096 test points (a single-process run reaches ~86% test accuracy, so the
loss does not collapse to ~0 within the run; ``--noise 1.0 --clusters 4`` is the easy variant used by
``compression_momentum.py``). Model: MLP 64-256-256-10 (ReLU), 85K parameters, i.e. one DDP bucket. Each rank
sees its own shard through Lightning's ``DistributedSampler`` (batch 32 per rank, shuffled, seed 0), plain
``torch.optim.SGD(lr=0.1)``, no momentum, ``--steps`` optimizer steps. Rows: dense DDP; ``ddp_topk`` (1%, error
feedback); ``CompressedDDPStrategy("topk", error_feedback=False)``; ``ddp_randomk`` (1%, EF); ``ddp_sign`` (EF);
``ddp_qsgd`` (16 levels, EF); ``ddp_powersgd`` (rank 1, EF, start iteration 2). Every row is its own 2-process
Lightning job (each rank its own process, ``_harness.run_ranks``); all use the same seed, data and steps.

Reported: final loss = mean over the last 10 steps of the training minibatch loss averaged over both ranks; the
full training-set loss and test accuracy of the final model; the relative gap to dense; the bytes ratio of the
last step (``trainer.strategy.compression_stats()``) and over the whole run (dense bytes / bytes sent, both summed
over every step of rank 0's ``compression/*`` log, so warm-ups count). Both ranks' final parameters are checked to
be identical.

Command (2-core CPU, about 3 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/compression_convergence.py --steps 800

Writes ``benchmarks/figures/compression_convergence.png`` unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _compression_task import common_args, plot_curves, run_all, run_worker  # noqa: E402
from _harness import FIGURES  # noqa: E402

# name -> (strategy: registered name or CompressedDDPStrategy kwargs, optimizer momentum)
CONFIGS: dict[str, dict[str, Any]] = {
    "dense DDP": {"strategy": "ddp"},
    "top-k 1% + EF": {"strategy": "ddp_topk"},
    "top-k 1% no EF": {"strategy": {"compressor": "topk", "density": 0.01, "error_feedback": False}},
    "random-k 1% + EF": {"strategy": "ddp_randomk"},
    "sign + EF": {"strategy": "ddp_sign"},
    "QSGD 16 levels + EF": {"strategy": "ddp_qsgd"},
    "PowerSGD rank 1 + EF": {"strategy": "ddp_powersgd"},
    # Extra rows (run with --configs): can the top-k gap to dense be closed by warm-up?
    "top-k 1% + EF, 100 dense steps": {"strategy": {"compressor": "topk", "density": 0.01, "warmup_steps": 100}},
    "top-k 1% + EF, DGC density warm-up 200": {
        "strategy": {"compressor": "topk", "density": 0.01, "density_warmup_steps": 200}
    },
    "top-k 2% + EF": {"strategy": {"compressor": "topk", "density": 0.02}},
}
DEFAULT_CONFIGS = list(CONFIGS)[:7]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser, steps=800, lr=0.1, noise=1.5, clusters=8)
    args = parser.parse_args()
    if args.worker is not None:
        run_worker(json.loads(args.worker), Path(args.out), args)
        return

    t_start = time.time()
    names = args.configs or DEFAULT_CONFIGS
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    res = run_all(Path(__file__).resolve(), {n: CONFIGS[n] for n in ["dense DDP", *names] if n in CONFIGS}, args)
    dense = res["dense DDP"]
    d_final = _mean([s["final_loss"] for s in dense])
    d_train = _mean([s["train_loss"] for s in dense])
    d_acc = _mean([s["test_acc"] for s in dense])
    print(
        f"\n# Compression convergence ({datetime.date.today()}, 2 ranks gloo, {args.steps} steps, batch "
        f"{args.batch}/rank, SGD lr {args.lr}, seeds {args.seeds})\n"
    )
    print(
        "| method | bytes ratio, last step | bytes over the run | final loss (last-10 mean) | gap vs dense | "
        "full train loss | gap vs dense | test acc | acc gap (pts) | ranks agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in res.items():
        f = _mean([s["final_loss"] for s in runs])
        tr = _mean([s["train_loss"] for s in runs])
        acc = _mean([s["test_acc"] for s in runs])
        print(
            f"| {name} | {runs[0]['ratio']:.1f}x | {runs[0]['run_ratio']:.1f}x | {f:.4f} | "
            f"{100 * (f - d_final) / d_final:+.1f}% | {tr:.4f} | "
            f"{100 * (tr - d_train) / d_train:+.1f}% | {100 * acc:.2f}% | {100 * (acc - d_acc):+.2f} | "
            f"{all(s['ranks_agree'] for s in runs)} |"
        )
    print(f"\nDDP buckets (compressed rows): {sorted({s['buckets'] for r in res.values() for s in r if s['buckets']})}")
    print(f"wall time: {time.time() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    if not args.no_plot:
        suffix = "" if args.configs is None else "_extra"
        plot_curves(
            res,
            FIGURES / f"compression_convergence{suffix}.png",
            f"2-rank CPU DDP, MLP 85K params, SGD lr {args.lr}: training loss (both ranks, 20-step mean)",
        )


if __name__ == "__main__":
    main()
