"""The map between pixel space, where an attack's budget is stated, and the model's normalized inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Normalization"]


def _as_tuple(name: str, value: float | Sequence[float] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if not values:
        raise ValueError(f"`{name}` must hold at least one value, got {value!r}")
    return values


@dataclass(frozen=True)
class Normalization:
    """``inputs = (pixels - mean) / std`` per channel (dimension 1), with pixels bounded by ``pixel_range``.

    An attack's ``epsilon`` and step are given in pixel units (e.g. 9/255 for images in [0, 1], as ConAdv's
    reference uses 9 on the 0-255 scale), so a single budget means the same thing whatever the normalization.
    ``mean=None`` and ``std=None`` mean the inputs are pixels already; ``pixel_range=None`` leaves them unbounded
    (feature vectors).

    Args:
        mean: Per-channel mean in pixel units (one value broadcasts to every channel), or ``None`` for 0.
        std: Per-channel standard deviation in pixel units (> 0), or ``None`` for 1.
        pixel_range: ``(low, high)`` bounds of valid pixels, or ``None``.

    Example::

        >>> norm = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        >>> x = norm.normalize(torch.rand(2, 3, 4, 4))
        >>> bool(torch.allclose(norm.normalize(norm.to_pixels(x)), x, atol=1e-6))
        True
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_range: tuple[float, float] | None = (0.0, 1.0)

    def __init__(
        self,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        pixel_range: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        mean_t, std_t = _as_tuple("mean", mean), _as_tuple("std", std)
        if std_t is not None and min(std_t) <= 0:
            raise ValueError(f"`std` must be > 0 in every channel, got {std!r}")
        if (
            mean_t is not None
            and std_t is not None
            and len(mean_t) != len(std_t)
            and 1 not in (len(mean_t), len(std_t))
        ):
            raise ValueError(f"`mean` and `std` must have the same number of channels, got {mean!r} and {std!r}")
        bounds = None
        if pixel_range is not None:
            bounds = tuple(float(v) for v in pixel_range)
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"`pixel_range` must be (low, high) with low < high, got {pixel_range!r}")
        object.__setattr__(self, "mean", mean_t)
        object.__setattr__(self, "std", std_t)
        object.__setattr__(self, "pixel_range", bounds)

    def _shaped(self, values: tuple[float, ...] | None, like: Tensor) -> Tensor | None:
        if values is None:
            return None
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
        if t.numel() == 1 or like.ndim < 2:
            return t.reshape(()) if t.numel() == 1 else t
        return t.reshape(1, -1, *([1] * (like.ndim - 2)))

    def to_pixels(self, inputs: Tensor) -> Tensor:
        """Normalized inputs to pixels: ``inputs * std + mean``."""
        std, mean = self._shaped(self.std, inputs), self._shaped(self.mean, inputs)
        out = inputs if std is None else inputs * std
        return out if mean is None else out + mean

    def normalize(self, pixels: Tensor) -> Tensor:
        """Pixels to normalized inputs: ``(pixels - mean) / std``."""
        std, mean = self._shaped(self.std, pixels), self._shaped(self.mean, pixels)
        out = pixels if mean is None else pixels - mean
        return out if std is None else out / std

    def clamp(self, pixels: Tensor) -> Tensor:
        """Pixels clamped to :attr:`pixel_range` (unchanged without one)."""
        if self.pixel_range is None:
            return pixels
        return pixels.clamp(self.pixel_range[0], self.pixel_range[1])
