"""Adam's preconditioned sharpness under top-k compressed DDP: what the number means, and what to report (issue 21).

Two seeded 2-process gloo runs of the quickstart model (LLaMA ``tiny``, AdamW betas (0.9, 0.95), clipping 1.0,
warm-up + cosine) on the same data: plain ``ddp`` and ``ddp_topk`` (density 0.01, error feedback). After the last
step, on the same fixed batch and with the rank-averaged Hessian, every candidate is measured from the optimizer's
own state (clipping factor included):

* ``P`` as is (what the tracker reported before: near-zero second moments of the coordinates top-k rarely sends);
* ``P`` with the second moment floored at a fraction of its mean (``v >= f * mean(v)``);
* ``P`` over the coordinates Adam moves: those whose ``sqrt(v_hat)`` is below ``eps`` (no gradient yet) left out;
* the raw ``lambda_max(H)`` against 2/lr;

and statistics of the second moment: the share of coordinates whose ``sqrt(v_hat)`` is below Adam's ``eps`` (no
gradient to speak of), below 1e-3 of the median, and the squared mass of the top preconditioned eigenvector on them.

Command (2-core CPU, a few minutes)::

    python benchmarks/curvature_preconditioned_sparse.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_gd.callbacks import SharpnessTracker
from lightning_gd.curvature import PreconditionedOperator, lanczos
from lightning_gd.curvature.preconditioned import adam_preconditioner, adam_threshold, gd_threshold
from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule
from lightning_gd.utils.optim_state import adam_moments

FLOORS = (1e-6, 1e-4, 1e-2)


class Probe(Callback):
    def __init__(self, tracker: SharpnessTracker, out: Path) -> None:
        self.tracker, self.out = tracker, out

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        tr = self.tracker
        batches = [tuple(t.to(pl_module.device) for t in b) for b in tr._fixed]
        op = tr._operator(trainer, pl_module, batches)
        moments = adam_moments(trainer.optimizers, op.base.params)
        c = tr._clip.factors.get(0, 1.0)
        v = torch.cat([m.exp_avg_sq.flatten() for m in moments]).double()
        m0 = moments[0]
        P = torch.cat(
            [
                adam_preconditioner(m.exp_avg_sq, m.step, m.beta1, m.beta2, m.eps, clip_factor=c).flatten()
                for m in moments
            ]
        )
        thr = adam_threshold(m0.beta1, m0.lr)
        v_hat_sqrt = (v / (1 - m0.beta2**m0.step)).sqrt()
        median = v.median()
        tiny_eps = v_hat_sqrt < m0.eps
        tiny_med = v < 1e-3 * median
        gen = torch.Generator().manual_seed(0)
        rows = {}
        top = lanczos(PreconditionedOperator(op, P), tol=1e-3, max_iter=40, generator=gen)
        u = top.eigenvectors[:, 0].double()
        rows["P as is"] = (top.eigenvalues[0].item(), top.eigenvalues[0].item() / thr, top.num_matvecs)
        for f in FLOORS:
            floored = [
                adam_preconditioner(m.exp_avg_sq.clamp_min(f * v.mean().item()), m.step, m.beta1, m.beta2, m.eps, c)
                for m in moments
            ]
            res = lanczos(PreconditionedOperator(op, torch.cat([d.flatten() for d in floored])), tol=1e-3, max_iter=40,
                          generator=gen)  # fmt: skip
            rows[f"v floored at {f:g} x mean(v)"] = (res.eigenvalues[0].item(), res.eigenvalues[0].item() / thr,
                                                     res.num_matvecs)  # fmt: skip
        # Coordinates with no gradient in the second moment (sqrt(v_hat) < eps) left out: Adam does not move them.
        masked = torch.where(tiny_eps.to(P.device), torch.full_like(P, 1e30), P)
        res = lanczos(PreconditionedOperator(op, masked), tol=1e-3, max_iter=40, generator=gen)
        rows["P, coordinates with sqrt(v_hat) < eps left out"] = (
            res.eigenvalues[0].item(), res.eigenvalues[0].item() / thr, res.num_matvecs,
        )  # fmt: skip
        raw = lanczos(op, tol=1e-3, max_iter=40, generator=gen)
        rows["raw lambda_max(H) vs 2/lr"] = (raw.eigenvalues[0].item(), raw.eigenvalues[0].item() / gd_threshold(m0.lr),
                                             raw.num_matvecs)  # fmt: skip
        if trainer.is_global_zero:
            stats = {
                "clip_factor": c,
                "share sqrt(v_hat) < eps": tiny_eps.double().mean().item(),
                "share v < 1e-3 median": tiny_med.double().mean().item(),
                "top-vector mass on sqrt(v_hat) < eps": (u[tiny_eps] ** 2).sum().item(),
                "top-vector mass on v < 1e-3 median": (u[tiny_med] ** 2).sum().item(),
            }
            self.out.write_text(json.dumps({"rows": rows, "stats": stats, "logged": tr.last_metrics}))


def job(strategy: str, steps: int, out: Path, data_dir: str) -> None:
    seed_everything(0)
    module = CausalLMModule(
        preset="tiny", overrides={"block_size": 64},
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
    )  # fmt: skip
    dm = TextCorpusDataModule(data_dir=data_dir, glob="**/*.py", seq_len=64, batch_size=8, seed=0)
    tracker = SharpnessTracker(every_n_steps=steps, batch="fixed", preconditioned=True, max_overhead=None, plot=False,
                               tol=1e-3, max_iter=40)  # fmt: skip
    kwargs = {"strategy": "ddp"} if strategy == "ddp" else {"strategy": "ddp_topk"}
    trainer = Trainer(accelerator="cpu", devices=2, max_steps=steps, gradient_clip_val=1.0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[tracker, Probe(tracker, out)], default_root_dir=str(out.parent),
                      **kwargs)  # fmt: skip
    trainer.fit(module, datamodule=dm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--strategy", choices=["ddp", "ddp_topk"], default=None, help="run one (internal)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/curvature_sparse"))
    parser.add_argument("--data-dir", default=str(Path(os.__file__).parent / "email"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.strategy:
        job(args.strategy, args.steps, args.out / f"{args.strategy}.json", args.data_dir)
        return
    import subprocess

    for strategy in ("ddp", "ddp_topk"):
        subprocess.run([sys.executable, __file__, "--strategy", strategy, "--steps", str(args.steps), "--out",
                        str(args.out), "--data-dir", args.data_dir], check=True)  # fmt: skip
    for strategy in ("ddp", "ddp_topk"):
        res = json.loads((args.out / f"{strategy}.json").read_text())
        print(f"\n{strategy}: " + ", ".join(f"{k} {v:.3g}" for k, v in res["stats"].items()))
        print("| measure | lambda_max | / threshold | products |")
        print("|---|---|---|---|")
        for name, (lam, edge, n) in res["rows"].items():
            print(f"| {name} | {lam:.4g} | {edge:.4g} | {n} |")


if __name__ == "__main__":
    main()
