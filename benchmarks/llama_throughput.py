"""Lightning's overhead against a plain PyTorch training loop: tokens/s of the same LLaMA-style model and batches.

Claim checked: training ``CausalLMModule`` with ``lightning.Trainer`` (the llama-* recipes' code path: AdamW with
two parameter groups, ``WarmupDecayLR`` stepped per step, gradient clipping 1.0, Lightning's
``ThroughputMonitor``) reaches at least 0.95x the tokens/s of a hand-written loop doing the same work: the same
model, optimizer, schedule, clipping and the very same batches (random token windows made up front, so data
loading costs nothing in either). Both time the steps after ``--warmup`` steps with ``time.perf_counter``
around whole steps (forward, backward, clip, optimizer, schedule) and synchronise CUDA at the ends.
``--repeats`` pairs run interleaved (Lightning, plain, Lightning, plain, ...) and the median ratio is reported.

On a GPU (``--device cuda --precision bf16``) it also reports MFU: the model's training FLOPs per token
(``LlamaConfig.flops_per_token``, 6N + 12LCT) times tokens/s over the device's peak from Lightning's table
(``lightning.fabric.utilities.throughput.get_available_flops``).

Commands::

    python benchmarks/llama_throughput.py                                   # CPU: llama-tiny, 2-core machine
    python benchmarks/llama_throughput.py --device cuda --preset 125m --seq-len 1024 --batch-size 16 \\
        --precision bf16 --steps 60 --warmup 20 [--compile]                  # GPU (not run here)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.data import DataLoader, TensorDataset

from lightning_gd.optim.recipe import decay_groups
from lightning_gd.optim.warmup_decay import WarmupDecayLR
from lightning_gd.recipes.causal_lm import CausalLMModule

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def _batches(args: argparse.Namespace, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.steps, args.batch_size, args.seq_len + 1), generator=gen)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _module(args: argparse.Namespace) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(
        preset=args.preset, block_size=args.seq_len, compile=args.compile,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=lambda o: WarmupDecayLR(o, warmup_steps=0.05, min_lr_ratio=0.1, total_steps=args.steps),
    )  # fmt: skip


class _StepClock(L.Callback):
    """Wall time of each training step: from one ``on_train_batch_end`` to the next (whole steps, as the loop)."""

    def __init__(self, warmup: int, sync: bool) -> None:
        self.warmup, self.sync, self.times = warmup, sync, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sync:
            torch.cuda.synchronize()
        if batch_idx >= self.warmup - 1:
            self.times.append(time.perf_counter())


def _run_lightning(args: argparse.Namespace, batches: list) -> float:
    module = _module(args)
    clock = _StepClock(args.warmup, args.device == "cuda")
    throughput = L.pytorch.callbacks.ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0])
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=_precision(args), max_steps=args.steps,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock, throughput],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(*map(torch.stack, zip(*batches, strict=True))), batch_size=None))
    return (len(clock.times) - 1) * args.batch_size * args.seq_len / (clock.times[-1] - clock.times[0])


def _run_plain(args: argparse.Namespace, batches: list) -> float:
    module = _module(args)
    device = torch.device(args.device)
    model = module.model.to(device)
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(decay_groups(model), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = WarmupDecayLR(optimizer, warmup_steps=0.05, min_lr_ratio=0.1, total_steps=args.steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    model.train()
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup - 1:
            times.append(time.perf_counter())
    return (len(times) - 1) * args.batch_size * args.seq_len / (times[-1] - times[0])


def _precision(args: argparse.Namespace) -> str:
    return "bf16-mixed" if args.precision == "bf16" else "32-true"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = _module(args)
    batches = _batches(args, module.config.vocab_size)
    flops_per_token = module.config.flops_per_token(args.seq_len)
    peak = get_available_flops(torch.device(args.device), torch.bfloat16 if args.precision == "bf16" else torch.float32)
    rows = []
    for r in range(args.repeats):  # interleaved, so slow drifts of the machine hit both alike
        lightning_tps = _run_lightning(args, batches)
        plain_tps = _run_plain(args, batches)
        rows.append({"repeat": r, "lightning_tokens_per_s": lightning_tps, "plain_tokens_per_s": plain_tps,
                     "ratio": lightning_tps / plain_tps})  # fmt: skip
        print(f"repeat {r}: Lightning {lightning_tps:,.0f} tokens/s, plain loop {plain_tps:,.0f} tokens/s,"
              f" ratio {lightning_tps / plain_tps:.3f}")  # fmt: skip
    ratio = statistics.median(r["ratio"] for r in rows)
    summary = {
        "device": args.device, "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "precision": args.precision, "compile": args.compile, "steps": args.steps, "warmup": args.warmup,
        "median_ratio": ratio, "rows": rows,
        "lightning_tokens_per_s": statistics.median(r["lightning_tokens_per_s"] for r in rows),
        "plain_tokens_per_s": statistics.median(r["plain_tokens_per_s"] for r in rows),
    }  # fmt: skip
    print(f"median ratio Lightning / plain loop: {ratio:.3f} (goal >= 0.95)")
    if peak:
        for key in ("lightning", "plain"):
            mfu = summary[f"{key}_tokens_per_s"] * flops_per_token / peak
            summary[f"{key}_mfu"] = mfu
            print(f"MFU {key}: {mfu:.1%} (peak {peak / 1e12:.0f} TFLOP/s)")
    else:
        print("MFU: no peak FLOP/s known for this device (CPU): tokens/s only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
