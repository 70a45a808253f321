"""README promises of the curvature callbacks under real 2-process gloo DDP.

One job, two fits in the same processes: plain DDP, then the same seeded DDP run with both callbacks measuring
every step, one of them on a loss that is NaN on rank 1 only, at step 2 only.
"""

from tests.helpers.ddp import run_ddp_script

_SCRIPT = """
import math
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from tests.helpers.ddp import write_result
from tests.helpers.models import TinyClassifier, classification_loader


def nan_on_rank_1_at_step_2(module, batch):
    x, y = batch
    loss = F.cross_entropy(module(x), y)
    trainer = module.trainer
    return loss * math.nan if trainer.global_rank == 1 and trainer.global_step == 2 else loss


def fit(callbacks):
    seed_everything(0)
    model = TinyClassifier(dropout=0.2, momentum=0.9)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, default_root_dir=".")
    trainer.fit(model, classification_loader(n=128, shuffle=True))
    state = model.state_dict()
    return trainer, {k: state[k].flatten().tolist() for k in state}, torch.get_rng_state()


_, plain, plain_rng = fit([])
trace_nan = HessianTraceMonitor(max_overhead=None, every_n_steps=1, num_probes=4, loss_fn=nan_on_rank_1_at_step_2)
sharp_nan = SharpnessTracker(max_overhead=None, every_n_steps=1, max_iter=8, loss_fn=nan_on_rank_1_at_step_2,
                             plot=False)
trace_own = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=4, mode="train")  # training_step
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer, measured, measured_rng = fit([trace_nan, sharp_nan, trace_own])
write_result({
    "same_weights": plain == measured,
    "same_rng": bool(torch.equal(plain_rng, measured_rng)),
    "trace_steps": [s for s, _ in trace_nan.history["hessian/trace"]],
    "sharp_steps": [s for s, _ in sharp_nan.history["sharpness/lambda_max"]],
    "own_steps": [s for s, _ in trace_own.history["hessian/trace"]],
    "trace": trace_nan.history["hessian/trace"],
    "sharp": sharp_nan.history["sharpness/lambda_max"],
    "warnings": [str(w.message) for w in caught if "non-finite" in str(w.message)],
}, trainer.global_rank)
"""


def test_ddp_skips_a_rank_local_nan_on_every_rank_and_measuring_leaves_training_bit_identical(tmp_path):
    # A rank waiting alone in a collective would hang: the timeout stops the job.
    r0, r1 = run_ddp_script(_SCRIPT, tmp_path, timeout=300, launcher="external")
    for r in (r0, r1):
        assert r["same_weights"] and r["same_rng"]  # weights, BatchNorm buffers and RNG bit for bit, every rank
        assert r["trace_steps"] == r["sharp_steps"] == [1, 3, 4]  # step 2 skipped together
        assert r["own_steps"] == [2, 4]
    assert r0["trace"] == r1["trace"] and r0["sharp"] == r1["sharp"]  # the same numbers on both ranks
    assert all(v == v and abs(v) < float("inf") for _, v in r0["trace"] + r0["sharp"])
    assert len(r0["warnings"]) == 2 and all("at step 2" in w for w in r0["warnings"])  # rank zero warns, once each
