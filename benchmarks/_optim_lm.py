"""Shared harness of the optimizer benchmarks on the quickstart model and corpus (not a benchmark itself).

``train(recipe, seed, steps, ...)`` trains the quickstart's ``tiny`` LLaMA (byte-level, the stdlib's sources,
windows of 128 bytes, batches of 16) with an :class:`~lightning_gd.optim.OptimizerRecipe` and returns the
validation losses by step (a fixed set of validation windows) and the training losses.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _harness import quiet_trainer
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_gd.optim import OptimizerRecipe
from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule


class _Record(Callback):
    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train.append((trainer.global_step, float(outputs["loss"])))

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def train(
    recipe: OptimizerRecipe,
    seed: int,
    steps: int,
    val_every: int,
    val_batches: int = 8,
    seq_len: int = 128,
    batch_size: int = 16,
    threads: int = 1,
    data: TextCorpusDataModule | None = None,
) -> dict[str, Any]:
    """One run; returns ``{"val": [(step, loss)], "train": [(step, loss)], "wall_s": float}``.

    Pass the same ``data`` (see :func:`corpus`) to every run of a process: the corpus is read once.
    """
    torch.set_num_threads(threads)
    data = data or corpus(seq_len, batch_size)
    seed_everything(seed, verbose=False)
    module = CausalLMModule(preset="tiny", block_size=seq_len, optimizer_recipe=recipe)
    record = _Record()
    trainer = quiet_trainer(
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        callbacks=[record],
    )
    start = time.perf_counter()
    trainer.validate(module, datamodule=data, verbose=False)
    record.val = [(0, float(trainer.callback_metrics["val/loss"]))]
    trainer.fit(module, datamodule=data)
    return {"val": record.val, "train": record.train, "wall_s": time.perf_counter() - start}


def corpus(seq_len: int = 128, batch_size: int = 16) -> TextCorpusDataModule:
    """The quickstart corpus (the stdlib's sources; the same windows for every seed), read once."""
    data = TextCorpusDataModule(seq_len=seq_len, batch_size=batch_size, seed=1234)
    data.prepare_data()
    data.setup("fit")
    return data


def first_step_reaching(val: list[tuple[int, float]], target: float) -> int | None:
    """The first validation step whose loss is <= target (None if never)."""
    return next((s for s, loss in val if loss <= target), None)
