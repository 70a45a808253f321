"""Plot logged metrics (loss curves by default) against the global step at the end of fitting."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_gd.utils.checks import check_positive_int
from lightning_gd.utils.logging import history_from_state, history_to_state
from lightning_gd.utils.plotting import new_figure, run_dir, save_figure

__all__ = ["MetricPlotter"]


class MetricPlotter(Callback):
    """Record scalar metrics while training and plot them against the step when fitting ends.

    Training metrics (names not starting with ``val``) are read from ``trainer.callback_metrics`` every
    ``every_n_steps`` optimizer steps, validation metrics after each validation run (the sanity check
    excluded). The PNG goes to the run directory (``trainer.log_dir``) and, with a TensorBoard logger,
    into TensorBoard's images. The history is part of the checkpoint, so a resumed run plots its whole
    past.

    Args:
        metrics: Names of logged metrics to plot, in one figure.
        every_n_steps: How often training metrics are recorded.
        filename: Name of the PNG in the run directory.
        log_scale: Logarithmic y axis.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[MetricPlotter(metrics=["train/loss", "val/loss"])])
    """

    def __init__(
        self,
        metrics: list[str] | tuple[str, ...] = ("train/loss", "val/loss"),
        every_n_steps: int = 10,
        filename: str = "loss_curves.png",
        log_scale: bool = False,
    ) -> None:
        if not metrics:
            raise MisconfigurationException(f"`metrics` must name at least one metric, got {metrics!r}")
        check_positive_int("every_n_steps", every_n_steps, error=MisconfigurationException)
        if not filename.endswith(".png"):
            raise MisconfigurationException(f"`filename` must end with .png, got {filename!r}")
        self.metrics = list(metrics)
        self.every_n_steps = every_n_steps
        self.filename = filename
        self.log_scale = log_scale
        self.history: dict[str, list[tuple[int, float]]] = {m: [] for m in self.metrics}
        self.last_path: str | None = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            for name in self.metrics:
                if not name.startswith("val"):
                    self._record_one(trainer, name)

    def _record_one(self, trainer: Trainer, name: str) -> None:
        # One point per step: validation may run several times in a step under gradient accumulation.
        value = trainer.callback_metrics.get(name)
        if value is None or value.numel() != 1:
            return
        value = float(value)
        points = self.history[name]
        if math.isfinite(value) and (not points or points[-1][0] != trainer.global_step):
            points.append((trainer.global_step, value))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name in self.metrics:
            if name.startswith("val"):
                self._record_one(trainer, name)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = run_dir(trainer)  # on every rank: a collective under DDP
        if not trainer.is_global_zero or not any(self.history.values()):
            return
        fig, ax = new_figure()
        for name, points in self.history.items():
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_yscale("log" if self.log_scale else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
        self.last_path = save_figure(trainer, fig, log_dir, self.filename, tag="metrics/" + self.filename[:-4])
        rank_zero_info(f"MetricPlotter: wrote {self.last_path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": history_to_state(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.update(history_from_state(state_dict.get("history", {})))
