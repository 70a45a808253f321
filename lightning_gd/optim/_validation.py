"""Argument checks shared by the optimizers: each raises ``ValueError`` naming the argument and its value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__: list[str] = []


def _check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_positive(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


def _check_unit_interval(name: str, value: Any) -> float:
    """Return ``value`` if it lies in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
    return float(value)


def _check_betas(value: Any, name: str = "betas") -> tuple[float, float]:
    """Return ``value`` as a pair of floats, each in [0, 1)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"`{name}` must be a pair (beta1, beta2), got {value!r}")
    return (_check_unit_interval(f"{name}[0]", value[0]), _check_unit_interval(f"{name}[1]", value[1]))
