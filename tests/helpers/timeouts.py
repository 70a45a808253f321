"""Timeouts for subprocesses and DDP jobs that hold on a loaded machine.

A timeout only stops a hung job; it must never fail a correct job on a slow machine. Each one is the time the job
needs on a quiet machine with a wide margin, times ``LIGHTNING_GD_TEST_TIMEOUT_FACTOR`` (default 1), times the
machine's load per usable CPU when that is above 1 (measured when the job starts, at most 8).

Example::

    subprocess.run(cmd, timeout=scaled_timeout(120), check=True)
"""

from __future__ import annotations

import os

from lightning_gd.utils.threads import usable_cpus

__all__ = ["FACTOR_VARIABLE", "scaled_timeout"]

FACTOR_VARIABLE = "LIGHTNING_GD_TEST_TIMEOUT_FACTOR"


def scaled_timeout(seconds: float) -> float:
    """``seconds`` scaled by the environment's factor and the current load (see the module docstring)."""
    factor = float(os.environ.get(FACTOR_VARIABLE, "1"))
    if factor <= 0:
        raise ValueError(f"{FACTOR_VARIABLE} must be positive, got {factor!r}")
    try:
        load = os.getloadavg()[0] / usable_cpus()
    except OSError:  # no load average on this platform
        load = 1.0
    return seconds * factor * min(8.0, max(1.0, load))
