"""Log metrics from a callback or strategy hook straight to the Trainer's loggers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["log_to_loggers"]


def log_to_loggers(trainer: Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Put ``metrics`` in ``trainer.callback_metrics`` (every rank) and send them to every logger (rank zero).

    For hooks where ``LightningModule.log`` is not allowed (``optimizer_step``, ``on_train_batch_end`` of a
    strategy, measurements outside the module's step). Call on every rank: ``callback_metrics`` stays the
    same everywhere, and only global rank zero writes.
    """
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
