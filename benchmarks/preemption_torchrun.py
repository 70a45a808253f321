"""Pre-emption under torchrun: a 2-process run whose rank 1 is SIGKILLed at a random step comes back by itself and
ends bit-identical to an uninterrupted run.

Each run is ``torchrun --standalone --nproc_per_node 2 --max-restarts 2 -m lightning_gd fit --config quickstart``
(shrunk: one layer, 16 windows of 32 bytes a step, last.ckpt after every second step; gloo DDP on CPU) with no
``--ckpt_path``: the restarted workers find the run's newest checkpoint themselves (auto-resume). The script waits
until the run has passed a random step, kills rank 1 with SIGKILL, lets torchrun restart both workers, and compares
the final checkpoint (weights, optimizer and scheduler state, step) with an uninterrupted run's, tensor by tensor.

``--store shared`` runs torchrun as it comes (its rendezvous TCP store shared with the workers, torch's default);
``--store fresh`` sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, so that every restart gets a store of its own. With
the shared store the restarted workers' process group reads the keys the killed attempt left in the same store
(the gloo addresses of the dead ranks), so connecting may fail with "Gloo connectFullMesh failed ... Connection
refused" (pytorch/pytorch#135712); see benchmarks/RESULTS.md.

Usage::

    python benchmarks/preemption_torchrun.py --runs 5 --store fresh
    python benchmarks/preemption_torchrun.py --runs 5 --store shared
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.torchrun import LAST_CKPT, torchrun_fit  # noqa: E402

STEPS = 40


def _compare(a: Path, b: Path) -> tuple[bool, str]:
    x = torch.load(a, map_location="cpu", weights_only=False)
    y = torch.load(b, map_location="cpu", weights_only=False)
    if x["global_step"] != y["global_step"]:
        return False, f"steps {x['global_step']} vs {y['global_step']}"
    n = 0

    def same(p, q, where):
        nonlocal n
        if isinstance(p, torch.Tensor):
            n += 1
            if not (isinstance(q, torch.Tensor) and p.dtype == q.dtype and torch.equal(p, q)):
                raise AssertionError(where)
        elif isinstance(p, dict):
            if set(p) != set(q):
                raise AssertionError(f"{where}: keys")
            for k in p:
                same(p[k], q[k], f"{where}.{k}")
        elif isinstance(p, (list, tuple)):
            if len(p) != len(q):
                raise AssertionError(f"{where}: length")
            for i, (u, v) in enumerate(zip(p, q, strict=True)):
                same(u, v, f"{where}[{i}]")
        elif p != q:
            raise AssertionError(f"{where}: {p!r} != {q!r}")

    try:
        for key in ("state_dict", "optimizer_states", "lr_schedulers"):
            same(x[key], y[key], key)
    except AssertionError as err:
        return False, f"differs at {err}"
    return True, f"{n} tensors identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--store", choices=["fresh", "shared"], default="fresh")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per torchrun job (a hang fails the run)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="preemption_"))
    print(f"load average before: {os.getloadavg()[0]:.1f}; work in {root}", flush=True)
    reference = torchrun_fit(root / "uninterrupted", STEPS, None, args.store, args.timeout)
    if reference.exit != 0:
        raise SystemExit(f"the uninterrupted run failed ({reference.exit}); see {root / 'uninterrupted'}")
    print(f"uninterrupted: {reference.seconds:.0f} s", flush=True)
    rows = []
    for i in range(args.runs):
        kill_after = rng.randint(3, STEPS - 8)
        run = torchrun_fit(root / f"run{i}", STEPS, kill_after, args.store, args.timeout)
        ckpt = root / f"run{i}" / LAST_CKPT
        if run.exit == 0 and ckpt.is_file():
            identical, detail = _compare(root / "uninterrupted" / LAST_CKPT, ckpt)
        else:
            identical, detail = False, "torchrun " + ("hung: stopped" if run.exit is None else f"exited {run.exit}")
        rows.append((i, run, identical, detail))
        resumed = [r.split(";")[0] for r in run.resumed_from]
        print(
            f"run {i}: rank 1 killed after step {run.killed_after_step}; resumed from {resumed};"
            f" gloo connect failures {run.connect_failures}; exit {run.exit}; {run.seconds:.0f} s;"
            f" bit-identical: {identical} ({detail})",
            flush=True,
        )
    ok = sum(identical for *_, identical, _ in rows)
    print(f"\n{ok} of {args.runs} runs ended bit-identical to the uninterrupted run (store: {args.store})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
