"""The quickstart beside busy processes: torch's OpenMP defaults against the ``lightning-gd`` command's.

Claim checked (issue 20): torch's OpenMP threads spin while they wait, so a run slows down several times when
another process holds a core; ``lightning-gd`` sets ``OMP_WAIT_POLICY=PASSIVE`` (``lightning_gd/utils/threads.py``)
and, with two busy processes beside it, stays within 1.5x of its quiet time, at no cost on a quiet machine.

Runs ``lightning-gd fit --config quickstart --trainer.max_steps 60 --trainer.limit_val_batches 0`` in a temporary
working directory (the run directory is thrown away), quiet and beside ``--busy`` pure-Python spin loops, under
four settings:

- ``torch``: torch's own defaults (``LIGHTNING_GD_THREAD_DEFAULTS=0``; no ``OMP_*`` variable);
- ``lightning-gd``: the command's defaults (no ``OMP_*`` variable: passive waiting, threads fitted to a quota);
- ``1 thread``: ``OMP_NUM_THREADS=1``;
- ``short spin``: libgomp spins 20,000 times (``GOMP_SPINCOUNT``) instead of 300,000 before it sleeps.

Prints the wall time of each command (median of ``--repeats``), its ratio to the quiet run under torch's defaults,
and the machine's load average before each run. Other processes' load counts as "busy" too: run it on an otherwise
quiet machine.

    python benchmarks/busy_machine.py                  # the full table (~10 min on 2 cores; more if torch's
                                                       # defaults crawl beside the busy processes)
    python benchmarks/busy_machine.py --steps 10       # a short check
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

POLICIES: dict[str, dict[str, str]] = {
    "torch": {"LIGHTNING_GD_THREAD_DEFAULTS": "0"},
    "lightning-gd": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "LIGHTNING_GD_THREAD_DEFAULTS": "0"},
    # libgomp (torch's OpenMP on Linux) spins GOMP_SPINCOUNT times before it sleeps: 300,000 by default, 0 when passive.
    "short spin": {"GOMP_SPINCOUNT": "20000", "LIGHTNING_GD_THREAD_DEFAULTS": "0"},
}
_CLEARED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LIGHTNING_GD_THREAD_DEFAULTS", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
_SPIN = "while True:\n    pass\n"


def _cli() -> list[str]:
    exe = shutil.which("lightning-gd")
    return [exe] if exe else [sys.executable, "-m", "lightning_gd"]


def _run(steps: int, policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(POLICIES[policy])
    args = ["fit", "--config", "quickstart", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0"]
    with tempfile.TemporaryDirectory(prefix="busy_machine_") as cwd:
        start = time.perf_counter()
        proc = subprocess.run([*_cli(), *args], cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"`lightning-gd {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(count)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the busy runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (the median is shown)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ns = parser.parse_args()

    rows = []  # (condition, policy, median wall, loads)
    for condition in ("quiet", f"{ns.busy} busy"):
        spinners = _spinners(ns.busy) if condition != "quiet" else []
        try:
            if spinners:
                time.sleep(2.0)  # let them take their cores
            for policy in ns.policies:
                walls, loads = [], []
                for _ in range(ns.repeats):
                    loads.append(os.getloadavg()[0])
                    walls.append(_run(ns.steps, policy))
                    print(f"  {condition:<8} {policy:<13} {walls[-1]:7.1f} s  (load {loads[-1]:.1f})", flush=True)
                rows.append((condition, policy, statistics.median(walls), loads))
        finally:
            _stop(spinners)

    reference = next((w for c, p, w, _ in rows if c == "quiet" and p == "torch"), rows[0][2])
    print(
        f"\nlightning-gd fit --config quickstart --trainer.max_steps {ns.steps} --trainer.limit_val_batches 0"
        f" ({os.cpu_count()} CPUs; wall time of the command, median of {ns.repeats})\n"
    )
    print("| machine | setting | wall time (s) | vs quiet, torch's defaults | load average before |")
    print("|---|---|---|---|---|")
    for condition, policy, wall, loads in rows:
        load = ", ".join(f"{x:.1f}" for x in loads)
        print(f"| {condition} | {policy} | {wall:.1f} | {wall / reference:.2f}x | {load} |")
    quiet = {p: w for c, p, w, _ in rows if c == "quiet"}
    busy = {p: w for c, p, w, _ in rows if c != "quiet"}
    for policy in ns.policies:
        if policy in quiet and policy in busy:
            print(f"{policy}: busy / quiet = {busy[policy] / quiet[policy]:.2f}x")


if __name__ == "__main__":
    main()
