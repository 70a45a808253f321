"""OpenMP defaults for a machine that other processes share (torch-free: they must be set before torch starts).

torch's OpenMP threads spin while they wait for each other. When another process holds a core, every parallel
region then waits for a descheduled thread, and a small model's thousands of small ops per step each pay a
scheduler time slice: the quickstart's first 60 steps took 307 s instead of 39 s beside two busy processes, and
39 s with ``OMP_WAIT_POLICY=PASSIVE`` (``benchmarks/busy_machine.py``, ``benchmarks/RESULTS.md``). Fewer threads
than usable cores cost 1.3x on a quiet machine, so the thread count is only lowered where torch would count CPUs the
process may not use (a cgroup CPU quota, as in containers and CI runners).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["set_thread_defaults", "usable_cpus"]

#: ``LIGHTNING_GD_THREAD_DEFAULTS=0`` keeps torch's own OpenMP defaults.
OPT_OUT = "LIGHTNING_GD_THREAD_DEFAULTS"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the tightest cgroup CPU quota over this process's cgroup and its parents (v2 or v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max holds "QUOTA PERIOD" or "max PERIOD"
            base, read = root, _v2_quota
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us
            base, read = root / "cpu", _v1_quota
        else:
            continue
        parts = Path(path).parts[1:]
        for depth in range(len(parts) + 1):  # a container sees its own cgroup as the root: the parents exist or not
            quota = read(base.joinpath(*parts[:depth]))
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up).

    Example::

        >>> usable_cpus() >= 1
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def set_thread_defaults(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set passive OpenMP waiting, and a thread count within a cgroup CPU quota, where the user set neither.

    ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` is set. ``OMP_NUM_THREADS`` = :func:`usable_cpus` unless
    it is set, and only when a quota leaves fewer CPUs than the affinity mask (torch counts the latter). Nothing is
    set when torch is already imported (OpenMP has read its settings by then), or with
    ``LIGHTNING_GD_THREAD_DEFAULTS=0``.

    Args:
        environ: The environment to complete, normally ``os.environ``.

    Returns:
        The variables set.

    Example::

        # not run: it does nothing once torch is imported (tests/utils/test_threads.py tests it)
        set_thread_defaults(os.environ)  # first thing in a launcher, before `import torch`
    """
    if "torch" in sys.modules or environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    added = {}
    if "OMP_WAIT_POLICY" not in environ:
        added["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in environ:
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:
            affinity = os.cpu_count() or 1
        if (cpus := usable_cpus()) < affinity:
            added["OMP_NUM_THREADS"] = str(cpus)
    environ.update(added)
    return added
