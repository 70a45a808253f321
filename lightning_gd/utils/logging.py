"""Log metrics from a callback or strategy hook straight to the Trainer's loggers, and checkpoint their history."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["History", "history_from_state", "history_to_state", "log_to_loggers"]

# metric name -> its (step, value) points, as the measuring callbacks keep them
History = dict[str, list[tuple[int, float]]]


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


def history_to_state(history: History) -> dict[str, list[list[float]]]:
    """``history`` as plain lists, for a checkpoint (read back by :func:`history_from_state`).

    Example::

        >>> history_from_state(history_to_state({"loss": [(1, 0.5)]}))
        {'loss': [(1, 0.5)]}
    """
    return {name: [list(p) for p in points] for name, points in history.items()}


def history_from_state(state: dict[str, list[list[float]]]) -> History:
    """The history :func:`history_to_state` wrote: steps as ints, values as floats."""
    return {name: [(int(s), float(v)) for s, v in points] for name, points in state.items()}
