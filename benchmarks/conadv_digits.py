"""ConAdv vs plain training on scikit-learn's digits with a large batch, equal steps, several seeds (CPU).

Claim checked (issue 12, the CPU part of the benchmark): with a batch that is large for the data set (512 of the
1,438 training digits), ConAdv (one-step attacks made with the previous step's weights, auxiliary BatchNorm,
equal-weight clean + adversarial loss) reaches a clean top-1 accuracy comparable to plain training at the same
number of optimizer steps, and is much more robust to a one-step attack. ConAdv's extra cost on CPU is the attack
plus the adversarial pass, in sequence (about 2.5x a plain step here); on a GPU the attack overlaps the main pass.

Setup: DigitsDataModule(image_size=8, batch_size=512), timm resnet10t narrowed to channels (16, 32, 64, 128)
(318K parameters), SGD (lr 0.2, momentum 0.9, Nesterov, wd 5e-4), WarmupDecayLR (5 warm-up steps, cosine to 0),
label smoothing 0.1, ``--steps`` optimizer steps. ``plain``: the default single-device strategy. ``conadv``:
ConAdvStrategy(epsilon=0.1, tau=1, targeted random labels, random start 0.8; one process). Evaluation at the end
on the 359 held-out digits in eval mode: clean top-1, and top-1 under an untargeted one-step sign attack (FGSM,
epsilon 0.1 in pixel units, no random start) at the final weights through the main BatchNorm. Wall time is the
fit's (shared 2-core machine: compare the two methods within a seed, they ran back to back).

Command (2-core CPU; about 8-10 minutes under load)::

    python benchmarks/conadv_digits.py --steps 30 --seeds 0 1 2

Writes ``benchmarks/figures/conadv_digits.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from _harness import FIGURES, save_figure
from lightning.pytorch import Trainer, seed_everything

from lightning_gd.adversarial import Normalization, sign_attack  # noqa: E402
from lightning_gd.optim import WarmupDecayLR  # noqa: E402
from lightning_gd.recipes.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataModule  # noqa: E402
from lightning_gd.recipes.image_classifier import ImageClassifierModule  # noqa: E402
from lightning_gd.strategies import ConAdvStrategy  # noqa: E402

EPSILON = 0.1


def _model() -> ImageClassifierModule:
    return ImageClassifierModule(
        "resnet10t", num_classes=10, in_chans=1, model_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lr_scheduler=lambda o: WarmupDecayLR(o, warmup_steps=5, min_lr_ratio=0.0),
    )  # fmt: skip


def _evaluate(model: ImageClassifierModule, data: DigitsDataModule) -> tuple[float, float]:
    model.eval()
    x, y = data.val_set.tensors
    norm = Normalization(mean=DIGITS_MEAN, std=DIGITS_STD)
    adv = sign_attack(model, x, y, epsilon=EPSILON, normalization=norm, targeted=False, random_start=0.0).inputs
    with torch.no_grad():
        clean = (model(x).argmax(-1) == y).float().mean().item()
        robust = (model(adv).argmax(-1) == y).float().mean().item()
    return clean, robust


def run(method: str, seed: int, steps: int, batch_size: int) -> dict[str, float]:
    seed_everything(seed, verbose=False)
    data = DigitsDataModule(image_size=8, batch_size=batch_size, seed=seed)
    model = _model()
    strategy = (
        ConAdvStrategy(epsilon=EPSILON, mean=DIGITS_MEAN, std=DIGITS_STD, seed=seed) if method == "conadv" else "auto"
    )
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, limit_val_batches=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    if dist.is_initialized():
        dist.destroy_process_group()
    clean, robust = _evaluate(model, data)
    return {"method": method, "seed": seed, "clean": clean, "robust": robust, "s_per_step": wall / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(FIGURES / "conadv_digits.png"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for seed in args.seeds:
        for method in ("plain", "conadv"):
            rows.append(run(method, seed, args.steps, args.batch_size))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.steps} steps, batch {args.batch_size}, seeds {args.seeds}\n")
    print("| method | clean top-1 (mean, per seed) | FGSM eps 0.1 top-1 (mean, per seed) | s / step |")
    print("|---|---|---|---|")
    for method in ("plain", "conadv"):
        r = [row for row in rows if row["method"] == method]
        clean = ", ".join(f"{x['clean']:.3f}" for x in r)
        robust = ", ".join(f"{x['robust']:.3f}" for x in r)
        print(
            f"| {method} | {statistics.mean(x['clean'] for x in r):.3f} ({clean}) | "
            f"{statistics.mean(x['robust'] for x in r):.3f} ({robust}) | "
            f"{statistics.mean(x['s_per_step'] for x in r):.2f} |"
        )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, method in enumerate(("plain", "conadv")):
        r = [row for row in rows if row["method"] == method]
        for j, key in enumerate(("clean", "robust")):
            values = [x[key] for x in r]
            pos = j * 3 + i
            ax.bar(pos, statistics.mean(values), color=f"C{i}", label=method if j == 0 else None)
            ax.scatter([pos] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks([0.5, 3.5], ["clean top-1", f"FGSM top-1 (eps {EPSILON})"])
    ax.set_ylim(0, 1)
    ax.set_title(f"digits, batch {args.batch_size}, {args.steps} steps, {len(args.seeds)} seeds")
    ax.legend()
    save_figure(fig, args.out, dpi=100)


if __name__ == "__main__":
    main()
