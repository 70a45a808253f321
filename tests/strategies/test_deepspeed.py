"""Every callback under real DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3, against DDP of the same seed.

One 2-process gloo job (``_backends_job.py``; ``tests/helpers/deepspeed.py``'s CPU harness around Lightning's own
``DeepSpeedStrategy``) fits the same seeded runs under DDP, each ZeRO stage and FSDP2, then every test below checks
one feature on one stage from the job's results: where a feature works it must give DDP's numbers and weights
(bit for bit where the arithmetic is the same; the curvature on ZeRO-3, by finite differences of the partitioned
gradients, within their error) and resume exactly from a DeepSpeed checkpoint; where it cannot (gradient flossing on
ZeRO-3, which partitions the parameters) it must be refused at setup with a message naming the stage and what to use
instead.
"""

from __future__ import annotations

import pytest

from tests.strategies.conftest import (
    check_sharded_adam_sharpness,
    check_sharded_curvature,
    check_sharded_kink,
    check_sharded_rnn_sharpness,
    same_on_both_ranks,
)

STAGES = ("zero1", "zero2", "zero3")


@pytest.mark.parametrize("stage", STAGES)
def test_training_matches_ddp(backend_runs, stage):
    # fp32 SGD: ZeRO's averaged gradients and master-weight update are DDP's arithmetic, bit for bit.
    assert same_on_both_ranks(backend_runs, stage, "plain")["weights"] == backend_runs[0]["ddp"]["plain"]["weights"]


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_curvature_callbacks_match_ddp_and_never_perturb_training(backend_runs, stage):
    ddp, got = backend_runs[0]["ddp"]["curvature"], same_on_both_ranks(backend_runs, stage, "curvature")
    assert got["weights"] == backend_runs[0][stage]["plain"]["weights"]  # measuring leaves training bit-identical
    assert got["trace"].keys() == ddp["trace"].keys() and got["sharp"].keys() == ddp["sharp"].keys()
    for key in ("trace", "sharp"):
        for metric, value in ddp[key].items():
            assert got[key][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, metric)
    assert "sharpness/lambda_min" in got["sharp"] and got["trace"]["hessian/num_hvps"] > 0


def test_curvature_callbacks_on_zero3_match_ddp_and_never_perturb_training(backend_runs):
    # Central differences of the engine's partitioned gradients, on each rank's partitions: DDP's sharpness within
    # the finite-difference error, and FSDP2's numbers (the same global probes; measured 2.3e-5 apart in lambda_max:
    # the partitions' rounding differs from the shards', and Lanczos amplifies it to the finite-difference error).
    check_sharded_curvature(backend_runs, "zero3")
    got, fsdp2 = backend_runs[0]["zero3"]["curvature"], backend_runs[0]["fsdp2"]["curvature"]
    for key in ("trace", "sharp"):
        for metric, value in fsdp2[key].items():
            if metric.endswith("/fd_step_change"):  # the step check's change is rounding-level (8e-5): not compared
                continue
            assert got[key][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, metric)


def test_sharpness_of_an_rnn_at_every_step_matches_ddp(backend_runs):
    check_sharded_rnn_sharpness(backend_runs, "zero3")


def test_adam_sharpness_is_the_raw_one_on_zero3(backend_runs):
    check_sharded_adam_sharpness(backend_runs, "zero3")


def test_metric_plotter_under_ddp(backend_runs):
    got = same_on_both_ranks(backend_runs, "ddp", "plotter")
    assert len(got["history"]["train/loss"]) == 4 and got["png"]


@pytest.mark.parametrize("stage", STAGES)
def test_metric_plotter_matches_ddp(backend_runs, stage):
    got = same_on_both_ranks(backend_runs, stage, "plotter")
    ddp = backend_runs[0]["ddp"]["plotter"]
    assert got["history"] == ddp["history"] and len(got["history"]["train/loss"]) == 4
    assert got["png"]


@pytest.mark.parametrize("case", ["gradient_noise", "weight_noise"])
@pytest.mark.parametrize("stage", STAGES)
def test_noise_annealing_matches_ddp(backend_runs, stage, case):
    # DeepSpeed's optimizer steps its flat fp32 partitions: noise written to `p.grad` or `p` would be lost (before
    # the fix these runs ended with the plain run's weights). Through DeepSpeed's API they match DDP bit for bit.
    got, ddp = same_on_both_ranks(backend_runs, stage, case), backend_runs[0]["ddp"][case]
    assert got["weights"] == ddp["weights"] and got["weights"] != backend_runs[0][stage]["plain"]["weights"]
    assert got["perturbations"] == ddp["perturbations"] == (2 if case == "gradient_noise" else 0)  # steps 0 and 2


@pytest.mark.parametrize("case", ["floss_rounds", "floss_continuous"])
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_gradient_flossing_matches_ddp(backend_runs, stage, case):
    # Pre-training and periodic rounds ("floss_rounds"), or the added loss term ("floss_continuous"). Flossed
    # weights go into DeepSpeed's fp32 masters, the continuous term into its gradient buffers: before, the masters
    # overwrote the flossing at the next step and the continuous term changed nothing.
    got, ddp = same_on_both_ranks(backend_runs, stage, case), backend_runs[0]["ddp"][case]
    assert got["weights"] == ddp["weights"]
    assert got["lyapunov"] == ddp["lyapunov"]


@pytest.mark.parametrize("case", ["floss_rounds", "floss_continuous"])
def test_gradient_flossing_is_refused_on_zero3(backend_runs, case):
    message = same_on_both_ranks(backend_runs, "zero3", case)["error"]
    assert "GradientFlossing does not support DeepSpeed ZeRO stage 3" in message and "stage 1 or 2" in message


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_resumes_exactly(backend_runs, stage):
    got = same_on_both_ranks(backend_runs, stage, "resume")
    assert got["resumed"] == got["full"]  # weights after 2 + 2 steps, resumed from DeepSpeed's checkpoint directory
    assert all(got["states_equal"]) and len(got["states_equal"]) == (3 if stage == "zero3" else 4)
    # SharpnessTracker's checks after the resume log what the uninterrupted run logged (states_equal); under ZeRO-3
    # its warm starts are each rank's partition, both ranks' in the checkpoint.
    assert got["warm_start_ranks"] == (2 if stage == "zero3" else 0)
    assert len(got["sharpness"]["sharpness/lambda_max"]) == 4
    # A DeepSpeed checkpoint (a directory), each rank's optimizer partition in a file of its own.
    optim = {f"checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert optim <= set(got["files"])
    if stage != "zero3":  # the same run under DDP ends at the same weights
        assert got["full"] == backend_runs[0]["ddp"]["resume"]["full"]


@pytest.mark.parametrize("stage", STAGES)
def test_text_sampler_matches_ddp(backend_runs, stage):
    # Under ZeRO-3 every forward gathers the partitioned weights: every rank generates (rank zero alone would wait
    # forever); rank zero keeps and writes the sample, DDP's.
    got, ddp = same_on_both_ranks(backend_runs, stage, "text_sampler"), backend_runs[0]["ddp"]["text_sampler"]
    # AdamW over ZeRO-3's flat partitions rounds differently from per-tensor AdamW: measured up to 5e-7 after 2
    # warm-up steps (a few entries of 217K, with tiny second moments); on ZeRO-1/2 bit-identical.
    assert got["weights"] == pytest.approx(ddp["weights"], abs=1e-5)
    assert got["sample"] == ddp["sample"] and got["sample"].startswith("def")
    assert backend_runs[1][stage]["text_sampler"]["sample"] is None


@pytest.mark.parametrize("stage", STAGES)
def test_a_shape_dependent_optimizer_recipe_is_refused(backend_runs, stage):
    # Conda on ZeRO's flat 1-D partitions would silently take its AdamW path (measured: a whole step off DDP).
    message = same_on_both_ranks(backend_runs, stage, "conda_recipe")["error"]
    assert f"optimizer 'conda' does not work under DeepSpeed ZeRO stage {stage[-1]}" in message
    assert "weights" in backend_runs[0]["ddp"]["conda_recipe"]  # DDP trains with it


@pytest.mark.parametrize("case", ["adam", "adam_clipped"])
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_adam_preconditioned_sharpness_matches_ddp(backend_runs, stage, case):
    # DeepSpeed's optimizer keeps Adam's second moments in flat fp32 partitions: read back per parameter
    # (utils/optim_state.py) they give DDP's preconditioned sharpness. Before, "auto" found no moments there. With
    # clipping, c comes from DeepSpeed's engine (its step has no optimizer hooks) and matches the one measured
    # under DDP.
    got, ddp = same_on_both_ranks(backend_runs, stage, case), backend_runs[0]["ddp"][case]
    assert got["weights"] == pytest.approx(ddp["weights"], abs=1e-7)
    if case == "adam_clipped":
        assert 0 < ddp["sharp"]["sharpness/clip_factor"] < 0.9  # clipping was active
    key = "sharpness/preconditioned_lambda_max"
    assert key in ddp["sharp"] and key in got["sharp"] and "sharpness/lambda_max" not in got["sharp"]
    for metric, value in ddp["sharp"].items():
        assert got["sharp"][metric] == pytest.approx(value, rel=1e-6), metric
    assert [s for s, _ in got["history"][key]] == [2, 4]


def test_adam_preconditioned_sharpness_under_zero_redundancy_optimizer_matches_plain_adam(backend_runs):
    # ZeroRedundancyOptimizer keeps each parameter's Adam state on one rank: gathered, the same number as Adam's.
    got, adam = same_on_both_ranks(backend_runs, "ddp", "zero_redundancy"), backend_runs[0]["ddp"]["adam"]
    assert got["weights"] == pytest.approx(adam["weights"], abs=1e-7)
    key = "sharpness/preconditioned_lambda_max"
    assert got["sharp"][key] == pytest.approx(adam["sharp"][key], rel=1e-5)
    assert got["sharp"]["sharpness/threshold"] == pytest.approx(adam["sharp"]["sharpness/threshold"])


def test_a_kink_is_skipped_on_every_rank(backend_runs):
    check_sharded_kink(backend_runs, "zero3")
