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

__all__ = ["SignalAtStep", "TouchAtStep"]


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
