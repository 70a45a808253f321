"""Stop a run on Ctrl-C or SIGTERM with its work saved: a checkpoint, then the end-of-fit plots and samples."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_gd._compat import log_step_metrics

__all__ = ["GracefulStop", "StopRequested"]

_NAMES = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}


class StopRequested(SystemExit):
    """Raised by :class:`GracefulStop` once the run's work is saved; the process exits with ``128 + signal``."""


def _write(message: str) -> None:
    """One line to stderr, from rank zero: ``os.write`` is safe inside a signal handler (``print`` may not be)."""
    if rank_zero_only.rank == 0:
        os.write(2, f"lightning-gd: {message}\n".encode())


class GracefulStop(Callback):
    """The first SIGINT (Ctrl-C) or SIGTERM stops the run at the end of the current optimizer step, after it saved
    a checkpoint and the end-of-fit outputs; a second one of the same signal exits at once.

    One mechanism for both signals. The handler only notes the request (nothing unsafe runs inside a signal
    handler); every rank checks the note after each optimizer step and after each validation run, and under DDP
    the ranks agree with one small all-reduce, so they all stop at the same step even when only one process got
    the signal (a ``kill`` of rank zero, a torchrun agent that forwards it). Then, on every rank together:

    1. ``trainer.save_checkpoint(<checkpoint dir>/<filename>.ckpt)``, an exact resume point (the same as a
       ``ModelCheckpoint(every_n_train_steps=...)`` file), written atomically by the ``lightning-gd`` command;
    2. the ``on_train_end`` and ``on_fit_end`` hooks of the other callbacks (not the checkpoint callbacks) and of
       the module, which write ``MetricPlotter``'s ``loss_curves.png``, ``TextSampler``'s ``sample.txt``, the
       curvature plots, ``ConAdvReport``'s figures; an output that fails is reported in one warning and skipped;
    3. :class:`StopRequested` (a ``SystemExit``): Lightning's exception path then runs every callback's
       ``on_exception`` and closes the loggers, and the process exits with 130 (SIGINT) or 143 (SIGTERM).

    It replaces Lightning's own handling for these signals while training runs: Lightning turns Ctrl-C into a
    ``KeyboardInterrupt`` wherever the process happens to be (possibly inside a collective, where no checkpoint
    can be taken), and its SIGTERM handler broadcasts from inside the handler; SLURM's ``SIGUSR1`` auto-requeue
    is left to Lightning. A relaunch of the same ``lightning-gd`` command resumes from the saved checkpoint. The
    ``lightning-gd`` command adds this callback to every ``fit``; a successful end of the run removes the file.

    Args:
        signals: The signals that request a stop.
        filename: The checkpoint's name, without ``.ckpt``, in the first ``ModelCheckpoint``'s directory (else
            ``<log_dir>/checkpoints``).
        outputs: Run the end-of-fit hooks before exiting.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gd.plugins import AtomicCheckpointIO
        >>> trainer = Trainer(callbacks=[GracefulStop()], plugins=[AtomicCheckpointIO()])
        >>> # trainer.fit(model); Ctrl-C: checkpoints/interrupted.ckpt, loss_curves.png, ..., exit status 130
    """

    def __init__(
        self, signals: Sequence[str] = ("SIGINT", "SIGTERM"), filename: str = "interrupted", outputs: bool = True
    ) -> None:
        valid = {s.name for s in signal.valid_signals() if isinstance(s, signal.Signals)}
        for name in signals:
            if name not in valid or name in ("SIGKILL", "SIGSTOP"):
                raise MisconfigurationException(f"`signals` must name catchable signals, got {name!r}")
        if not filename:
            raise MisconfigurationException(f"`filename` must not be empty, got {filename!r}")
        self.signals = tuple(signals)
        self.filename = filename
        self.outputs = outputs
        self.saved_path: str | None = None
        self._requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------ the handler
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = _NAMES.get(signal.Signals(signum).name, signal.Signals(signum).name)
        if self._requested is None:
            self._requested = signum
            again = "Ctrl-C" if signum == signal.SIGINT else name
            _write(
                f"{name}: stopping after this step, once a checkpoint, the plots and the sample are saved"
                f" ({again} again exits at once)"
            )
        elif signum == self._requested:
            _write(f"{name} again: exiting at once (the last complete checkpoint is kept)")
            self._kill_launched_processes()
            os._exit(128 + signum)
        # another signal while stopping (a torchrun agent's SIGTERM after the terminal's SIGINT): the same stop

    def _kill_launched_processes(self) -> None:
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signal.SIGKILL)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("GracefulStop: not in the main thread, where signals are handled: Ctrl-C saves nothing")
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle and handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After Lightning registered its own handlers (Trainer._run), which it restores at teardown.
        self._requested = None
        self._trainer = trainer
        self._install()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step_at_batch_start:  # not in the middle of gradient accumulation
            self._maybe_stop(trainer, pl_module, log_step=True)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training and not trainer.sanity_checking:  # validation inside fit: a clean resume point too
            self._maybe_stop(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()  # before Lightning's teardown puts back the handlers it found
        path = self._checkpoint_path(trainer)  # collective under DDP: every rank
        if self._requested is None and trainer.is_global_zero and os.path.exists(path):
            trainer.strategy.remove_checkpoint(path)  # the run went on past it and ended: superseded

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------ the stop
    def _maybe_stop(self, trainer: Trainer, pl_module: LightningModule, log_step: bool = False) -> None:
        requested = self._requested is not None
        if trainer.world_size > 1:  # every rank takes the same decision at the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        signum = self._requested if self._requested is not None else int(signal.SIGTERM)
        self._requested = signum  # a rank that got no signal of its own stops for the others' request
        if log_step:  # the step's values, which Lightning logs right after this hook: the resumed run will not
            log_step_metrics(trainer)
        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        _write(f"saved {_relative(path)} at step {trainer.global_step}: the same command continues from it")
        if self.outputs:
            self._end_of_fit_outputs(trainer, pl_module)
        raise StopRequested(128 + signum)

    def _checkpoint_path(self, trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        if folder is None:
            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(str(folder), f"{self.filename}.ckpt")

    def _end_of_fit_outputs(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """What a finished fit writes: the end hooks of the callbacks (checkpointing aside) and of the module."""
        callbacks = [c for c in trainer.callbacks if c is not self and not isinstance(c, Checkpoint)]
        for hook in ("on_train_end", "on_fit_end"):
            for owner in [*callbacks, pl_module]:
                method = getattr(owner, hook)
                try:
                    method(trainer, pl_module) if owner is not pl_module else method()
                except Exception as err:  # noqa: BLE001 - the checkpoint is saved; one output failing stops no other
                    rank_zero_warn(f"GracefulStop: {type(owner).__name__}.{hook} failed while stopping: {err}")


def _relative(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
