"""Linear warm-up then cosine decay, the schedule of LLaMA and most LLM pretraining recipes.

Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine annealing);
Goyal et al. 2017, "Accurate, Large Minibatch SGD" (linear warm-up).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(LRScheduler):
    """Multiply each group's base lr by a linear warm-up from 0, then a cosine down to ``min_lr_ratio``.

    For step s (the number of ``step()`` calls so far), warm-up length W and total length S:
    factor(s) = (s + 1) / (W + 1) for s < W, else r + (1 - r) (1 + cos(pi p)) / 2 with
    p = min(1, (s - W) / max(1, S - W)) and r = ``min_lr_ratio``.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: W as a number of steps (int >= 0) or as a fraction of ``total_steps`` (float in [0, 1)).
        total_steps: S; ``None`` leaves it to be set before the first step (``CausalLMModule`` fills in
            the Trainer's estimated stepping batches).
        min_lr_ratio: r, the final lr as a fraction of the base lr.
        last_epoch: Index of the last step, for resuming (``-1`` starts fresh).

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = WarmupCosineLR(opt, warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
        for batch in loader:
            ...
            opt.step()
            sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0:
            raise ValueError(f"`warmup_steps` as a fraction must be in [0, 1), got {warmup_steps}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Set S after construction and re-apply the current lr (the first step's lr depends on S)."""
        if total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def _warmup_length(self) -> int:
        if isinstance(self.warmup_steps, float):
            return round(self.warmup_steps * (self.total_steps or 0))
        return int(self.warmup_steps)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the base lr after ``step`` scheduler steps."""
        W = self._warmup_length()
        if step < W:
            return (step + 1) / (W + 1)
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - W) / max(1, self.total_steps - W))
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(max(0, self.last_epoch))
        return [base_lr * factor for base_lr in self.base_lrs]
