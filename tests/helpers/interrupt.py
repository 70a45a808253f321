"""Callbacks that stand in for the outside world in stop-and-resume tests: a signal at a chosen step, a marker file.

They take effect through the operating system (``os.kill`` of the process itself; a file a parent process waits
for), so the code under test sees exactly what a terminal's Ctrl-C or a scheduler's SIGTERM gives it.

Example::

    lightning-gd fit ... --trainer.callbacks+=tests.helpers.interrupt.SignalAtStep --trainer.callbacks.step 4
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["TINY_QUICKSTART", "PidFile", "SignalAtStep", "TouchAtStep"]

#: ``lightning-gd fit --config quickstart`` arguments that shrink it to seconds: 16 steps an epoch, validation (and
#: last.ckpt) every 2 steps, one layer with dropout.
TINY_QUICKSTART = [
    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--data.seq_len", "32", "--data.train_windows", "64", "--data.val_windows", "8", "--data.batch_size", "4",
    "--model.overrides", "{block_size: 32, n_layer: 1, dropout: 0.1}",
]  # fmt: skip


class SignalAtStep(Callback):
    """Send ``signal`` to this very process once, after optimizer step ``step`` (on ``rank`` only, or every rank)."""

    def __init__(self, step: int, signal: str = "SIGINT", rank: int | None = None) -> None:
        self.step = step
        self.signal = signal
        self.rank = rank
        self._sent = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        mine = self.rank is None or trainer.global_rank == self.rank
        if mine and not self._sent and trainer.global_step >= self.step:
            self._sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class TouchAtStep(Callback):
    """Create the file ``path`` once optimizer step ``step`` is done (rank zero), for a parent process to wait for."""

    def __init__(self, path: str, step: int = 1) -> None:
        self.path = path
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.is_global_zero and trainer.global_step >= self.step and not os.path.exists(self.path):
            with open(self.path, "w") as f:
                f.write(str(trainer.global_step))


class PidFile(Callback):
    """Write this process's id to ``<folder>/rank<R>.pid`` when training starts (again after every restart), so
    that another process can kill one rank."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"rank{trainer.global_rank}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
