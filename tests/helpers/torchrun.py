"""A 2-process ``torchrun ... -m lightning_gd fit`` of the shrunk quickstart whose rank 1 can be SIGKILLed after a
chosen step, for pre-emption tests and ``benchmarks/preemption_torchrun.py``.

torchrun restarts the workers (``--max-restarts 2``) with no ``--ckpt_path``: they resume by themselves.
``store="fresh"`` sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a rendezvous store of its own for every restart);
``"shared"`` keeps torchrun's default (see README, "Pre-emption and restarts").

Example::

    result = torchrun_fit(tmp_path / "run", steps=8, kill_after=3)
    assert result.exit == 0 and result.resumed_from
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.helpers.interrupt import TINY_QUICKSTART

__all__ = ["LAST_CKPT", "TorchrunResult", "torchrun_fit"]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The run's last.ckpt, relative to the job's working directory.
LAST_CKPT = Path("runs") / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


@dataclass
class TorchrunResult:
    """What a :func:`torchrun_fit` job did (``exit`` is ``None`` when it hung and was stopped)."""

    exit: int | None
    seconds: float
    killed_after_step: int | None
    resumed_from: list[str] = field(default_factory=list)
    connect_failures: int = 0
    log: str = ""


def torchrun_fit(
    work: Path,
    steps: int = 40,
    kill_after: int | None = None,
    store: Literal["fresh", "shared"] = "fresh",
    timeout: float = 300.0,
) -> TorchrunResult:
    """Run the job in ``work`` (created); with ``kill_after``, SIGKILL rank 1 once rank 0 has passed that step.

    A job still running after ``timeout`` seconds counts as hung: it is stopped and ``exit`` is ``None``.
    """
    work.mkdir(parents=True)
    marker, pids, log = work / "step_reached", work / "pids", work / "torchrun.log"
    extra = ["--trainer.callbacks+=tests.helpers.interrupt.PidFile", "--trainer.callbacks.folder", str(pids)]
    if kill_after is not None:
        extra += ["--trainer.callbacks+=tests.helpers.interrupt.TouchAtStep", "--trainer.callbacks.path", str(marker),
                  "--trainer.callbacks.step", str(kill_after)]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "--max-restarts", "2", "-m", "lightning_gd", "fit", "--config", "quickstart", *TINY_QUICKSTART,
        "--trainer.max_steps", str(steps), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if store == "fresh":
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.monotonic()
    killed, hung = None, False
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                if kill_after is not None and killed is None and marker.exists():
                    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
                    killed = int(marker.read_text())
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                hung = True
                proc.send_signal(signal.SIGTERM)  # torchrun stops its workers
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    text = log.read_text(errors="replace")
    return TorchrunResult(
        exit=None if hung else proc.returncode,
        seconds=time.monotonic() - start,
        killed_after_step=killed,
        resumed_from=[line.split("resuming from ", 1)[1] for line in text.splitlines() if "resuming from" in line],
        connect_failures=text.count("connectFullMesh failed"),
        log=text,
    )
