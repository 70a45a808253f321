"""A tiny Lightning DDP job for netlab's smoke test: ``Trainer(num_nodes=2, devices=1)``, a 1-layer model.

Each rank writes ``<out>/rank<R>.json`` with its rank, world size, steps done and a parameter checksum (equal on
both ranks after DDP). ``--crash-rank R`` makes rank R raise after setup, to test the harness's failure path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Tiny(L.LightningModule):
    """Linear regression, 64 -> 64."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 64)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--crash-rank", type=int, default=-1)
    args = parser.parse_args()
    rank = int(os.environ["GLOBAL_RANK"])
    if rank == args.crash_rank:
        raise RuntimeError(f"rank {rank}: crashing on purpose (--crash-rank)")
    import lightning_gd.strategies  # noqa: F401  (registers the ddp_<compressor> strategy names)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, 64), torch.randn(512, 64))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy=args.strategy, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = Tiny()
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=16))
    result = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
        "checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
