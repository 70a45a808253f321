"""Linear warm-up then a decay: cosine (LLaMA and most LLM pretraining), linear, polynomial, warmup-stable-decay
or constant.

Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine annealing);
Goyal et al. 2017, "Accurate, Large Minibatch SGD" (linear warm-up); You et al. 2017, "Large Batch Training of
Convolutional Networks" (LARS, polynomial decay); Hu et al. 2024, "MiniCPM" (warmup-stable-decay).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_gd.optim.specs import DECAYS, Decay
from lightning_gd.utils.checks import check_number

__all__ = ["WarmupCosineLR", "WarmupDecayLR"]


class WarmupDecayLR(LRScheduler):
    """Multiply each group's base lr by a linear warm-up from 0, then a decay down to ``min_lr_ratio``.

    For step s (the number of ``step()`` calls so far), warm-up length W and total length S:
    factor(s) = (s + 1) / (W + 1) for s < W, else r + (1 - r) f(p) with p = min(1, (s - W) / max(1, S - W)),
    r = ``min_lr_ratio`` and f by ``decay``:

    - ``cosine``: f = (1 + cos(pi p)) / 2
    - ``linear``: f = 1 - p
    - ``polynomial``: f = (1 - p) ** ``power`` (LARS ImageNet recipes: power 2, ConAdv's: 1.6)
    - ``wsd`` (warmup-stable-decay): f = 1 while p < 1 - D, then linear to 0 over the last D of the post-warm-up
      steps, D = ``decay_fraction``
    - ``constant``: f = 1

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: W as a number of steps (int >= 0) or as a fraction of ``total_steps`` (float in [0, 1)).
        total_steps: S; ``None`` leaves it to be set before the first step (``CausalLMModule`` fills in
            the Trainer's estimated stepping batches).
        min_lr_ratio: r, the final lr as a fraction of the base lr.
        decay: The shape f after warm-up (see above).
        power: The exponent of ``polynomial`` (> 0).
        decay_fraction: D of ``wsd``, in (0, 1].
        last_epoch: Index of the last step, for resuming (``-1`` starts fresh).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> sched = WarmupDecayLR(opt, warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
        >>> for step in range(100):  # your training loop: a step of the optimizer, then of the schedule
        ...     opt.step()
        ...     sched.step()
        >>> sched.get_last_lr()  # the end of the warm-up: the peak
        [0.001]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
        decay: Decay = "cosine",
        power: float = 1.0,
        decay_fraction: float = 0.2,
    ) -> None:
        if isinstance(warmup_steps, float):
            check_number("warmup_steps` as a fraction of `total_steps", warmup_steps, 0, 1, high_open=True)
        check_number("warmup_steps", warmup_steps, 0)
        if total_steps is not None:
            check_number("total_steps", total_steps, 1)
        check_number("min_lr_ratio", min_lr_ratio, 0, 1)
        if decay not in DECAYS:
            raise ValueError(f"Unknown schedule `decay`={decay!r}; valid names: {', '.join(DECAYS)}")
        check_number("power", power, 0, low_open=True)
        check_number("decay_fraction", decay_fraction, 0, 1, low_open=True)
        self.decay = decay
        self.power = power
        self.decay_fraction = decay_fraction
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Set S after construction and re-apply the current lr (the first step's lr depends on S)."""
        check_number("total_steps", total_steps, 1)
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
        p = min(1.0, (step - W) / max(1, self.total_steps - W))
        r = self.min_lr_ratio
        return r + (1.0 - r) * _shape(self.decay, p, self.power, self.decay_fraction)

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(max(0, self.last_epoch))
        return [base_lr * factor for base_lr in self.base_lrs]


class WarmupCosineLR(WarmupDecayLR):
    """The earlier name of :class:`WarmupDecayLR` (it always did more than cosine), kept so that YAML configs
    (``class_path: WarmupCosineLR``), scripts and checkpoints written with it keep working."""


def _shape(decay: Decay, p: float, power: float, decay_fraction: float) -> float:
    """f(p) of the decay after warm-up, for progress p in [0, 1]."""
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if decay == "linear":
        return 1.0 - p
    if decay == "polynomial":
        return (1.0 - p) ** power
    if decay == "wsd":
        stable_end = 1.0 - decay_fraction
        return 1.0 if p < stable_end else (1.0 - p) / decay_fraction
    return 1.0
