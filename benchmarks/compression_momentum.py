"""Top-k error feedback vs SGD momentum, and the DGC momentum-correction fix (Lightning, 2 CPU ranks, gloo).

Claims checked (issue 4): on a small MLP, 2 ranks, top-k 1%, one bucket, plain SGD, top-k with memory (error
feedback) matches dense (issue: last-10 mean loss 0.033 vs 0.032) and beats top-k without memory (0.066); with
SGD momentum 0.9 the memory version ends *worse* (issue: 0.077-0.083) than the version without memory
(0.051-0.060). The fix checked here: ``CompressedDDPStrategy("topk", density=0.01, momentum_correction=0.9)`` with
``torch.optim.SGD(momentum=0)`` (DGC momentum correction + factor masking): does it recover the quality of dense
SGD with momentum 0.9?

Setup: the task and model of ``compression_convergence.py`` (``_compression_task.py``) in its easy setting (noise
1.0, 4 clusters per class, ~99% test accuracy reachable: the loss scale of the issue), MLP 64-256-256-10 (85K
parameters, one DDP bucket), batch 32 per rank through Lightning's DistributedSampler, ``--steps`` steps, SGD lr 0.1
for every row (momentum 0.9 where stated, ``dampening=0``, no Nesterov). Each row x seed is its own 2-process
Lightning job; seeds change the initialisation, the data and the sampler order, identically for every row.

Reported per row: last-10-step mean of the training minibatch loss (both ranks averaged) as mean and min-max over
seeds, the full-training-set loss and test accuracy of the final model.

Command (2-core CPU, about 5 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/compression_momentum.py --steps 600 --seeds 0 1

Also run (the effect depends on the step size and the task)::

    OMP_NUM_THREADS=1 python benchmarks/compression_momentum.py --steps 600 --seeds 0 1 --lr 0.2
    OMP_NUM_THREADS=1 python benchmarks/compression_momentum.py --steps 800 --seeds 0 --noise 1.5 --clusters 8

Writes ``benchmarks/figures/compression_momentum.png`` (``..._lr<lr>_noise<n>_c<k>.png`` for non-default
lr/task) unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from _compression_task import common_args, plot_curves, run_all, run_worker
from _harness import FIGURES

TOPK = {"compressor": "topk", "density": 0.01}
CONFIGS = {
    "dense SGD": {"strategy": "ddp"},
    "dense SGD + momentum 0.9": {"strategy": "ddp", "momentum": 0.9},
    "top-k EF, SGD": {"strategy": {**TOPK, "error_feedback": True}},
    "top-k no EF, SGD": {"strategy": {**TOPK, "error_feedback": False}},
    "top-k EF, SGD + momentum 0.9": {"strategy": {**TOPK, "error_feedback": True}, "momentum": 0.9},
    "top-k no EF, SGD + momentum 0.9": {"strategy": {**TOPK, "error_feedback": False}, "momentum": 0.9},
    "top-k + momentum_correction 0.9, SGD(momentum=0)": {"strategy": {**TOPK, "momentum_correction": 0.9}},
}
ISSUE = {
    "dense SGD": "0.032",
    "top-k EF, SGD": "0.033",
    "top-k no EF, SGD": "0.066",
    "top-k EF, SGD + momentum 0.9": "0.077-0.083",
    "top-k no EF, SGD + momentum 0.9": "0.051-0.060",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser, steps=600, lr=0.1, noise=1.0, clusters=4)
    parser.set_defaults(seeds=[0, 1])
    args = parser.parse_args()
    if args.worker is not None:
        run_worker(json.loads(args.worker), Path(args.out), args)
        return

    t_start = time.time()
    res = run_all(Path(__file__).resolve(), CONFIGS, args)
    print(
        f"\n# Top-k 1% and momentum ({datetime.date.today()}, 2 ranks gloo, {args.steps} steps, batch "
        f"{args.batch}/rank, SGD lr {args.lr}, seeds {args.seeds})\n"
    )
    print(
        "| row | issue (last-10 loss) | last-10 loss, mean | min-max over seeds | full train loss | test acc | "
        "buckets |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in res.items():
        f = [s["final_loss"] for s in runs]
        tr = sum(s["train_loss"] for s in runs) / len(runs)
        acc = sum(s["test_acc"] for s in runs) / len(runs)
        print(
            f"| {name} | {ISSUE.get(name, '-')} | {sum(f) / len(f):.4f} | {min(f):.4f}-{max(f):.4f} | {tr:.4f} | "
            f"{100 * acc:.2f}% | {runs[0]['buckets'] or '-'} |"
        )
    print(
        f"\nall runs: both ranks ended with identical parameters: "
        f"{all(s['ranks_agree'] for r in res.values() for s in r)}"
    )
    print(f"wall time: {time.time() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    if not args.no_plot:
        default = (args.lr, args.noise, args.clusters) == (0.1, 1.0, 4)
        suffix = "" if default else f"_lr{args.lr:g}_noise{args.noise:g}_c{args.clusters}"
        plot_curves(
            res,
            FIGURES / f"compression_momentum{suffix}.png",
            f"2-rank CPU DDP, top-k 1%, SGD lr {args.lr}, task noise {args.noise:g} / {args.clusters} clusters:"
            " training loss (both ranks, 20-step mean)",
        )


if __name__ == "__main__":
    main()
