"""The quickstart table of README.md and RESULTS.md, from the command line the README gives.

Runs, in an empty working directory (a temporary one unless ``--workdir``):

    lightning-gd validate --config quickstart     # step 0: the untrained model, same seed and data
    lightning-gd fit --config quickstart          # timed

and prints validation loss (nats/byte) and perplexity at steps 0, 100, 300 and 600, every curvature
measurement the run logged, and the fit's wall time, read back from the run directories' ``metrics.csv``.
Extra arguments go to both commands, e.g. ``--trainer.max_steps 100`` for a short check (the table then
shows the validation steps the run reached).

    python benchmarks/quickstart.py                        # the full 600-step run, ~2.5 min on 2 cores
    python benchmarks/quickstart.py --trainer.max_steps 100
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TABLE_STEPS = (0, 100, 300, 600)
CURVATURE = (
    "hessian/trace",
    "hessian/trace_stderr",
    "sharpness/preconditioned_lambda_max",
    "sharpness/lambda_max",
    "sharpness/threshold",
    "sharpness/edge_of_stability",
    "sharpness/clip_factor",
    "sharpness/num_hvps",
)


def _cli() -> list[str]:
    exe = shutil.which("lightning-gd")
    return [exe] if exe else [sys.executable, "-m", "lightning_gd"]


def _run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*_cli(), *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"`lightning-gd {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return wall


def _latest_run(cwd: Path) -> Path:
    runs = sorted((cwd / "runs" / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        sys.exit(f"no run directory under {cwd / 'runs' / 'quickstart'}")
    return runs[-1]


def _metrics(run: Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from a run directory's metrics.csv."""
    out: dict[str, dict[int, float]] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    out.setdefault(key, {})[step] = float(value)
    return out


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="run here (default: a temporary directory)")
    ours, extra = parser.parse_known_args()
    cwd = ours.workdir or Path(tempfile.mkdtemp(prefix="quickstart-bench-"))
    cwd.mkdir(parents=True, exist_ok=True)
    common = ["--config", "quickstart", "--trainer.enable_progress_bar", "false", *extra]

    _run(["validate", *common], cwd)
    initial = _metrics(_latest_run(cwd))
    fit_wall = _run(["fit", *common, "--resume", "never"], cwd)  # a fresh run, also in a --workdir used before
    run = _latest_run(cwd)
    trained = _metrics(run)

    # Lightning logs the validation that follows optimizer step N at step N - 1 (metrics.csv): shift it back.
    val_loss = {0: initial["val/loss"][min(initial["val/loss"])]}
    val_loss.update({s + 1: v for s, v in trained.get("val/loss", {}).items()})
    val_ppl = {0: initial["val/ppl"][min(initial["val/ppl"])]}
    val_ppl.update({s + 1: v for s, v in trained.get("val/ppl", {}).items()})
    steps = [s for s in TABLE_STEPS if s in val_loss] or sorted(val_loss)
    print(f"lightning-gd fit {' '.join(common)}  (workdir {cwd}, run {run.relative_to(cwd)})")
    print(f"torch {_version('torch')}, lightning {_version('lightning')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")  # fmt: skip
    print("| | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    print("| validation loss (nats/byte) | " + " | ".join(f"{val_loss[s]:.3f}" for s in steps) + " |")
    print("| validation perplexity | " + " | ".join(f"{val_ppl[s]:.1f}" for s in steps) + " |")
    every = sorted(val_loss)
    print("\nevery validation: " + ", ".join(f"{s}: {val_loss[s]:.3f}" for s in every))
    check_steps = sorted({s for key in CURVATURE for s in trained.get(key, {})})
    if check_steps:
        print("\n| curvature | " + " | ".join(f"step {s}" for s in check_steps) + " |")
        print("|---|" + "---|" * len(check_steps))
        for key in CURVATURE:
            if key in trained:
                cells = [trained[key].get(s, math.nan) for s in check_steps]
                print(f"| {key} | " + " | ".join(f"{v:.4g}" for v in cells) + " |")
    print(f"\nwall time of fit: {_minutes(fit_wall)} ({fit_wall:.1f} s)")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - informational only
        return "?"


if __name__ == "__main__":
    main()
