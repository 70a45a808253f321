"""Every named LLM optimizer recipe on the quickstart model and corpus at the same budget: one loss-curve plot.

Recipes: ``adamw-llama``, ``conda-llama``, ``muon-llama``, ``psgd-kron-llama`` exactly as registered
(``lightning-gd optimizers``), each with its own 10% warm-up + cosine schedule over ``--steps`` steps and
clipping at 1.0; one seed. timm's Kron ``torch.compile``s its kernels for every parameter shape; on a CPU the
inductor builds take minutes, so ``--eager`` runs them eagerly instead (same numbers, no compile). The
quickstart's own tuned AdamW (lr 3e-3) is drawn for reference.

    python benchmarks/optim_llm_recipes.py --steps 150

Writes ``benchmarks/figures/optim_llm_recipes.png`` and prints the validation losses.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _harness import FIGURES, save_figure  # noqa: E402
from _optim_lm import corpus, train  # noqa: E402

from lightning_gd.optim import OptimizerRecipe  # noqa: E402

RECIPES = ("adamw-llama", "conda-llama", "muon-llama", "psgd-kron-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(FIGURES / "optim_llm_recipes.png"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--eager", action="store_true", help="run torch.compile'd code eagerly (timm's Kron)")
    args = parser.parse_args()
    if args.eager:  # timm's Kron compiles its kernels per shape: minutes of inductor builds on a loaded CPU
        torch.compiler.set_stance("force_eager")
    data = corpus(128, args.batch_size)
    runs = {}
    start = time.perf_counter()
    for name in (*args.recipes, "adamw-llama lr 3e-3"):
        recipe = OptimizerRecipe.from_name("adamw-llama", lr=3e-3) if " " in name else OptimizerRecipe.from_name(name)
        runs[name] = train(recipe, args.seed, args.steps, args.val_every, args.val_batches, batch_size=args.batch_size,
                           data=data)  # fmt: skip
        val = ", ".join(f"{s}: {v:.3f}" for s, v in runs[name]["val"])
        print(f"{name:<20} {runs[name]['wall_s']:5.0f} s  val {val}", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, r) in enumerate(runs.items()):
        style = "--" if " " in name else "-"
        steps, losses = zip(*r["train"], strict=True)
        curve = torch.tensor(losses)
        k = min(10, len(curve))
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], k, 1)[0, 0]
        ax_train.plot(steps[k - 1 :], smooth, style, color=f"C{i}", label=name)
        vs, vl = zip(*r["val"], strict=True)
        ax_val.plot(vs, vl, style, color=f"C{i}", marker="o", ms=3, label=name)
    ax_train.set_title("training loss (moving average of 10 steps)")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats/byte")
        ax.set_ylim(top=4.0)
        ax.grid(alpha=0.3)
    ax_val.legend()
    fig.suptitle(f"Named LLM recipes on the quickstart model, {args.steps} steps of {args.batch_size}x128 bytes")
    save_figure(fig, args.out, dpi=120)


if __name__ == "__main__":
    main()
