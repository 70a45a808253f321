"""Every callback under real DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3, against DDP of the same seed.

One 2-process gloo job (``tests/helpers/deepspeed.py``'s CPU harness around Lightning's own ``DeepSpeedStrategy``)
fits the same seeded runs under DDP and each ZeRO stage, then every test below checks one feature on one stage
from the job's results: where a feature works it must give DDP's numbers and weights (bit for bit where the
arithmetic is the same) and resume exactly from a DeepSpeed checkpoint; where it cannot (curvature and gradient
flossing on ZeRO-3, which partitions the parameters) it must be refused at setup with a message naming the stage
and what to use instead. One job instead of one per check: a DeepSpeed job costs ~10 s to start on 2 cores.
"""

from __future__ import annotations

import pytest

from tests.helpers.ddp import run_ddp_script

STAGES = ("zero1", "zero2", "zero3")

_SCRIPT = """
from tests.helpers.deepspeed import zero  # first: sets DS_ACCELERATOR=cpu before DeepSpeed is imported

import os
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import (
    GradientFlossing, HessianTraceMonitor, MetricPlotter, NoiseAnnealing, SharpnessTracker
)
from tests.callbacks.test_gradient_flossing import RNNTask, _loader
from tests.helpers.ddp import write_result
from tests.helpers.models import TinyClassifier, classification_loader


def weights(trainer, model):
    params = list(model.parameters())
    if trainer.strategy.__class__.__name__ == "CPUDeepSpeedStrategy":
        # DeepSpeed's fp32 master weights, whole (a collective): ZeRO-3 partitions the module's own parameters.
        from deepspeed.utils import safe_get_full_fp32_param
        params = [safe_get_full_fp32_param(p) for p in params]
    return torch.cat([p.detach().reshape(-1) for p in params]).tolist()


def fit(name, case, model, loader, callbacks, max_steps=4, ckpt_path=None, checkpoint=None):
    seed_everything(0)
    root = Path(f"{name}_{case}")
    extra = [checkpoint] if checkpoint else []
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp" if name == "ddp" else zero(int(name[-1])),
                      max_steps=max_steps, logger=False, enable_checkpointing=bool(extra), enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[*callbacks, *extra], default_root_dir=str(root))
    try:
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    except MisconfigurationException as err:  # raised at setup on every rank: the job goes on
        return {"error": str(err)}, trainer
    return {"weights": weights(trainer, model)}, trainer


def same(a, b):
    # Exact equality of two callback states, wall-clock entries aside (they measure the machine).
    if isinstance(a, dict):
        keys = [k for k in a if not any(w in str(k) for w in ("spent", "elapsed", "cost"))]
        return isinstance(b, dict) and keys == [k for k in b if k in keys] and all(same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def classifier():
    seed_everything(0)
    return TinyClassifier(dropout=0.0, batchnorm=False)  # no BatchNorm: DeepSpeed does not broadcast buffers


def rnn():
    seed_everything(0)
    return RNNTask()


def floss(**kwargs):
    kwargs = {"k": 4, "pre_train_steps": 0, "sequence_length": 12, "warmup": 2, "batch_size": 2, "lr": 0.02, **kwargs}
    return GradientFlossing(plot=False, **kwargs)


out = {}
for name in ("ddp", "zero1", "zero2", "zero3"):
    res = out[name] = {}
    res["plain"], _ = fit(name, "plain", classifier(), classification_loader(), [])

    trace = HessianTraceMonitor(max_overhead=None, every_n_steps=2, num_probes=10)
    sharp = SharpnessTracker(max_overhead=None, every_n_steps=2, smallest=True, density_every_n_steps=4)
    r, _ = fit(name, "curvature", classifier(), classification_loader(), [trace, sharp])
    res["curvature"] = {**r, "trace": trace.last_metrics, "sharp": sharp.last_metrics}

    plotter = MetricPlotter(every_n_steps=1)
    r, _ = fit(name, "plotter", classifier(), classification_loader(), [plotter])
    res["plotter"] = {**r, "history": plotter.history, "png": Path(f"{name}_plotter/loss_curves.png").is_file()}

    noises = {  # gradient noise after NoiseAnnealing's own clipping, with perturbed GD's kicks on the weights
        "gradient_noise": lambda: NoiseAnnealing(eta=0.1, clip_norm=0.5, grad_norm_threshold=10.0, radius=0.5,
                                                 perturb_interval=2),
        "weight_noise": lambda: NoiseAnnealing(eta=0.01, target="weights"),
    }
    for case, make in noises.items():
        noise = make()
        r, _ = fit(name, case, classifier(), classification_loader(), [noise])
        res[case] = {**r, "perturbations": noise.perturbations}

    flossings = {
        "floss_rounds": lambda: floss(pre_train_steps=3, every_n_steps=2, floss_steps=2),
        "floss_continuous": lambda: floss(continuous=True, weight=10.0),
    }
    for case, make in flossings.items():
        flosser = make()
        r, _ = fit(name, case, rnn(), _loader(), [flosser])
        res[case] = {**r, "lyapunov": flosser.last_metrics}

    # Save at step 2 (an epoch boundary: 32 sequences, batch 8, 2 ranks) and resume to step 4, every callback that
    # the stage supports attached; against the uninterrupted 4 steps.
    def callbacks():
        cbs = [MetricPlotter(every_n_steps=1), NoiseAnnealing(eta=0.01)]
        if name != "zero3":
            cbs += [floss(every_n_steps=2, floss_steps=1), SharpnessTracker(max_overhead=None, every_n_steps=1)]
        return cbs

    full = callbacks()
    r_full, _ = fit(name, "resume_full", rnn(), _loader(), full)
    ckpt = ModelCheckpoint(dirpath=f"{name}_ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(name, "resume_first", rnn(), _loader(), callbacks(), max_steps=2, checkpoint=ckpt)
    path = Path(f"{name}_ckpt/epoch=0-step=2.ckpt")
    resumed = callbacks()
    r_resumed, _ = fit(name, "resume_second", rnn(), _loader(), resumed, ckpt_path=str(path))
    res["resume"] = {
        "full": r_full["weights"], "resumed": r_resumed["weights"],
        "states_equal": [same(a.state_dict(), b.state_dict()) for a, b in zip(full, resumed)],
        "files": sorted(p.name for p in (path / "checkpoint").iterdir()) if path.is_dir() else None,
    }

write_result(out, int(os.environ.get("LOCAL_RANK", 0)))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Rank 0's and rank 1's results of the one job: ``{strategy: {case: result}}``."""
    return run_ddp_script(_SCRIPT, tmp_path_factory.mktemp("deepspeed"), timeout=900)


def _same_on_both_ranks(runs, stage, case):
    r0, r1 = runs[0][stage][case], runs[1][stage][case]
    assert r0 == r1 or ("weights" in r0 and r0["weights"] == r1["weights"]), (stage, case)
    return r0


@pytest.mark.parametrize("stage", STAGES)
def test_training_matches_ddp(runs, stage):
    # fp32 SGD: ZeRO's averaged gradients and master-weight update are DDP's arithmetic, bit for bit.
    assert _same_on_both_ranks(runs, stage, "plain")["weights"] == runs[0]["ddp"]["plain"]["weights"]


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_curvature_callbacks_match_ddp_and_never_perturb_training(runs, stage):
    ddp, got = runs[0]["ddp"]["curvature"], _same_on_both_ranks(runs, stage, "curvature")
    assert got["weights"] == runs[0][stage]["plain"]["weights"]  # measuring leaves training bit-identical
    assert got["trace"].keys() == ddp["trace"].keys() and got["sharp"].keys() == ddp["sharp"].keys()
    for key in ("trace", "sharp"):
        for metric, value in ddp[key].items():
            assert got[key][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, metric)
    assert "sharpness/lambda_min" in got["sharp"] and got["trace"]["hessian/num_hvps"] == 5  # 10 probes, 2 ranks


def test_curvature_callbacks_are_refused_on_zero3_naming_the_stage_and_the_alternative(runs):
    message = _same_on_both_ranks(runs, "zero3", "curvature")["error"]
    assert "does not support DeepSpeed ZeRO stage 3" in message
    assert "ZeRO stage 1 or 2" in message and "deepspeed_stage_2" in message and "DDP" in message


@pytest.mark.parametrize("stage", STAGES)
def test_metric_plotter_matches_ddp(runs, stage):
    got = _same_on_both_ranks(runs, stage, "plotter")
    ddp = runs[0]["ddp"]["plotter"]
    assert got["history"] == ddp["history"] and len(got["history"]["train/loss"]) == 4
    assert got["png"]


@pytest.mark.parametrize("case", ["gradient_noise", "weight_noise"])
@pytest.mark.parametrize("stage", STAGES)
def test_noise_annealing_matches_ddp(runs, stage, case):
    # DeepSpeed's optimizer steps its flat fp32 partitions: noise written to `p.grad` or `p` would be lost (before
    # the fix these runs ended with the plain run's weights). Through DeepSpeed's API they match DDP bit for bit.
    got, ddp = _same_on_both_ranks(runs, stage, case), runs[0]["ddp"][case]
    assert got["weights"] == ddp["weights"] and got["weights"] != runs[0][stage]["plain"]["weights"]
    assert got["perturbations"] == ddp["perturbations"] == (2 if case == "gradient_noise" else 0)  # steps 0 and 2


@pytest.mark.parametrize("case", ["floss_rounds", "floss_continuous"])
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_gradient_flossing_matches_ddp(runs, stage, case):
    # Pre-training and periodic rounds ("floss_rounds"), or the added loss term ("floss_continuous"). Flossed
    # weights go into DeepSpeed's fp32 masters, the continuous term into its gradient buffers: before, the masters
    # overwrote the flossing at the next step and the continuous term changed nothing.
    got, ddp = _same_on_both_ranks(runs, stage, case), runs[0]["ddp"][case]
    assert got["weights"] == ddp["weights"]
    assert got["lyapunov"] == ddp["lyapunov"]


@pytest.mark.parametrize("case", ["floss_rounds", "floss_continuous"])
def test_gradient_flossing_is_refused_on_zero3(runs, case):
    message = _same_on_both_ranks(runs, "zero3", case)["error"]
    assert "GradientFlossing does not support DeepSpeed ZeRO stage 3" in message and "stage 1 or 2" in message


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_resumes_exactly(runs, stage):
    got = _same_on_both_ranks(runs, stage, "resume")
    assert got["resumed"] == got["full"]  # weights after 2 + 2 steps, resumed from DeepSpeed's checkpoint directory
    assert all(got["states_equal"]) and len(got["states_equal"]) == (2 if stage == "zero3" else 4)
    # A DeepSpeed checkpoint (a directory), each rank's optimizer partition in a file of its own.
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        got["files"]
    )
    if stage != "zero3":  # the same run under DDP ends at the same weights
        assert got["full"] == runs[0]["ddp"]["resume"]["full"]
