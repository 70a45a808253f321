"""A tqdm progress bar whose totals stay right after a mid-epoch resume."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from typing_extensions import override

__all__ = ["ResumeProgressBar"]


class ResumeProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with the epoch's total counted in the same batches as its position.

    With ``max_steps``, Lightning's bar shows the batch's index in the epoch against ``min(batches per epoch, steps
    left)``. After a resume in the middle of an epoch the index starts where the checkpoint left off, but the total
    counts only the steps left: a run resumed at step 110 of 119 read ``110/9``. Here the total is
    ``min(batches per epoch, first batch index + steps left x accumulate_grad_batches)`` and the bar starts at the
    first index (``110/119``). The ``lightning-gd`` command uses it unless the trainer has a progress bar already.

    Args:
        refresh_rate: As :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
        process_position: As :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
        leave: As :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(max_steps=1000, callbacks=[ResumeProgressBar()])
        >>> # trainer.fit(model, ckpt_path="last.ckpt"): "Epoch 0: 110/1000" when resumed at batch 110, not "110/890"
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._first_batch: int | None = None  # in-epoch index of the epoch's first batch (> 0 after a resume)
        self._steps_at_epoch_start = 0

    @property
    @override
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            left = (trainer.max_steps - self._steps_at_epoch_start) * trainer.accumulate_grad_batches
            total = min(total, (self._first_batch or 0) + left)
        return total

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        self._first_batch, self._steps_at_epoch_start = None, trainer.global_step
        super().on_train_epoch_start(trainer, *args)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The first batch tells where in the epoch a resumed run starts (the loop restores it after the epoch hook).
        if self._first_batch is None:
            self._first_batch = batch_idx
            if self._train_progress_bar is not None:
                self.train_progress_bar.total = convert_inf(self.total_train_batches)
                self.train_progress_bar.initial = self.train_progress_bar.n = batch_idx
                self.train_progress_bar.refresh()
