"""What the benchmark scripts share: one import path, a quiet Trainer, figures, and one way to run a DDP job.

- **Imports.** Importing this module puts the repository root on ``sys.path`` (once, here), so a script run as
  ``python benchmarks/NAME.py`` from an uninstalled checkout imports this checkout's ``lightning_gd`` and
  ``benchmarks.netlab``. Shared code lives in ``_`` modules beside the scripts; a benchmark never imports another.
- **Ranks.** :func:`run_ranks` starts every rank of a job as its own process with the environment
  :func:`rank_env` describes (``MASTER_ADDR`` / ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``NODE_RANK``): plain ``torch.distributed`` workers (``init_process_group("gloo")``) and Lightning jobs
  (``LightningEnvironment`` sees an external launch) run the same way, and ``benchmarks/netlab`` builds its
  per-namespace ranks from :func:`rank_env` too.
- **Output.** :func:`quiet_trainer` (no logger, checkpoint, progress bar or summary) and :func:`save_figure`.

Example::

    from _harness import FIGURES, run_ranks, save_figure

    run_ranks([sys.executable, __file__, "--worker", out])      # two ranks, each `python THIS --worker OUT`
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIGURES = HERE / "figures"

if str(REPO) not in sys.path:  # the one sys.path entry of the benchmarks (see the module docstring)
    sys.path.insert(0, str(REPO))

__all__ = [
    "FIGURES",
    "HERE",
    "REPO",
    "counted_pyhessian",
    "free_port",
    "quiet_trainer",
    "rank_env",
    "run_ranks",
    "save_figure",
]

_RANK_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "GLOBAL_RANK", "LOCAL_RANK", "NODE_RANK",
              "LOCAL_WORLD_SIZE")  # fmt: skip


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(
    rank: int,
    world_size: int,
    port: int,
    addr: str = "127.0.0.1",
    one_rank_per_node: bool = False,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of rank ``rank`` of an externally launched job (``torchrun``'s variables).

    ``one_rank_per_node``: each rank is node ``rank`` with local rank 0 (``benchmarks/netlab``'s two
    namespaces, ``Trainer(num_nodes=2, devices=1)``); otherwise all ranks are local ranks of node 0
    (``Trainer(devices=world_size)``). One thread per rank, unbuffered output.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _RANK_VARS}
    env.update(
        MASTER_ADDR=addr, MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), GLOBAL_RANK=str(rank),
        LOCAL_RANK="0" if one_rank_per_node else str(rank), NODE_RANK=str(rank) if one_rank_per_node else "0",
    )  # fmt: skip
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_ranks(
    cmd: Sequence[str],
    world_size: int = 2,
    timeout: float = 600.0,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run ``cmd`` once per rank (:func:`rank_env`, a fresh port) and return each rank's output.

    A rank that fails stops the others at once (no rank waits alone in a collective).

    Raises:
        RuntimeError: when a rank exits non-zero or the job exceeds ``timeout``, with the ranks' last output.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        files = [open(Path(logs) / f"rank{r}.log", "w+") for r in range(world_size)]  # noqa: SIM115
        procs = [
            subprocess.Popen(list(cmd), env=rank_env(r, world_size, port, base=env), cwd=cwd, stdout=f,
                             stderr=subprocess.STDOUT, text=True)
            for r, f in enumerate(files)
        ]  # fmt: skip
        failed, deadline = None, time.monotonic() + timeout
        try:
            while failed is None and any(p.poll() is None for p in procs):
                bad = [f"rank {r} exited with {p.returncode}" for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                failed = ", ".join(bad) or (f"timeout after {timeout:g} s" if time.monotonic() > deadline else None)
                time.sleep(0.05)
            bad = [f"rank {r} exited with {p.returncode}" for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            failed = failed or (", ".join(bad) or None)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for f in files:
            f.seek(0)
            outputs.append(f.read())
            f.close()
    if failed is not None:
        tails = "\n".join(f"--- rank {r} ---\n{out[-4000:]}" for r, out in enumerate(outputs))
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {failed}\n{tails}")
    return outputs


def quiet_trainer(**kwargs: Any) -> Any:
    """A Lightning ``Trainer`` on the CPU without logger, checkpoints, progress bar or model summary; ``kwargs``
    override any of these."""
    from lightning.pytorch import Trainer

    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False)  # fmt: skip
    return Trainer(**{**quiet, **kwargs})


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Lay ``fig`` out, write it to ``path`` (making its folder) and say where."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"figure: {path}")
    return path


@contextlib.contextmanager
def counted_pyhessian() -> Iterator[tuple[Any, list[int]]]:
    """PyHessian's ``pyhessian.hessian`` module with its Hessian-vector products counted in ``count[0]``.

    Example::

        with counted_pyhessian() as (ph, count):
            vals, _ = ph.hessian(model, criterion, data=batch, cuda=False).eigenvalues()
        print(count[0], "products")
    """
    import pyhessian  # noqa: F401  (its __init__ shadows the submodule name with the class)

    ph = sys.modules["pyhessian.hessian"]
    count = [0]
    original = ph.hessian_vector_product

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        count[0] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        yield ph, count
    finally:
        ph.hessian_vector_product = original
