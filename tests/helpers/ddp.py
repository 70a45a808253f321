"""Run a script as a real multi-process CPU DDP job (gloo) in a subprocess, with a timeout.

The script gets an output directory as ``sys.argv[1]``; each rank writes ``rank<r>.json`` there with
:func:`write_result`. Every rank runs the whole script (Lightning's launcher re-executes it for the other ranks, or,
with ``launcher="external"``, the helper starts them all, as torchrun does), so the script must be a file, and
everything before ``trainer.fit`` runs on every rank. Every job destroys its process group at exit.

Example::

    results = run_ddp_script('''
        from lightning.pytorch import Trainer
        from tests.helpers.ddp import write_result
        from tests.helpers.models import TinyClassifier, classification_loader
        model = TinyClassifier()
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(model, classification_loader())
        write_result({"world_size": trainer.world_size}, trainer.global_rank)
    ''', tmp_path)
    assert [r["world_size"] for r in results] == [2, 2]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Literal

from tests.helpers.timeouts import scaled_timeout

__all__ = ["free_port", "run_ddp_script", "run_spawned", "write_result"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(result: dict[str, Any], rank: int) -> None:
    """Write this rank's JSON result into the output directory given as ``sys.argv[1]``."""
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


# Failures of the machine's networking, not of the code under test: the job is started once more on a new port.
_INFRA_ERRORS = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "DistNetworkError")


def run_ddp_script(
    source: str,
    tmp_path: Path,
    num_procs: int = 2,
    timeout: float = 300.0,
    launcher: Literal["lightning", "external"] = "lightning",
) -> list[dict[str, Any]]:
    """Run ``source`` as ``python script.py OUT`` and return the ranks' results in rank order.

    ``launcher``:

    - ``"lightning"``: one process; Lightning's launcher re-executes the script for the other ranks once rank 0
      reaches ``trainer.fit`` (``python train.py`` with ``devices=2``), or the script starts them itself.
    - ``"external"``: every rank is started at once, as torchrun or a cluster's scheduler starts them, with the
      variables Lightning's launcher sets for its children (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
      ``MASTER_ADDR``, ``MASTER_PORT``); Lightning then launches nothing. The ranks import in parallel instead of
      one after the other: a job is about 6 s shorter (13.7 s against 7.7 s for the 3-step job of
      ``tests/test_ddp_helper.py``). The code before ``trainer.fit`` runs on every rank at the same time, so it
      must not write files another rank reads. When one rank fails, the others are stopped (they would wait in a
      collective until the timeout), as Lightning's launcher does.

    ``timeout`` (seconds, for a quiet machine) is scaled by :func:`~tests.helpers.timeouts.scaled_timeout` (the
    ``LIGHTNING_GD_TEST_TIMEOUT_FACTOR`` variable and the machine's load) when the job starts.

    A job that fails with a networking error of the machine (a port taken between choosing and binding it, a reset
    connection; ``_INFRA_ERRORS``) is run once more on another port; any other failure fails at once.

    Raises:
        AssertionError: when the job fails, times out or a rank writes no result (with the job's output).
    """
    if launcher not in ("lightning", "external"):
        raise ValueError(f"launcher={launcher!r}: expected 'lightning' or 'external'")
    try:
        return _run_once(source, tmp_path, num_procs, timeout, launcher)
    except AssertionError as err:
        if not any(marker in str(err) for marker in _INFRA_ERRORS):
            raise
        return _run_once(source, tmp_path, num_procs, timeout, launcher)


# A job of plain torch.distributed ranks: torch.multiprocessing.spawn of a module's run(rank, world, out_dir), each
# rank saving its results to OUT/rank<r>.pt; one JSON result per rank then names that file.
_SPAWN_JOB = """
import os
import sys

import torch.multiprocessing as mp

from {module} import run
from tests.helpers.ddp import write_result

if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)
    mp.spawn(run, args=({world}, out), nprocs={world}, join=True)
    for rank in range({world}):
        write_result({{"path": os.path.join(out, f"rank{{rank}}.pt")}}, rank)
"""


def run_spawned(module: str, tmp_path: Path, world: int = 2, timeout: float = 300.0) -> list[Any]:
    """Run ``module.run(rank, world, out_dir)`` on ``world`` gloo ranks and return what each saved, in rank order.

    ``run`` is ``torch.multiprocessing.spawn``'s entry point: it sets up the process group from ``MASTER_ADDR`` /
    ``MASTER_PORT`` (given, with a retry on a port taken meanwhile, by :func:`run_ddp_script`) and saves its results
    with ``torch.save`` to ``out_dir/rank<rank>.pt``.

    Example::

        ranks = run_spawned("tests.compression._ddp_worker", tmp_path)  # [rank 0's results, rank 1's]
    """
    import torch

    results = run_ddp_script(_SPAWN_JOB.format(module=module, world=world), tmp_path, num_procs=world, timeout=timeout)
    return [torch.load(r["path"], weights_only=False) for r in results]


# Every job destroys its process group at exit. torch does not: gloo's worker threads, still holding work at the
# interpreter's finalisation, then abort the process now and then after a job that passed ("terminate called without
# an active exception", exit -6; seen in CI; pytorch/pytorch#179291).
_TEARDOWN = """import atexit as _gd_atexit
import sys as _gd_sys


def _gd_destroy_process_group():
    dist = _gd_sys.modules.get("torch.distributed")  # a job that never imported torch pays nothing
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_gd_atexit.register(_gd_destroy_process_group)
"""


def _with_teardown(source: str) -> str:
    """``source`` with :data:`_TEARDOWN` after its ``from __future__`` imports (which must stay first)."""
    lines = textwrap.dedent(source).splitlines(keepends=True)
    at = max((i + 1 for i, line in enumerate(lines) if line.startswith("from __future__")), default=0)
    return "".join(lines[:at]) + _TEARDOWN + "".join(lines[at:])


def _run_once(
    source: str, tmp_path: Path, num_procs: int, timeout: float, launcher: Literal["lightning", "external"]
) -> list[dict[str, Any]]:
    timeout = scaled_timeout(timeout)
    script = tmp_path / "ddp_job.py"
    script.write_text(_with_teardown(source))
    out = tmp_path / "ddp_out"
    shutil.rmtree(out, ignore_errors=True)  # no result of a failed first attempt is read
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",  # two processes on a small machine: no oversubscription
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    command = [sys.executable, str(script), str(out)]
    if launcher == "external":
        envs = [{**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(num_procs)} for r in range(num_procs)]
        code, log = _run_ranks(command, tmp_path, envs, timeout)
    else:
        try:
            proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"DDP job timed out after {timeout:.0f}s\n{err.stdout}\n{err.stderr}") from err
        code, log = proc.returncode, f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert code == 0, f"DDP job failed with exit code {code}\n{log}"
    results = []
    for rank in range(num_procs):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no result\n{log}"
        results.append(json.loads(path.read_text()))
    return results


def _run_ranks(command: list[str], cwd: Path, envs: list[dict[str, str]], timeout: float) -> tuple[int, str]:
    """Start one process per environment; the first non-zero exit code (the others then stopped) and the output."""
    logs = [cwd / f"ddp_rank{rank}.log" for rank in range(len(envs))]
    procs = []
    for env, log in zip(envs, logs, strict=True):
        with log.open("w") as f:  # a file, not a pipe: a rank blocked on a full pipe would stall the job
            procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline, failed, timed_out = time.monotonic() + timeout, None, False
    while None in (codes := [p.poll() for p in procs]):  # every process polled: `any` would stop at the first
        failed = next((code for code in codes if code not in (None, 0)), None)
        timed_out = time.monotonic() > deadline
        if failed is not None or timed_out:
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    text = "\n".join(f"--- rank {r} ---\n{log.read_text(errors='replace')[-6000:]}" for r, log in enumerate(logs))
    if timed_out:
        raise AssertionError(f"DDP job timed out after {timeout:.0f}s\n{text}")
    codes = [p.returncode for p in procs]
    return (failed if failed is not None else next((c for c in codes if c != 0), 0)), text
