"""The compression benchmarks' shared task, models and 2-rank Lightning job (not a benchmark itself).

``compression_convergence.py`` and ``compression_momentum.py`` run their rows through :func:`run_all` (every row
a 2-rank Lightning job of :func:`run_worker`, launched by :func:`_harness.run_ranks`);
``compression_bytes_and_time.py`` and ``compression_link.py`` time the same 12.6M-parameter MLP
(:func:`make_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _harness import quiet_trainer, run_ranks, save_figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["common_args", "make_batch", "make_data", "make_model", "make_module", "plot_curves", "run_all",
           "run_worker", "summarize"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the timed MLP
def make_model(seed: int = 0, widths: tuple[int, ...] = (1024, 2048, 2048, 2048, 1024)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batch(rank: int, batch: int, in_dim: int = 1024, classes: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234 + rank)
    return torch.randn(batch, in_dim, generator=gen), torch.randint(classes, (batch,), generator=gen)


# ---------------------------------------------------------------------------------------------- data, model
def make_data(
    seed: int = 0, noise: float = 1.5, clusters: int = 8, n_train: int = 8192, n_test: int = 4096
) -> tuple[torch.Tensor, ...]:
    """Seeded 10-class problem: ``clusters`` Gaussian clusters per class (std ``noise``, centers of std 2) in
    16-D, through a fixed random 16->64 tanh map plus 0.1 noise. noise 1.5 / 8 clusters: ~86% reachable test
    accuracy (hard); noise 1.0 / 4 clusters: ~99% (easy)."""
    gen = torch.Generator().manual_seed(seed)
    classes, per_class, latent, dim = 10, clusters, 16, 64
    centers = 2.0 * torch.randn(classes * per_class, latent, generator=gen)
    proj = torch.randn(latent, dim, generator=gen) / latent**0.5

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cluster = torch.randint(classes * per_class, (n,), generator=gen)
        z = centers[cluster] + noise * torch.randn(n, latent, generator=gen)
        x = torch.tanh(z @ proj) + 0.1 * torch.randn(n, dim, generator=gen)
        return x, cluster % classes

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    return x_tr, y_tr, x_te, y_te


def make_module(lr: float, momentum: float, hidden: int = 256) -> Any:
    from lightning.pytorch import LightningModule

    class MLP(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
            )
            self.losses: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)

    return MLP()


# ---------------------------------------------------------------------------------------------- one DDP job
def run_worker(spec: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Body of one 2-rank Lightning job (each rank runs it: an external launch, see ``_harness.run_ranks``);
    writes ``rank<r>.json`` into ``out``."""
    warnings.filterwarnings("ignore")
    import logging

    from lightning.pytorch import Callback, Trainer, seed_everything

    import lightning_gd.strategies  # noqa: F401  (registers the ddp_<compressor> strategy names)
    from lightning_gd.strategies import CompressedDDPStrategy

    for name in ("lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    seed_everything(args.seed, verbose=False)
    x_tr, y_tr, x_te, y_te = make_data(args.seed, args.noise, args.clusters)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch, shuffle=True)
    model = make_module(spec.get("lr", args.lr), spec.get("momentum", 0.0))

    class BytesOverRun(Callback):
        """Sums the strategy's per-step ``compression/bytes_sent`` and ``compression/dense_bytes``."""

        sent = dense = 0.0

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            metrics = trainer.callback_metrics
            if "compression/bytes_sent" in metrics:
                self.sent += float(metrics["compression/bytes_sent"])
                self.dense += float(metrics["compression/dense_bytes"])

    bytes_over_run = BytesOverRun()
    strategy = spec["strategy"]
    if isinstance(strategy, dict):
        strategy = CompressedDDPStrategy(**strategy)
    trainer = quiet_trainer(
        devices=2,
        strategy=strategy,
        max_steps=args.steps,
        max_epochs=-1,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[bytes_over_run],
    )
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits_tr, logits_te = model(x_tr), model(x_te)
        result = {
            "losses": model.losses,
            "train_loss": float(nn.functional.cross_entropy(logits_tr, y_tr)),
            "train_acc": float((logits_tr.argmax(1) == y_tr).float().mean()),
            "test_loss": float(nn.functional.cross_entropy(logits_te, y_te)),
            "test_acc": float((logits_te.argmax(1) == y_te).float().mean()),
            "param_checksum": float(sum(p.double().sum() for p in model.parameters())),
            "wall_s": wall,
            "global_step": trainer.global_step,
        }
    # The strategy's per-step log (callback_metrics), not compression_stats(): for PowerSGD a second call after the
    # step reports the dense warm-up numbers (see RESULTS.md).
    result["stats"] = {
        k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("compression/")
    }
    result["bytes_over_run"] = [bytes_over_run.dense, bytes_over_run.sent]
    if hasattr(trainer.strategy, "hook_state") and hasattr(trainer.strategy.hook_state, "stats"):
        result["stats"]["buckets"] = trainer.strategy.hook_state.stats().get("buckets")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def launch(script: Path, spec: dict[str, Any], workdir: Path, extra: list[str], timeout: float = 600) -> list[dict]:
    """Run ``script --worker SPEC`` as a 2-rank Lightning job (every rank its own process); return both ranks'
    results."""
    out = workdir / f"job{len(list(workdir.iterdir()))}"
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--out", str(out), *extra]
    try:
        run_ranks(cmd, world_size=2, timeout=timeout, cwd=workdir, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except RuntimeError as err:
        raise RuntimeError(f"job {spec} failed: {err}") from None
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def summarize(results: list[dict]) -> dict[str, Any]:
    """Both ranks' per-step losses averaged; final loss = mean of the last 10 steps."""
    steps = min(len(r["losses"]) for r in results)
    curve = [(results[0]["losses"][i] + results[1]["losses"][i]) / 2 for i in range(steps)]
    r0 = results[0]
    return {
        "curve": curve,
        "final_loss": sum(curve[-10:]) / 10,
        "train_loss": r0["train_loss"],
        "test_acc": r0["test_acc"],
        "train_acc": r0["train_acc"],
        "ranks_agree": abs(results[0]["param_checksum"] - results[1]["param_checksum"])
        <= 1e-9 * max(1.0, abs(results[0]["param_checksum"])),
        "ratio": r0["stats"].get("ratio", 1.0),
        "run_ratio": r0["bytes_over_run"][0] / r0["bytes_over_run"][1] if r0["bytes_over_run"][1] else 1.0,
        "bytes_sent": r0["stats"].get("bytes_sent"),
        "buckets": r0["stats"].get("buckets"),
        "wall_s": r0["wall_s"],
        "global_step": r0["global_step"],
    }


def common_args(parser: argparse.ArgumentParser, steps: int, lr: float, noise: float, clusters: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--noise", type=float, default=noise, help="cluster std of the synthetic task")
    parser.add_argument("--clusters", type=int, default=clusters, help="clusters per class")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="also dump raw results here")
    parser.add_argument("--configs", nargs="+", default=None, help="row names to run (default: the first seven)")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run_all(script: Path, configs: dict[str, dict], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every config for every seed (config-major within a seed); returns name -> [summary per seed]."""
    res: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, spec in configs.items():
                extra = ["--steps", str(args.steps), "--lr", str(args.lr), "--batch", str(args.batch),
                         "--seed", str(seed), "--noise", str(args.noise), "--clusters", str(args.clusters)]  # fmt: skip
                s = summarize(launch(script, spec, Path(tmp), extra))
                res[name].append(s)
                print(
                    f"  seed {seed} {name}: final loss {s['final_loss']:.4f}, test acc {s['test_acc']:.4f} "
                    f"({s['wall_s']:.0f} s)",
                    flush=True,
                )
    return res


def plot_curves(res: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, runs in res.items():
        curve = runs[0]["curve"]
        w = 20
        smooth = [
            sum(curve[max(0, i - w + 1) : i + 1]) / len(curve[max(0, i - w + 1) : i + 1]) for i in range(len(curve))
        ]
        ax.plot(range(1, len(curve) + 1), smooth, label=name, lw=1.4, ls="--" if "dense" in name.lower() else "-")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (first seed)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
