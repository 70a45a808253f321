"""Overhead of HessianTraceMonitor + SharpnessTracker at their DEFAULT settings in a real training run.

Claim checked: adding ``HessianTraceMonitor()`` and ``SharpnessTracker()`` (defaults: every_n_steps=100,
30 Hutchinson probes; k=1 Lanczos at tol=1e-2, max_iter=50, warm start; hvp="auto", batch="current",
mode="eval", max_overhead=0.025 each) to the quickstart recipe's training (tiny LLaMA,
``CausalLMModule(overrides={"block_size": 128})`` on ``TextCorpusDataModule(seq_len=128,
batch_size=--batch-size)``, AdamW lr 3e-3 betas (0.9, 0.95) weight decay 0.1, WarmupCosineLR(warmup 50, min
ratio 0.1), gradient clipping 1.0, seed 1234, as in lightning_gd/recipes/configs/quickstart.yaml; validation
off so the ratio is against training alone) costs at most 5% wall time, and leaves the final weights
bit-identical (``torch.equal``). ``--max-overhead none`` measures the old fixed schedule (every 100 steps).

Two numbers: (1) the wall-time ratio of runs with and without the callbacks (``--pairs`` interleaved
pairs, median ratio; noisy on a shared machine), (2) the time spent inside the callbacks' hooks, measured
in the same run (robust to background load), as a fraction of the rest of that run.

Command (2-core CPU, about 12 minutes)::

    python benchmarks/curvature_overhead.py --steps 3000 --batch-size 4 --pairs 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections import defaultdict

import lightning as L
import torch

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from lightning_gd.optim.warmup_cosine import WarmupCosineLR
from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def timed_hooks(callback: L.Callback, acc: dict[str, float]) -> L.Callback:
    """Accumulate the wall time of the callback's hooks (instance attributes shadow the methods)."""
    name = type(callback).__name__
    for hook in ("on_train_batch_end", "on_fit_end"):
        original = getattr(callback, hook)

        def wrapper(*args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                acc[name] += time.perf_counter() - t0

        setattr(callback, hook, wrapper)
    return callback


def run(steps: int, with_callbacks: bool, batch_size: int, hvp: str | None = None, max_overhead: str = "default"):
    L.seed_everything(1234, verbose=False)
    model = CausalLMModule(
        preset="tiny",
        overrides={"block_size": 128},
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=50, min_lr_ratio=0.1),
    )
    dm = TextCorpusDataModule(seq_len=128, batch_size=batch_size, val_fraction=0.05, seed=1234)
    acc: dict[str, float] = defaultdict(float)
    callbacks = []
    if with_callbacks:
        kw = {} if hvp is None else {"hvp": hvp}
        if max_overhead != "default":
            kw["max_overhead"] = None if max_overhead == "none" else float(max_overhead)
        callbacks = [timed_hooks(HessianTraceMonitor(**kw), acc), timed_hooks(SharpnessTracker(**kw), acc)]
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, precision="32-true", gradient_clip_val=1.0,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        wall = time.perf_counter() - t0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return wall, dict(acc), callbacks, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=1, help="interleaved (without, with) pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-overhead", default="default", help="'default', 'none' or a fraction")
    parser.add_argument(
        "--also-hvp", default="", help="comma list of hvp settings for extra with-callback runs, e.g. double_backward"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {args.steps} steps,"
        f" batch {args.batch_size} x 128 tokens"
    )
    ratios, rows, identical = [], [], []
    for i in range(args.pairs):
        base_wall, _, _, base_state = run(args.steps, False, args.batch_size)
        cb_wall, acc, cbs, cb_state = run(args.steps, True, args.batch_size, max_overhead=args.max_overhead)
        ratios.append(cb_wall / base_wall)
        hook = sum(acc.values())
        same = all(torch.equal(base_state[k], cb_state[k]) for k in base_state)
        identical.append(same)
        trace, sharp = cbs
        label = "defaults" if args.max_overhead == "default" else f"max_overhead={args.max_overhead}"
        rows.append((f"pair {i + 1}, {label}", base_wall, cb_wall, acc, hook, trace, sharp))
    for hvp in filter(None, args.also_hvp.split(",")):
        cb_wall, acc, cbs, cb_state = run(args.steps, True, args.batch_size, hvp=hvp, max_overhead=args.max_overhead)
        identical.append(all(torch.equal(base_state[k], cb_state[k]) for k in base_state))
        rows.append((f"hvp='{hvp}' (not default)", None, cb_wall, acc, sum(acc.values()), *cbs))

    print("\n| run | wall without (s) | wall with (s) | wall ratio | time in HessianTraceMonitor (s) |"
          " time in SharpnessTracker (s) | in-run overhead = hook time / (wall - hook time) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, base_wall, cb_wall, acc, hook, _, _ in rows:
        base_txt = f"{base_wall:.1f}" if base_wall else "-"
        ratio_txt = f"{cb_wall / base_wall:.2f}x" if base_wall else "-"
        print(
            f"| {label} | {base_txt} | {cb_wall:.1f} | {ratio_txt} | {acc.get('HessianTraceMonitor', 0):.1f} |"
            f" {acc.get('SharpnessTracker', 0):.1f} | {100 * hook / (cb_wall - hook):.1f}% |"
        )
    print("\nPer-check HVPs and values (steps: metric):")
    for label, _, _, _, _, trace, sharp in rows:
        hv_t = [int(v) for _, v in trace.history.get("hessian/num_hvps", [])]
        hv_s = [int(v) for _, v in sharp.history.get("sharpness/num_hvps", [])]
        tr = [f"{s}: {v:.3g}" for s, v in trace.history.get("hessian/trace", [])]
        lam = [f"{s}: {v:.4g}" for s, v in sharp.history.get("sharpness/lambda_max", [])]
        print(f"- {label}: trace HVPs {hv_t}, sharpness HVPs {hv_s}; hvp in use {trace._hvp_in_use!r};"
              f" trace {tr}; lambda_max {lam}")  # fmt: skip
    print(f"\nMedian wall-time ratio (with / without): {statistics.median(ratios):.3f}")
    print(f"Final weights identical with and without callbacks (torch.equal, every tensor): {all(identical)}")


if __name__ == "__main__":
    main()
