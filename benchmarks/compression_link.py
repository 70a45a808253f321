"""Compressed DDP over a real rate-limited link: wall-clock time to a target loss against dense DDP.

Two ranks of a Lightning DDP job (gloo, ``Trainer(num_nodes=2, devices=1)``, one thread each) run in two network
namespaces joined by a veth pair shaped by tbf (``benchmarks/netlab``) at each ``--links`` rate; the measured TCP
rate is printed and recorded before the runs of each link.

Models: ``mlp12m``, the 12.6M-parameter MLP 1024-2048-2048-2048-1024 of ``compression_bytes_and_time.py`` on a
learnable synthetic task (x ~ N(0, I), label = argmax of a fixed random 1024->64 teacher; fresh batches every step,
so the training loss is also a held-out loss), batch 64 per rank, SGD(lr=0.1), no momentum; ``llama-tiny``,
``CausalLMModule(preset="tiny")`` (its default AdamW and warm-up/cosine schedule) on sequences of a fixed random
Markov chain (next token = perm[prev] with probability 0.9), batch 16 x 64 tokens per rank.

Strategies (``--strategies``): ``dense`` (``DDPStrategy``), ``bf16`` (torch's ``bf16_compress_hook``, registered
by a 3-line ``DDPStrategy`` subclass because Lightning registers comm hooks only on CUDA), ``powersgd1`` /
``powersgd4`` (``CompressedDDPStrategy("powersgd", powersgd_rank=r)``), ``topk`` (``CompressedDDPStrategy("topk",
density=0.01, density_warmup_steps=8)`` with the sampled threshold: the registry has no ``sampled`` option, so a
subclass sets ``compressor.sampled = True``), ``sign`` (``ddp_sign``), ``qsgd`` (``ddp_qsgd``), and ``nocomm``
(a hook that returns the local gradient: the compute floor, not a training method).

Every run trains for ``--budget`` seconds of wall-clock (rank 0's clock from the start of the first step; both
ranks agree to stop through a 2-float allreduce after each step, which also averages the two ranks' losses) or
``--max-steps``. Recorded per step: time, loss (mean of both ranks), this rank's payload bytes.

Reported per strategy and link (mean over ``--seeds``): median step time (steps >= 3), bytes per step (mean over
the run, warm-ups included), time to the target loss, final loss (trailing mean of the last 3 steps) after the
budget. Target: the worst final loss over all dense runs (so dense reaches it on every link and seed), trailing
mean over 3 steps; or with ``--target per-link`` dense's final loss on each link (give dense a longer ``--budget``
on slow links so that the target is not just the warm-up). Speed-up = dense time to target / strategy time to
target, on the same link. Strategy modifiers: ``+bf16`` (``warmup_dtype="bfloat16"``), ``+start6`` (DGC's density
warm-up from 6.25%), e.g. ``powersgd1+bf16``. ``--analyze A.json,B.json`` merges runs of several files.

The quiet-machine re-measurement with per-link targets (2026-11-24): see benchmarks/RESULTS.md.

Commands of the recorded run (2-core CPU shared with other jobs, load average ~20; about 1 minute per run, 35
runs, 36 minutes; J=benchmarks/figures/compression_link_mlp12m.json)::

    python benchmarks/compression_link.py --links 100mbit,1gbit --strategies dense,topk,powersgd1,sign \
        --seeds 0,1 --budget 30 --json $J --no-plot
    C="python benchmarks/compression_link.py --budget 30 --json $J --resume --no-plot"
    $C --links 10gbit --strategies dense,topk,powersgd1,sign --seeds 0
    $C --links 100mbit,1gbit --strategies bf16,powersgd4,qsgd --seeds 0
    $C --links 100mbit --strategies topk@0.0009,topk@0.0034 --seeds 0   # top-k at PowerSGD-1 / -4 bytes
    $C --links 1gbit --strategies nocomm --seeds 0                      # compute floor, for the profile
    python benchmarks/compression_link.py --model llama-tiny --links 100mbit,1gbit \
        --strategies dense,powersgd1,topk --seeds 0 --budget 30 --json benchmarks/figures/compression_link_llama.json
    python benchmarks/compression_link.py --analyze $J
    python benchmarks/compression_link.py --analyze benchmarks/figures/compression_link_llama.json \
        --fig benchmarks/figures/compression_link_llama.png

Writes ``benchmarks/figures/compression_link.png`` (speed-up over dense against link rate) unless ``--no-plot``.
Needs root, ``ip`` and ``tc``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _harness import FIGURES, save_figure  # noqa: E402  (also puts the repository on sys.path)

FIG = FIGURES / "compression_link.png"
ALL_STRATEGIES = ["dense", "bf16", "powersgd1", "powersgd4", "topk", "sign", "qsgd", "nocomm"]
LABELS = {
    "dense": "dense DDP (fp32)", "bf16": "torch bf16 hook", "powersgd1": "PowerSGD rank 1",
    "powersgd4": "PowerSGD rank 4", "topk": "top-k 1% sampled + DGC warm-up", "sign": "sign (EF)",
    "qsgd": "QSGD 16 levels", "nocomm": "no communication (compute floor)",
}  # fmt: skip
SMOOTH = 3
COMPARE_STEP = 20  # losses of all rows compared at this step (equal steps, not equal time)


# ---------------------------------------------------------------------------------------------- worker (one rank)
def _make_strategy(name: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lightning_gd.strategies import CompressedDDPStrategy

    class HookDDPStrategy(DDPStrategy):
        """DDP with a torch comm hook registered on CPU too (Lightning registers ``ddp_comm_hook`` on CUDA only)."""

        def __init__(self, hook: Any) -> None:
            super().__init__()
            self._hook = hook

        def _register_ddp_hooks(self) -> None:
            self.model.register_comm_hook(None, self._hook)

    class SampledTopKStrategy(CompressedDDPStrategy):
        """Top-k with the sampled threshold (not reachable through the registry's options)."""

        def _new_hook_state(self) -> Any:
            state = super()._new_hook_state()
            state.compressor.sampled = True
            return state

    # The compute floor: no communication at all. No annotations: DDP insists on `dist.GradBucket` for `bucket`.
    def local_only(state, bucket):  # noqa: ANN001, ANN202
        import torch

        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    base, *mods = name.split("+")  # modifiers: +bf16 (warm-up steps in bfloat16), +start6 (DGC warm-up from 6.25%)
    if mods:
        strategy = _make_strategy(base)
        for mod in mods:
            if mod == "bf16":
                strategy.options["warmup_dtype"] = "bfloat16"
            elif mod == "start6":
                strategy.options["density_warmup_start"] = 0.0625
            else:
                raise ValueError(f"unknown modifier {mod!r} in {name!r}: +bf16, +start6")
        strategy.hook_state = strategy._new_hook_state()
        return strategy
    if name == "dense":
        return DDPStrategy()
    if name == "bf16":
        return HookDDPStrategy(default_hooks.bf16_compress_hook)
    if name == "nocomm":
        return HookDDPStrategy(local_only)
    if name.startswith("powersgd"):
        return CompressedDDPStrategy("powersgd", powersgd_rank=int(name[len("powersgd") :]))
    if name == "topk" or name.startswith("topk@"):  # topk@D: density D, e.g. PowerSGD's bytes
        density = float(name.split("@")[1]) if "@" in name else 0.01
        return SampledTopKStrategy("topk", density=density, density_warmup_steps=8)
    if name in ("sign", "qsgd"):
        return CompressedDDPStrategy(name)
    raise ValueError(f"unknown strategy {name!r}; choose from {ALL_STRATEGIES}")


def _worker(cfg: dict[str, Any]) -> None:
    import lightning as L
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset

    import lightning_gd.strategies  # noqa: F401  (registers the ddp_<compressor> strategy names)

    torch.set_num_threads(1)
    rank = int(os.environ["GLOBAL_RANK"])
    seed = cfg["seed"]

    if cfg["model"] == "mlp12m":
        from _compression_task import make_model

        class Task(IterableDataset):
            def __iter__(self) -> Any:
                teacher = torch.randn(1024, 64, generator=torch.Generator().manual_seed(99))
                gen = torch.Generator().manual_seed(1000 * seed + rank)
                while True:
                    x = torch.randn(64, 1024, generator=gen)
                    yield x, (x @ teacher).argmax(1)

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = make_model(seed)

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module: Any = Module()
    else:
        from lightning_gd.recipes import CausalLMModule

        class Task(IterableDataset):  # type: ignore[no-redef]
            def __iter__(self) -> Any:
                perm = torch.randperm(256, generator=torch.Generator().manual_seed(99))
                gen = torch.Generator().manual_seed(1000 * seed + rank)
                while True:
                    seq = torch.empty(16, 65, dtype=torch.long)
                    seq[:, 0] = torch.randint(256, (16,), generator=gen)
                    for t in range(1, 65):
                        keep = torch.rand(16, generator=gen) < 0.9
                        seq[:, t] = torch.where(keep, perm[seq[:, t - 1]], torch.randint(256, (16,), generator=gen))
                    yield seq[:, :-1], seq[:, 1:]

        torch.manual_seed(seed)
        module = CausalLMModule(preset="tiny", block_size=64)

    n_params = sum(p.numel() for p in module.parameters())
    fixed_bytes = {"dense": 4.0 * n_params, "bf16": 2.0 * n_params, "nocomm": 0.0}.get(cfg["strategy"])
    records: list[list[float]] = []
    clock: dict[str, float] = {}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            clock.setdefault("t0", time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            t = time.perf_counter() - clock["t0"]
            sent = fixed_bytes if fixed_bytes is not None else trainer.strategy.compression_stats().get("bytes_sent")
            stop = float(rank == 0 and t > cfg["budget"])
            flag = torch.tensor([float(outputs["loss"].detach()), stop])
            dist.all_reduce(flag)  # the ranks stop at the same step; the loss becomes the mean over both
            records.append([t, float(flag[0]) / 2, float(sent or 0.0)])
            if flag[1] > 0:
                trainer.should_stop = True

    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy=_make_strategy(cfg["strategy"]),
        max_steps=cfg["max_steps"], callbacks=[Recorder()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Task(), batch_size=None))
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"records": records, "n_params": n_params}))


# ---------------------------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every strategy x seed on every link; returns (and saves to ``--json`` as it goes) the raw records."""
    from benchmarks.netlab import NetLab

    data: dict[str, Any] = {"args": vars(args), "date": str(datetime.date.today()), "links": {}, "runs": []}
    if args.json and Path(args.json).exists() and args.resume:
        data = json.loads(Path(args.json).read_text())
    done = {(r["link"], r["strategy"], r["seed"]) for r in data["runs"]}
    port = 29600
    for link in args.links.split(","):
        todo = [
            (s, seed)
            for seed in map(int, args.seeds.split(","))
            for s in args.strategies.split(",")
            if (link, s, seed) not in done
        ]
        if not todo:
            continue
        with NetLab(link, prefix="lgdcl") as lab:
            data["links"][link] = {"set_mbit": lab.rate_bps / 1e6, "measured_mbit": lab.measure_rate()}
            for strategy, seed in todo:
                out = Path(f"/tmp/compression_link_{os.getpid()}.json")
                cfg = {"model": args.model, "strategy": strategy, "seed": seed, "budget": args.budget,
                       "max_steps": args.max_steps, "out": str(out)}  # fmt: skip
                port += 1
                t0 = time.time()
                lab.run_ranks(
                    [sys.executable, __file__, "--worker", json.dumps(cfg)], timeout=args.budget + 240, port=port,
                    capture=True,
                )  # fmt: skip
                res = json.loads(out.read_text())
                out.unlink()
                rec = res["records"]
                data["runs"].append({"link": link, "strategy": strategy, "seed": seed, **res})
                print(
                    f"{link:>8} {strategy:>10} seed {seed}: {len(rec)} steps, loss {rec[0][1]:.3f} -> "
                    f"{rec[-1][1]:.3f}, {time.time() - t0:.0f} s wall", flush=True,
                )  # fmt: skip
                if args.json:
                    Path(args.json).write_text(json.dumps(data))
    return data


def _order(name: str) -> tuple[int, str]:
    return ALL_STRATEGIES.index(name.split("+")[0].split("@")[0]), name


_MOD_LABELS = {"bf16": "bf16 warm-up", "start6": "DGC warm-up from 6.25%"}


def _label(name: str) -> str:
    base, *mods = name.split("+")
    label = f"top-k {100 * float(base[5:]):g}% sampled + DGC warm-up" if base.startswith("topk@") else LABELS[base]
    return ", ".join([label, *(_MOD_LABELS[m] for m in mods)])


def _smooth(losses: list[float]) -> list[float]:
    return [statistics.fmean(losses[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(losses))]


def analyze(data: dict[str, Any], target: float | str | None = None) -> dict[str, Any]:
    """Print the tables; returns {link: {strategy: summary}} and the target."""
    runs = data["runs"]
    dense_final: dict[str, list[float]] = {}
    for run in runs:
        if run["strategy"] == "dense":
            dense_final.setdefault(run["link"], []).append(_smooth([r[1] for r in run["records"]])[-1])
    if target is None or target == "per-link":
        if not dense_final:
            raise SystemExit("no dense runs: pass --target")
    # One target for every link (the worst final dense loss), or per link: what dense reaches on that link.
    targets = {
        link: float(target) if target not in (None, "per-link") else
        max(dense_final[link]) if target == "per-link" else max(v for vals in dense_final.values() for v in vals)
        for link in {run["link"] for run in runs}
    }  # fmt: skip
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        rec = run["records"]
        sm = _smooth([r[1] for r in rec])
        hit = next((rec[i][0] for i, v in enumerate(sm) if v <= targets[run["link"]]), math.nan)
        steps = [b[0] - a[0] for a, b in zip(rec[2:], rec[3:], strict=False)] or [rec[-1][0] / len(rec)]
        row = table.setdefault(run["link"], {}).setdefault(run["strategy"], {"seeds": []})
        row["seeds"].append({
            "step_s": statistics.median(steps), "bytes": statistics.fmean(r[2] for r in rec), "t_target": hit,
            "final": sm[-1], "steps": len(rec), "budget_t": rec[-1][0],
            "at_step": sm[COMPARE_STEP - 1] if len(sm) >= COMPARE_STEP else math.nan,
            "steady": statistics.median(steps[-10:]), "last_bytes": rec[-1][2],
        })  # fmt: skip
    for rows in table.values():
        for row in rows.values():
            for key in ("step_s", "bytes", "t_target", "final", "steps", "at_step", "steady", "last_bytes"):
                vals = [s[key] for s in row["seeds"]]
                row[key] = math.nan if any(math.isnan(v) for v in vals) else statistics.fmean(vals)
        dense_t = rows.get("dense", {}).get("t_target", math.nan)
        for row in rows.values():
            row["speedup"] = dense_t / row["t_target"] if row["t_target"] > 0 else math.nan
            row["steady_speedup"] = rows.get("dense", {}).get("steady", math.nan) / row["steady"]
    print(f"\n# Compressed DDP over a shaped link ({data['date']}, model {data['args']['model']}, seeds "
          f"{data['args']['seeds']}, budget {data['args']['budget']} s/run)\n")  # fmt: skip
    how = "dense's final loss on each link" if target == "per-link" else "worst final dense loss"
    if target not in (None, "per-link"):
        how = "given"
    shown = ", ".join(f"{link} {t:.4f}" for link, t in sorted(targets.items()))
    print(f"Target loss ({how}, trailing mean of {SMOOTH} steps): {shown}\n")
    print("| link (measured) | strategy | step time (ms) | MB / step / rank (run mean; last step) "
          "| time to target (s) | speed-up vs dense "
          f"| final loss after budget | steps in budget | loss at step {COMPARE_STEP} "
          "| steady step-time ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for link, rows in table.items():
        meas = data["links"].get(link, {}).get("measured_mbit", math.nan)
        for name in sorted(rows, key=_order):
            r = rows[name]
            tt = "not reached" if math.isnan(r["t_target"]) else f"{r['t_target']:.1f}"
            sp = "-" if math.isnan(r["speedup"]) else f"{r['speedup']:.1f}x"
            print(f"| {link} ({meas:.0f} Mbit/s) | {_label(name)} | {1e3 * r['step_s']:.0f} "
                  f"| {r['bytes'] / 1e6:.3f}; {r['last_bytes'] / 1e6:.3f} "
                  f"| {tt} | {sp} | {r['final']:.4f} | {r['steps']:.0f} | {r['at_step']:.4f} "
                  f"| {r['steady_speedup']:.2f}x |")  # fmt: skip
    _profile(data, table)
    return {"table": table, "target": target, "targets": targets}


def _profile(data: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    """Where a steady-state step goes: compute floor (``nocomm`` run: forward + backward + SGD), wire time, and the
    rest (compress + decompress + hook work + communication not overlapped with backward) per strategy and link.
    Wire time = last-step bytes x 8 / measured rate: at 2 ranks a ring allreduce and an allgather both make each
    rank transmit its payload once. Dense DDP overlaps its allreduce with backward, so its rest can be negative."""
    floors = [rows["nocomm"]["steady"] for rows in table.values() if "nocomm" in rows]
    if not floors:
        return
    floor = statistics.fmean(floors)
    print(f"\nProfile (compute floor = no-communication step, forward + backward + SGD: {1e3 * floor:.0f} ms)\n")
    print("| link | strategy | steady step (ms) | compute floor (ms) | wire time at measured rate (ms) "
          "| rest: compress + decompress + hook + unoverlapped comm (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for link, rows in table.items():
        mbit = data["links"][link]["measured_mbit"]
        for name in sorted(rows, key=_order):
            if name == "nocomm":
                continue
            r = rows[name]
            wire = r["last_bytes"] * 8 / (mbit * 1e6)
            print(f"| {link} | {_label(name)} | {1e3 * r['steady']:.0f} | {1e3 * floor:.0f} | {1e3 * wire:.0f} | "
                  f"{1e3 * (r['steady'] - floor - wire):.0f} |")  # fmt: skip


def plot(data: dict[str, Any], summary: dict[str, Any], path: Path = FIG) -> None:
    """Speed-up over dense (time to target) against the measured link rate, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    table = summary["table"]
    links = sorted(table, key=lambda lk: data["links"][lk]["measured_mbit"])
    names = sorted({n for rows in table.values() for n in rows}, key=_order)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    panels = [("speedup", "time to target loss"), ("steady_speedup", "step time after warm-ups (median, last 10)")]
    for ax, (key, what) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            if name in ("dense", "nocomm"):
                continue
            pts = [(data["links"][lk]["measured_mbit"], table[lk][name][key]) for lk in links if name in table[lk]]
            pts = [(x, y) for x, y in pts if not math.isnan(y)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=_label(name))
        ax.axhline(1.0, color="k", lw=1, label="dense DDP")
        ax.plot([100, 1000], [5, 2], "r*", ms=12, ls="none", label="goal (5x at 100 Mbit/s, 2x at 1 Gbit/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
        ax.set_xlabel("measured link rate (Mbit/s, log)")
        ax.set_title(f"speed-up over dense: {what}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("dense / compressed (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"2 CPU ranks (gloo) across a tbf-shaped veth link, {data['args']['model']}")
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp12m", choices=["mlp12m", "llama-tiny"])
    parser.add_argument("--links", default="100mbit,1gbit,10gbit")
    parser.add_argument("--strategies", default=",".join(s for s in ALL_STRATEGIES if s != "nocomm"))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budget", type=float, default=40.0, help="wall-clock seconds of training per run")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--json", help="raw records (written after every run)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json, run the rest")
    parser.add_argument("--analyze", help="only print the tables / plot from this --json file")
    parser.add_argument(
        "--target",
        help="target loss, or 'per-link': dense's final loss on each link (default: the"
        " worst final dense loss over all links)",
    )
    parser.add_argument("--fig", default=str(FIG))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    data = _load(args.analyze.split(",")) if args.analyze else run(args)
    summary = analyze(data, args.target)
    if not args.no_plot:
        plot(data, summary, Path(args.fig))


def _load(paths: list[str]) -> dict[str, Any]:
    """One or more ``--json`` files as one data set (e.g. per-link runs with different budgets)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    data = {**files[0], "runs": [r for f in files for r in f["runs"]], "links": {}}
    for f in files:
        data["links"].update(f["links"])
    return data


if __name__ == "__main__":
    main()
