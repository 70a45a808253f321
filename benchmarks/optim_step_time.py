"""Optimizer step time of Conda, DiffGrad, M-FAC, timm's AdamW (and timm's Muon) on the quickstart model.

The model is the quickstart's ``tiny`` LLaMA (771K parameters) with the recipe parameter groups (Conda and Muon
on the hidden matrices, AdamW for embeddings and norms). Gradients are fixed random tensors; only
``optimizer.step()`` is timed, the optimizers taking turns (round robin) so that load on the shared machine
hits them alike, and the ratios to AdamW come from the same run. Conda is timed with its default
``update_proj_gap`` (2000: no SVD in the timed steps) and with an SVD every step (``update_proj_gap=1``, the
worst case). M-FAC keeps a window of ``--num-grads`` gradients (memory m x d floats).

    python benchmarks/optim_step_time.py --steps 30

Prints a Markdown table (median ms per step, ratio to AdamW, optimizer state).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_gd.optim import OptimizerRecipe
from lightning_gd.recipes import CausalLMModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {
        "timm AdamW": OptimizerRecipe(optimizer="adamw", weight_decay=0.1),
        "DiffGrad": OptimizerRecipe(optimizer="diffgrad"),
        "Conda (gap 2000)": OptimizerRecipe(optimizer="conda"),
        "Conda (SVD every step)": OptimizerRecipe(optimizer="conda", optimizer_kwargs={"update_proj_gap": 1}),
        f"M-FAC (m={args.num_grads})": OptimizerRecipe(
            optimizer="mfac", optimizer_kwargs={"num_grads": args.num_grads}
        ),
        "timm Muon": OptimizerRecipe(optimizer="muon", weight_decay=0.1),
    }
    models, opts = {}, {}
    for name, recipe in variants.items():
        torch.manual_seed(0)
        models[name] = CausalLMModule(preset="tiny", block_size=128).model
        opts[name] = recipe.build_optimizer(models[name])
        for p in models[name].parameters():
            p.grad = torch.randn_like(p) * 1e-2
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
    d = sum(p.numel() for p in next(iter(models.values())).parameters())
    base = statistics.median(times["timm AdamW"])
    print(f"{d} parameters, {args.steps} timed steps each (after {args.warmup}), {args.threads} thread(s)\n")
    print("| optimizer | median ms / step | ratio to AdamW | optimizer state |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        state = sum(
            v.numel() * v.element_size() for s in opts[name].state.values() for v in s.values() if torch.is_tensor(v)
        )
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x | {state / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
