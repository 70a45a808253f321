"""Non-finite values in a callback's measurement: one decision on every rank, and one warning per run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn

from lightning_gd.utils.ranks import finite_on_every_rank

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from torch import Tensor

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Skip a step whose values are non-finite on any rank, and say so once.

    Args:
        owner: The callback's name, first in the warning.
        what: What was non-finite (``"Lyapunov exponents"``).
        skipped: What happens instead (``"this flossing step is skipped"``).

    Example::

        # not run: inside a callback's hook, under a Trainer
        self._nonfinite = NonFiniteGuard("GradientFlossing", "Lyapunov exponents", "this flossing step is skipped")
        if not self._nonfinite.finite_everywhere(trainer, loss):   # a collective under DDP: call on every rank
            return
    """

    def __init__(self, owner: str, what: str, skipped: str) -> None:
        self.owner, self.what, self.skipped = owner, what, skipped
        self.warned = False

    def finite_everywhere(self, trainer: Trainer, values: Tensor) -> bool:
        """Whether ``values`` are finite on every rank (every rank gets the same answer); warns the first time not."""
        finite = finite_on_every_rank(trainer, values)
        if not finite:
            self.warn(trainer.global_step)
        return finite

    def warn(self, step: int) -> None:
        """The warning, once per run: for callers that took the decision themselves."""
        if not self.warned:
            rank_zero_warn(f"{self.owner}: non-finite {self.what} at step {step}; {self.skipped}. Warning once.")
            self.warned = True
