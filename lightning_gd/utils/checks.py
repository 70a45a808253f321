"""Argument checks shared by every layer: each names the argument and the value it got.

The math layer raises ``ValueError``; the Lightning glue passes ``error=MisconfigurationException``. This
module imports neither torch nor Lightning, so ``curvature/`` and ``compression/`` may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_number", "check_positive_int"]


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = ValueError,
) -> float:
    """Return ``float(value)`` if it is a finite real number (not a bool) within the bounds; raise ``error``
    naming it otherwise.

    ``low`` / ``high`` are inclusive unless ``low_open`` / ``high_open``. The message says the range:
    ``"`lr` must be a finite number >= 0, got -1"``, ``"`val_fraction` must be in (0, 1), got 1.0"``.

    Example::

        >>> check_number("momentum", 0.9, 0, 1, high_open=True)  # [0, 1)
        0.9
        >>> check_number("momentum", 1.0, 0, 1, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            need = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            need = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            need = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            need = "a finite number"
        raise error(f"`{name}` must be {need}, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= minimum``; raise ``error`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"`{name}` must be {need}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], error: type[Exception] = ValueError) -> Any:
    """Return ``value`` if it is one of ``choices``; raise ``error`` listing the choices otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"`{name}` must be one of {choices}, got {value!r}")
    return value
