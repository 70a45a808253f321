"""The overhead budget of a measuring callback: the wall time it spends measuring against a share of training time.

A due check is skipped while one more check, as costly as the latest, would take the time spent measuring above
``max_overhead`` times the training time (the run's wall time less the measuring). Rank zero's clock decides for
every rank; the first skip warns once, naming the cost of a check; the count of skips is logged and checkpointed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.utils.checks import check_number
from lightning_gd.utils.logging import log_to_loggers

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["OverheadBudget"]


class OverheadBudget:
    """Time accounting and skip decisions of a callback that measures every ``every_n_steps`` optimizer steps.

    Args:
        max_overhead: Largest fraction of the training wall time spent measuring (``None``: no budget, never skip).
        owner: The callback's name, first in the warning.
        metric: The metric that counts the skipped checks (``"sharpness/skipped_checks"``).
        every_n_steps: The callback's schedule, named in the warning's advice.

    Example::

        # not run: inside a callback's hooks, under a Trainer
        self._budget = OverheadBudget(0.025, "SharpnessTracker", "sharpness/skipped_checks", every_n_steps=100)
        self._budget.start()                        # on_train_start
        if self._budget.over(trainer):              # at a due step; a collective under DDP: call on every rank
            self._budget.skip(trainer, step)
        else:
            with self._budget.timed():
                measure()

    Raises:
        MisconfigurationException: for a ``max_overhead`` that is neither ``None`` nor a finite number > 0.
    """

    def __init__(self, max_overhead: float | None, owner: str, metric: str, every_n_steps: int) -> None:
        if max_overhead is not None:
            check_number("max_overhead", max_overhead, 0, low_open=True, error=MisconfigurationException)
        self.max_overhead = max_overhead
        self.owner, self.metric, self.every_n_steps = owner, metric, every_n_steps
        self.skipped = 0  # due checks skipped by the budget
        self.spent_s = 0.0  # wall time spent measuring (this fit and before a resume)
        self.last_cost_s = 0.0  # duration of the latest check: the estimate of the next one's
        self._elapsed_before_s = 0.0  # training wall time of the run before it was resumed
        self._fit_start: float | None = None
        self._warned = False

    def start(self) -> None:
        """Start the run's clock (at the start of training)."""
        self._fit_start = time.perf_counter()

    def elapsed_s(self) -> float:
        """Wall time of the run so far, the time before a resume included."""
        running = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return self._elapsed_before_s + running

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the time of the block as measuring, and keep it as the estimate of the next check's cost."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last_cost_s = time.perf_counter() - start
            self.spent_s += self.last_cost_s

    def over(self, trainer: Trainer) -> bool:
        """Whether a check now (as costly as the last) would exceed ``max_overhead`` (rank 0 decides for all)."""
        if self.max_overhead is None:
            return False
        training_s = self.elapsed_s() - self.spent_s
        over = self.spent_s + self.last_cost_s > self.max_overhead * training_s
        if trainer.world_size > 1:  # wall clocks differ per rank: one decision, or a rank waits alone
            over = bool(trainer.strategy.broadcast(over, src=0))
        return over

    def skip(self, trainer: Trainer, step: int) -> None:
        """Count a due check skipped by the budget, log the count, and say why the first time."""
        self.skipped += 1
        log_to_loggers(trainer, {self.metric: float(self.skipped)}, step=step)
        if self._warned:
            return
        self._warned = True
        step_s = max(self.elapsed_s() - self.spent_s, 1e-9) / max(step, 1)
        cost, budget = self.last_cost_s, float(self.max_overhead or 0.0)
        rank_zero_warn(
            f"{self.owner}: skipped the check due at step {step}, and will skip due checks while over its"
            f" budget `max_overhead={self.max_overhead}` ({budget:.1%} of the training time). One check costs"
            f" {cost:.3g} s, about {cost / step_s:.1f} training steps of {step_s:.3g} s, against one check every"
            f" {self.every_n_steps} steps. To measure at every due step pass `max_overhead=None`; to stay within the"
            f" budget use `every_n_steps` >= {math.ceil(cost / (budget * step_s))}. `{self.metric}` counts the"
            " skipped checks. Warning once."
        )

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The accounting, under the keys the curvature callbacks' checkpoints have always used."""
        return {
            "spent_s": self.spent_s,
            "last_cost_s": self.last_cost_s,
            "elapsed_s": self.elapsed_s(),
            "skipped_checks": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accounting; a key missing from an older checkpoint starts from zero."""
        self.spent_s = float(state.get("spent_s", 0.0))
        self.last_cost_s = float(state.get("last_cost_s", 0.0))
        self._elapsed_before_s = float(state.get("elapsed_s", 0.0))
        self.skipped = int(state.get("skipped_checks", 0))
