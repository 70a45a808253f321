"""Save a matplotlib figure as a PNG in the run directory and as an image in TensorBoard."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from matplotlib.figure import Figure

__all__ = ["new_figure", "run_dir", "save_figure"]


def run_dir(trainer: Trainer) -> str:
    """The run directory (``trainer.log_dir``, else ``default_root_dir``).

    Call on every rank: under DDP ``trainer.log_dir`` broadcasts from rank zero, so calling it on one rank
    alone deadlocks.
    """
    return trainer.log_dir or trainer.default_root_dir


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, plt.Axes]:
    """A figure and axes detached from pyplot's global state (safe in long-running training)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(
    trainer: Trainer, fig: Figure, log_dir: str, filename: str, tag: str | None = None, step: int | None = None
) -> str:
    """Write ``fig`` to ``<log_dir>/<filename>`` and to every TensorBoard logger under ``tag``, at ``step``
    (default: the trainer's global step).

    Call on global rank zero only, with ``log_dir`` from :func:`run_dir` (called on every rank). Returns
    the PNG's path.
    """
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, filename)
    fig.tight_layout()
    fig.savefig(path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            name = tag or os.path.splitext(filename)[0]
            logger.experiment.add_figure(name, fig, global_step=trainer.global_step if step is None else step)
    return path
