"""Conda against AdamW on the quickstart model and corpus, several seeds: the step at which each reaches AdamW's
final validation loss (the Conda paper claims 2-2.5x fewer steps than AdamW on LLaMA 60M-1B).

Both use the same schedule (10% linear warm-up, cosine to 10%, gradient clipping at 1.0) over the same budget:

- AdamW: ``adamw-llama`` at the quickstart's tuned lr 3e-3 (betas (0.9, 0.95), weight decay 0.1);
- Conda: ``conda-llama`` as registered (lr 0.01, betas (0.9, 0.99), scale 0.25, ``update_proj_gap`` 2000, so
  within a short run the basis is the SVD of the first momentum only), and the same with the basis refreshed
  every ``--gap`` steps (the same share of the run as 2000 of a 10K-step paper run would be for 50 of 250).

    python benchmarks/optim_conda_vs_adamw.py --steps 250 --seeds 0 1 2

Prints a table (final validation loss per seed, the step each reaches AdamW's final loss) and writes
``benchmarks/figures/optim_conda_vs_adamw.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _harness import FIGURES, save_figure  # noqa: E402
from _optim_lm import corpus, first_step_reaching, train  # noqa: E402

from lightning_gd.optim import OptimizerRecipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--out", default=str(FIGURES / "optim_conda_vs_adamw.png"))
    args = parser.parse_args()
    data = corpus(128, args.batch_size)
    variants = {
        "AdamW (lr 3e-3)": OptimizerRecipe.from_name("adamw-llama", lr=3e-3),
        "Conda (gap 2000)": OptimizerRecipe.from_name("conda-llama"),
        f"Conda (gap {args.gap})": OptimizerRecipe.from_name(
            "conda-llama", optimizer_kwargs={"betas": (0.9, 0.99), "scale": 0.25, "update_proj_gap": args.gap}
        ),
    }
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name, recipe in variants.items():
            out = train(
                recipe, seed, args.steps, args.val_every, args.val_batches, batch_size=args.batch_size, data=data
            )
            runs[name].append(out)
            print(f"seed {seed} {name:<18} final val {out['val'][-1][1]:.4f}  ({out['wall_s']:.0f} s)", flush=True)
    print(f"\nsteps {args.steps}, batch {args.batch_size} x 128 bytes, val every {args.val_every} on "
          f"{args.val_batches} batches; total {time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print("| optimizer | final val loss (per seed) | mean | steps to AdamW's final loss (per seed) | mean ratio |")
    print("|---|---|---|---|---|")
    adamw_name = next(iter(variants))
    for name in variants:
        finals = [r["val"][-1][1] for r in runs[name]]
        reach = [
            first_step_reaching(r["val"], base["val"][-1][1])
            for r, base in zip(runs[name], runs[adamw_name], strict=True)
        ]
        ratios = [args.steps / s for s in reach if s]
        ratio = f"{statistics.mean(ratios):.2f}x fewer" if len(ratios) == len(reach) else "not reached in all"
        print(
            f"| {name} | {', '.join(f'{f:.3f}' for f in finals)} | {statistics.mean(finals):.3f} | "
            f"{', '.join(str(s) if s else '-' for s in reach)} | {ratio} |"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, name in zip(("C0", "C3", "C1"), variants, strict=True):
        for i, r in enumerate(runs[name]):
            steps, losses = zip(*r["val"], strict=True)
            ax.plot(steps, losses, color=color, alpha=0.8, label=name if i == 0 else None, marker="o", ms=3)
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Quickstart model: Conda vs AdamW, {len(args.seeds)} seeds, {args.steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, args.out, dpi=120)


if __name__ == "__main__":
    main()
