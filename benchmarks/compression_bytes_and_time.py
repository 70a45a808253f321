"""Gradient compression: bytes sent per rank and step time, 2-process CPU DDP (gloo).

Claims checked:
  (a) top-k at density 1% sends >= 25x fewer bytes per rank and step than a dense fp32 allreduce at 2 ranks;
  (b) compress + decompress of each compressor costs at most 10% of the model's backward time on a 10M+
      parameter model (and: is ``torch.topk`` the bottleneck, does ``TopK(..., sampled=True)`` fix it?).

Part 1 (DDP): two processes (``torch.multiprocessing.spawn``, gloo, ``OMP_NUM_THREADS=1``, one thread each),
raw ``DistributedDataParallel`` (default 25 MB buckets) around an MLP 1024-2048-2048-2048-1024 (12.6M
parameters, fp32), a fixed random batch per rank, SGD(lr=1e-3). Rows: a local-only baseline (a comm hook that
returns the local gradient: compute without communication), dense allreduce (no hook), torch's
``bf16_compress_hook``, torch PowerSGD rank 1 and 4 (``start_powerSGD_iter=2``, error feedback, warm start), and
ours through ``CompressionHookState`` + ``compressed_allreduce_hook`` with error feedback: TopK(0.01) exact,
TopK(0.01, sampled=True), RandomK(0.01), Sign(), QSGD(levels=16) (the strategy default; 1 byte per entry).
Step time = forward + backward (including the hook's communication) + optimizer step, after a barrier, rank 0's
clock. Configurations are interleaved round-robin over ``--repeats`` rounds (a fresh DDP model each time) and the
reported time is the median over all timed steps, so background load hits all rows alike. Bytes: the payload this
rank contributes in the last timed step (ours: ``state.stats()["bytes_sent"]``; PowerSGD: the increase of
``total_numel_after_compression`` x 4; dense/bf16: numel x element size). At 2 ranks the ring-allreduce and the
allgather both make each rank transmit exactly its payload once, so payload bytes are also the link bytes.

Part 2 (single process, one thread): the largest DDP bucket (and all buckets), filled with a real gradient of the
same model and batch, is compressed and decompressed by each compressor (decompress = ``decompress_sum`` of the
2 ranks' payloads for the all-gather compressors, as the hook does); medians over ``--micro-repeats``. The
backward time of the model (same batch, no DDP) is the reference. ``torch.topk`` alone on the largest bucket is
timed as well.

Command (2-core CPU, about 3.5 minutes; more under load)::

    OMP_NUM_THREADS=1 python benchmarks/compression_bytes_and_time.py --repeats 2 --steps 3

Writes ``benchmarks/figures/compression_bytes_and_time.png`` unless ``--no-plot``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _compression_task import make_batch, make_model
from _harness import FIGURES, run_ranks, save_figure
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_gd.compression import QSGD, CompressionHookState, RandomK, Sign, TopK, compressed_allreduce_hook

warnings.filterwarnings("ignore")

CONFIGS = [
    "local only (no comm)",
    "dense fp32 allreduce",
    "torch bf16_compress_hook",
    "torch PowerSGD rank 1",
    "torch PowerSGD rank 4",
    "ours top-k 1% exact",
    "ours top-k 1% sampled",
    "ours random-k 1%",
    "ours sign",
    "ours QSGD 16 levels",
]

FIG = FIGURES / "compression_bytes_and_time.png"


def make_compressor(name: str) -> Any:
    if "top-k 1% exact" in name:
        return TopK(0.01)
    if "top-k 1% sampled" in name:
        return TopK(0.01, sampled=True)
    if "random-k" in name:
        return RandomK(0.01, seed=0)
    if "sign" in name:
        return Sign()
    if "QSGD" in name:
        return QSGD(16, seed=0)
    raise ValueError(name)


# No annotations on the hooks: with `from __future__ import annotations` they would be strings, which DDP rejects.
def _noop_hook(state, bucket):  # noqa: ANN001, ANN201
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _recording_hook(state, bucket):  # noqa: ANN001, ANN201
    state.setdefault("numels", {})[bucket.index()] = bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)


def _worker(args: argparse.Namespace, out: str) -> None:
    """One rank (``_harness.run_ranks`` gives it RANK, WORLD_SIZE and the master's address)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = make_batch(rank, args.batch)
    n_params = sum(p.numel() for p in make_model().parameters())
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    sent: dict[str, float] = {}
    extra: dict[str, Any] = {}

    # Bucket layout after DDP's rebuild (step >= 2), for part 2.
    model = DDP(make_model())
    rec: dict = {}
    model.register_comm_hook(rec, _recording_hook)
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
    extra["bucket_numels"] = [rec["numels"][k] for k in sorted(rec["numels"])]
    del model

    for _round in range(args.repeats):
        for name in CONFIGS:
            # torch's PowerSGD hook issues its 2nd/3rd allreduce from future callbacks; on gloo with several
            # buckets those callbacks interleave differently on the two ranks (collective size mismatch, abort),
            # so PowerSGD runs with one bucket holding the whole model.
            model = DDP(make_model(), bucket_cap_mb=10_000 if "PowerSGD" in name else 25)
            state: Any = None
            if name.startswith("local"):
                model.register_comm_hook(None, _noop_hook)
            elif name.startswith("torch bf16"):
                model.register_comm_hook(None, default_hooks.bf16_compress_hook)
            elif name.startswith("torch PowerSGD"):
                state = powerSGD_hook.PowerSGDState(
                    process_group=None,
                    matrix_approximation_rank=int(name.split()[-1]),
                    start_powerSGD_iter=2,
                    min_compression_rate=2,
                    use_error_feedback=True,
                    warm_start=True,
                    random_seed=0,
                )
                model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            elif name.startswith("ours"):
                state = CompressionHookState(make_compressor(name), error_feedback=True, module=model.module)
                model.register_comm_hook(state, compressed_allreduce_hook)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            prev_after = 0
            for step in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if step >= args.warmup:
                    times[name].append(dt)
                if isinstance(state, powerSGD_hook.PowerSGDState):
                    after = state.total_numel_after_compression
                    if after > prev_after:
                        sent[name] = 4.0 * (after - prev_after)
                    prev_after = after
            if isinstance(state, CompressionHookState):
                sent[name] = state.stats()["bytes_sent"]
                if isinstance(state.compressor, TopK) and state.compressor.sampled:
                    extra["sample_fallbacks"] = state.compressor.sample_fallbacks
            elif name.startswith("torch bf16"):
                sent[name] = 2.0 * n_params
            elif name.startswith("dense"):
                sent[name] = 4.0 * n_params
            elif name.startswith("local"):
                sent[name] = 0.0
            del model, opt, state
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"times": times, "sent": sent, "extra": extra}))
    dist.barrier()
    dist.destroy_process_group()


def _median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def micro(args: argparse.Namespace, bucket_numels: list[int]) -> dict[str, Any]:
    """Part 2: compress/decompress time on real gradient buckets vs the backward time (one thread)."""
    torch.set_num_threads(1)
    model = make_model()
    x, y = make_batch(0, args.batch)

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    # Backward only (the forward is not timed).
    bwd = []
    for i in range(args.micro_repeats + 1):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        t0 = time.perf_counter()
        loss.backward()
        if i:
            bwd.append(time.perf_counter() - t0)
    t_bwd = statistics.median(bwd)
    # DDP buckets gradients in reverse registration order.
    flat = torch.cat([p.grad.reshape(-1) for p in reversed(list(model.parameters()))])
    assert flat.numel() == sum(bucket_numels), (flat.numel(), bucket_numels)
    buckets = list(flat.split(bucket_numels))
    largest = max(buckets, key=lambda b: b.numel())

    rows: dict[str, Any] = {"backward_s": t_bwd, "largest_numel": largest.numel(), "buckets": bucket_numels}
    k = TopK(0.01).k(largest.numel())
    rows["torch.topk_s"] = _median_time(lambda: torch.topk(largest.abs(), k, sorted=False), args.micro_repeats)
    per: dict[str, dict[str, float]] = {}
    for name in CONFIGS:
        if not name.startswith("ours"):
            continue
        comp = make_compressor(name)
        comp.salt = 0

        def dec(c: Any, comp: Any = comp) -> torch.Tensor:
            if comp.shared_indices:  # allreduce of the payload, then one decompression
                return comp.decompress(c)
            return comp.decompress_sum([c, c])  # all-gather of P=2 payloads

        c_l = comp.compress(largest, key=0)
        t_c = _median_time(lambda comp=comp: comp.compress(largest, key=0), args.micro_repeats)
        t_d = _median_time(lambda c=c_l, dec=dec: dec(c), args.micro_repeats)

        def all_buckets(comp: Any = comp, dec: Any = dec) -> None:
            for i, b in enumerate(buckets):
                dec(comp.compress(b, key=i))

        t_all = _median_time(all_buckets, args.micro_repeats)

        # Full hook compute on the largest bucket with error feedback: g+e, C, local D (for e), D of both payloads.
        e = torch.zeros_like(largest)

        def hook_compute(comp: Any = comp, dec: Any = dec, e: torch.Tensor = e) -> None:
            p = largest + e
            c = comp.compress(p, key=0)
            _ = p - comp.decompress(c)
            dec(c)

        t_hook = _median_time(hook_compute, args.micro_repeats)
        per[name] = {"compress_s": t_c, "decompress_s": t_d, "all_buckets_s": t_all, "hook_ef_s": t_hook}
        if isinstance(comp, TopK) and comp.sampled:
            rows["sample_fallbacks_micro"] = comp.sample_fallbacks
    rows["per"] = per
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (DDP rebuild, PowerSGD start)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument("--micro-repeats", type=int, default=5)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="also dump raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank: its output directory
    args = parser.parse_args()

    t_start = time.time()
    if args.worker is not None:
        _worker(args, args.worker)
        return
    with tempfile.TemporaryDirectory() as out:
        run_ranks([sys.executable, __file__, *sys.argv[1:], "--worker", out], world_size=2, timeout=3600)
        r0 = json.loads((Path(out) / "rank0.json").read_text())
    m = micro(args, r0["extra"]["bucket_numels"])
    n_params = sum(p.numel() for p in make_model().parameters())
    dense = 4.0 * n_params
    t_dense = statistics.median(r0["times"]["dense fp32 allreduce"])

    print(
        f"\n# Compression bytes and time ({datetime.date.today()}, torch {torch.__version__}, 2 ranks gloo, "
        f"1 thread/rank, MLP {n_params / 1e6:.1f}M params, batch {args.batch}/rank)\n"
    )
    print(f"DDP buckets (numel): {r0['extra']['bucket_numels']}\n")
    print("| method | bytes sent / rank / step | dense / sent | step time (median, ms) | vs dense step |")
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        s = r0["sent"][name]
        t = statistics.median(r0["times"][name])
        ratio = f"{dense / s:.1f}x" if s else "-"
        print(f"| {name} | {s / 1e6:.3f} MB | {ratio} | {1e3 * t:.0f} | {t / t_dense:.2f}x |")
    print(f"\nsampled top-k fallbacks to exact (DDP run, rank 0): {r0['extra'].get('sample_fallbacks')}")

    tb = m["backward_s"]
    print(
        f"\nBackward time (no DDP, batch {args.batch}, 1 thread, median): {1e3 * tb:.1f} ms. Largest bucket: "
        f"{m['largest_numel']:,} entries; torch.topk(|g|, k={TopK(0.01).k(m['largest_numel']):,}) alone on it: "
        f"{1e3 * m['torch.topk_s']:.1f} ms ({100 * m['torch.topk_s'] / tb:.0f}% of backward).\n"
    )
    print(
        "| compressor | compress (ms) | decompress (ms) | C+D largest bucket, % of backward | hook compute "
        "incl. EF, largest bucket (ms) | C+D all buckets (ms) | all buckets, % of backward |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in m["per"].items():
        cd = r["compress_s"] + r["decompress_s"]
        print(
            f"| {name[5:]} | {1e3 * r['compress_s']:.1f} | {1e3 * r['decompress_s']:.1f} | {100 * cd / tb:.0f}% | "
            f"{1e3 * r['hook_ef_s']:.1f} | {1e3 * r['all_buckets_s']:.1f} | {100 * r['all_buckets_s'] / tb:.0f}% |"
        )
    print(f"\nwall time: {time.time() - t_start:.0f} s")

    if args.json:
        Path(args.json).write_text(json.dumps({"ddp": r0, "micro": m, "args": vars(args)}, indent=1))
    if not args.no_plot:
        _plot(r0, m, dense)


def _plot(r0: dict, m: dict, dense: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONFIGS if not n.startswith("local")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    axes[0].barh(names, [r0["sent"][n] / 1e6 for n in names], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("MB sent per rank per step (log)")
    axes[0].invert_yaxis()
    axes[1].barh(names, [1e3 * statistics.median(r0["times"][n]) for n in names], color="tab:orange")
    axes[1].axvline(
        1e3 * statistics.median(r0["times"]["local only (no comm)"]), color="k", ls="--", label="local only (no comm)"
    )
    axes[1].set_xlabel("step time, ms (median)")
    axes[1].invert_yaxis()
    axes[1].legend(loc="lower right")
    axes[1].set_yticklabels([])
    per = m["per"]
    cn = list(per)
    axes[2].barh([n[5:] for n in cn], [100 * per[n]["all_buckets_s"] / m["backward_s"] for n in cn], color="tab:red")
    axes[2].axvline(10, color="k", ls="--", label="goal: 10% of backward")
    axes[2].set_xlabel("compress+decompress, all buckets, % of backward")
    axes[2].invert_yaxis()
    axes[2].legend(loc="lower right")
    fig.suptitle("2-rank CPU DDP (gloo), 12.6M-param MLP: bytes, step time, compression cost")
    save_figure(fig, FIG, dpi=110)


if __name__ == "__main__":
    main()
