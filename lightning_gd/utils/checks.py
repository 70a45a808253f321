"""Argument checks shared by every layer: each names the argument and the value it got.

The math layer raises ``ValueError``; the Lightning glue passes ``error=MisconfigurationException``. This
module imports neither torch nor Lightning, so ``curvature/`` and ``compression/`` may use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_positive_int"]


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
