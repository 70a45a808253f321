"""One curvature check against one training step on a LLaMA preset: wall time and extra peak memory.

A ``Trainer`` fits the LLaMA-style decoder (``--preset``, default ``125m``: 124.7M parameters, float32, AdamW) on
random token windows of ``--seq`` tokens, batch ``--batch``, for 3 steps; the callback under test checks once,
at the end of step 2. A timing callback placed before it records each training step's wall time (the check is
not in it) and the peak resident memory (``ru_maxrss``) just before and just after the check, so the extra peak
memory is the check's own, beyond training's. Each callback runs in a fresh process.

* ``SharpnessTracker(every_n_steps=2, preconditioned=False, memory_budget=--sharpness-vectors vectors)``: one cold
  Lanczos check (the first check of a run is the most expensive; later ones are warm-started);
* ``HessianTraceMonitor(every_n_steps=2, num_probes=--probes, memory_budget=--trace-vectors vectors)``.

Command (2-core CPU shared with other jobs, one thread; timings noisy, so ratios are taken in the same process)::

    python benchmarks/curvature_llm_scale.py --preset 125m --seq 64 --batch 2

On a GPU (not run here), the same for 350m and 1b in bf16-mixed::

    python benchmarks/curvature_llm_scale.py --preset 350m --seq 512 --batch 4 --accelerator gpu --precision bf16-mixed
    python benchmarks/curvature_llm_scale.py --preset 1b --seq 512 --batch 2 --accelerator gpu --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from lightning_gd.recipes.llama import Llama, LlamaConfig

warnings.filterwarnings("ignore")


class LM(LightningModule):
    def __init__(self, preset: str, seq: int) -> None:
        super().__init__()
        self.model = Llama(LlamaConfig.from_name(preset, block_size=seq))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


class Probe(Callback):
    """Step wall times and peak RSS around the check (placed before the callback under test)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.rss_before_check = 0
        self.rss_after_check = 0
        self.cuda_before = self.cuda_after = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:  # the check of step 2 has just finished
            self.rss_after_check = _maxrss()
            self.cuda_after = _cuda_peak()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self.steps.append(time.perf_counter() - self._start)
        if trainer.global_step == 2:
            self.rss_before_check = _maxrss()
            self.cuda_before = _cuda_peak()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cuda_peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    seed_everything(0)
    module = LM(args.preset, args.seq)
    numel = sum(p.numel() for p in module.parameters())
    vector = 4 * numel  # float32 working dtype
    if args.which == "sharpness":
        cb = SharpnessTracker(every_n_steps=2, max_overhead=None, preconditioned=False, plot=False,
                              memory_budget=args.sharpness_vectors * vector)  # fmt: skip
    else:
        cb = HessianTraceMonitor(every_n_steps=2, max_overhead=None, num_probes=args.probes,
                                 memory_budget=args.trace_vectors * vector)  # fmt: skip
    probe = Probe()
    tokens = torch.randint(0, module.model.config.vocab_size, (3 * args.batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    trainer = Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, cb],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=args.batch))
    metrics = {k: float(v) for k, v in cb.last_metrics.items()}
    out = {
        "which": args.which, "preset": args.preset, "numel": numel, "vector_bytes": vector,
        "step_s": probe.steps, "check_s": cb._budget.last_cost_s, "metrics": metrics,
        "rss_before_check": probe.rss_before_check, "rss_after_check": probe.rss_after_check,
        "cuda_before": probe.cuda_before, "cuda_after": probe.cuda_after,
        "max_basis": getattr(cb, "_max_basis", None), "probes_per_matmat": getattr(cb, "_probes_per_matmat", None),
    }  # fmt: skip
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--sharpness-vectors", type=int, default=8, help="memory_budget, in parameter-sized vectors")
    parser.add_argument("--trace-vectors", type=int, default=4, help="memory_budget, in parameter-sized vectors")
    parser.add_argument("--which", choices=("sharpness", "trace"), default=None)
    args = parser.parse_args()
    if args.which is not None:
        child(args)
        return
    print(f"{args.preset}, batch {args.batch} x {args.seq}, {args.precision}, {args.accelerator}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print("| check | products | max_basis / probes per call | check s | training step s (median) | check / step |"
          " peak RSS before check GB | extra peak RSS GB | extra, in vectors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for which in ("sharpness", "trace"):
        cmd = [sys.executable, __file__, "--which", which] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"| {which} | failed: {proc.stderr[-2000:]} |")
            continue
        r = json.loads(lines[0][7:])
        step = sorted(r["step_s"])[len(r["step_s"]) // 2]
        extra = r["rss_after_check"] - r["rss_before_check"]
        if r["cuda_after"]:
            extra = r["cuda_after"] - r["cuda_before"]
        key = "sharpness/num_hvps" if which == "sharpness" else "hessian/num_hvps"
        size = r["max_basis"] if which == "sharpness" else r["probes_per_matmat"]
        print(f"| {which} | {r['metrics'].get(key, float('nan')):.0f} | {size} | {r['check_s']:.1f} | {step:.2f} |"
              f" {r['check_s'] / step:.1f} | {r['rss_before_check'] / 1e9:.2f} | {extra / 1e9:.2f} |"
              f" {extra / r['vector_bytes']:.1f} |")  # fmt: skip
        print(f"  metrics: {r['metrics']}; step times: {[round(s, 2) for s in r['step_s']]}")


if __name__ == "__main__":
    main()
