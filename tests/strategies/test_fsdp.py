"""Every callback under real FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``, 2-way data
parallel, gloo on CPU), against DDP of the same seed.

The results come from the same 2-process job as ``test_deepspeed.py`` (``_backends_job.py``). FSDP2 shards every
parameter as a DTensor: the curvature callbacks measure by central differences of FSDP2's own gradients on each
rank's shards (DDP's numbers within the finite-difference error); gradient flossing, which needs whole weights, is
refused at setup; the noise
of ``NoiseAnnealing`` is drawn whole and each rank adds its shard; ``TextSampler`` generates on every rank (each
forward all-gathers). FSDP1 (``FSDPStrategy``) needs a GPU in Lightning: its curvature run is a GPU test in
``tests/callbacks/test_curvature_callbacks.py``.
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


def test_training_matches_ddp(backend_runs):
    assert same_on_both_ranks(backend_runs, "fsdp2", "plain")["weights"] == backend_runs[0]["ddp"]["plain"]["weights"]


def test_curvature_callbacks_match_ddp_and_never_perturb_training(backend_runs):
    check_sharded_curvature(backend_runs, "fsdp2")


def test_adam_sharpness_is_the_raw_one(backend_runs):
    check_sharded_adam_sharpness(backend_runs, "fsdp2")


@pytest.mark.parametrize("case", ["floss_rounds", "floss_continuous"])
def test_gradient_flossing_is_refused(backend_runs, case):
    message = same_on_both_ranks(backend_runs, "fsdp2", case)["error"]
    assert "GradientFlossing does not support ModelParallelStrategy" in message and "stage 1 or 2" in message


def test_metric_plotter_matches_ddp(backend_runs):
    got = same_on_both_ranks(backend_runs, "fsdp2", "plotter")
    assert got["history"] == backend_runs[0]["ddp"]["plotter"]["history"] and got["png"]


@pytest.mark.parametrize("case", ["gradient_noise", "weight_noise"])
def test_noise_annealing_matches_ddp(backend_runs, case):
    got, ddp = same_on_both_ranks(backend_runs, "fsdp2", case), backend_runs[0]["ddp"][case]
    assert got["weights"] != backend_runs[0]["fsdp2"]["plain"]["weights"]  # the noise reached the shards
    # The same noise per entry; the clipping norm of sharded gradients is summed in another order (measured 4e-9).
    assert got["weights"] == pytest.approx(ddp["weights"], abs=1e-6)
    assert got["perturbations"] == ddp["perturbations"]


def test_text_sampler_matches_ddp(backend_runs):
    got, ddp = same_on_both_ranks(backend_runs, "fsdp2", "text_sampler"), backend_runs[0]["ddp"]["text_sampler"]
    assert got["weights"] == ddp["weights"] and got["sample"] == ddp["sample"]


def test_sharpness_of_an_rnn_at_every_step_matches_ddp(backend_runs):
    check_sharded_rnn_sharpness(backend_runs, "fsdp2")


def test_distributed_checkpoint_resumes_exactly(backend_runs):
    got = same_on_both_ranks(backend_runs, "fsdp2", "resume")
    assert got["resumed"] == got["full"] and all(got["states_equal"]) and len(got["states_equal"]) == 3
    # SharpnessTracker's warm starts are each rank's shard: both ranks' are in the checkpoint, and the checks after
    # the resume (steps 3 and 4) log what the uninterrupted run logged (its whole state is equal, history included).
    assert got["warm_start_ranks"] == 2 and len(got["sharpness"]["sharpness/lambda_max"]) == 4
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(got["files"])  # each rank's shard, torch.distributed.checkpoint


def test_a_kink_is_skipped_on_every_rank(backend_runs):
    check_sharded_kink(backend_runs, "fsdp2")
