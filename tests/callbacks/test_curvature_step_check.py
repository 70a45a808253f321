"""The curvature callbacks' step check: with central-difference products, a check whose products depend on their
step (a kink, half-precision gradients) is skipped with one warning and its change logged; smooth models report as
before; ``fd_tolerance=None`` turns it off; bad values are refused."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import HessianTraceMonitor, SharpnessTracker
from tests.helpers.models import KinkedRegressor, TinyClassifier, classification_loader, kinked_loader
from tests.helpers.trainer import quiet_trainer


def _callbacks(**kwargs):
    common = {"every_n_steps": 1, "max_overhead": None, "hvp": "finite_difference", **kwargs}
    return SharpnessTracker(plot=False, max_iter=20, **common), HessianTraceMonitor(num_probes=4, **common)


def test_a_kink_is_skipped_with_one_warning_and_its_change_logged(tmp_path):
    seed_everything(0)
    sharp, trace = _callbacks()
    model = KinkedRegressor()
    with pytest.warns(UserWarning, match="depend on their step") as record:
        quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=3).fit(model, kinked_loader())
    warned = [str(w.message) for w in record if "depend on their step" in str(w.message)]
    assert len(warned) == 2  # once per callback, not once per check
    assert warned[0].startswith("SharpnessTracker:") and "along the top eigenvector" in warned[0]
    assert warned[1].startswith("HessianTraceMonitor:") and "along a Rademacher probe" in warned[1]
    for cb, name, figure in ((sharp, "sharpness", "lambda_max"), (trace, "hessian", "trace")):
        changes = cb.history[f"{name}/fd_step_change"]
        assert [s for s, _ in changes] == [1, 2, 3]
        assert all(v > 0.2 for _, v in changes), changes  # the jump over 2h halves when h doubles: ~0.5
        assert f"{name}/{figure}" not in cb.history  # nothing wrong was logged
    assert model.net[0].bias[0].item() == 0.0  # still at its kink after training (the premise of the test)


def test_without_the_check_the_kinked_figure_is_reported_and_wrong(tmp_path):
    """What the check prevents: the central-difference lambda_max of the kinked model is far from the exact one."""

    def run(hvp, fd_tolerance):
        seed_everything(0)
        sharp = SharpnessTracker(every_n_steps=1, max_overhead=None, plot=False, hvp=hvp, fd_tolerance=fd_tolerance)
        quiet_trainer(tmp_path, callbacks=[sharp], max_steps=1).fit(KinkedRegressor(), kinked_loader())
        return sharp.last_metrics

    fd, exact = run("finite_difference", None), run("double_backward", 0.05)
    assert "sharpness/fd_step_change" not in fd and "sharpness/fd_step_change" not in exact  # off; exact products
    assert fd["sharpness/lambda_max"] > 10 * exact["sharpness/lambda_max"], (fd, exact)


def test_a_smooth_model_reports_with_the_change_logged(tmp_path):
    seed_everything(0)
    sharp, trace = _callbacks()
    quiet_trainer(tmp_path, callbacks=[sharp, trace], max_steps=2).fit(TinyClassifier(), classification_loader())
    for cb, name, figure in ((sharp, "sharpness", "lambda_max"), (trace, "hessian", "trace")):
        m = cb.last_metrics
        assert 0 <= m[f"{name}/fd_step_change"] < 1e-2 and math.isfinite(m[f"{name}/{figure}"]), m
        assert len(cb.history[f"{name}/{figure}"]) == 2


@pytest.mark.parametrize("cls", [SharpnessTracker, HessianTraceMonitor])
@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.05", True])
def test_a_bad_fd_tolerance_is_refused(cls, bad):
    with pytest.raises(MisconfigurationException, match="fd_tolerance"):
        cls(fd_tolerance=bad)


def test_the_check_leaves_training_as_it_was(tmp_path):
    def run(callbacks):
        seed_everything(3)
        model = KinkedRegressor()
        quiet_trainer(tmp_path, callbacks=callbacks, max_steps=3).fit(model, kinked_loader())
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    (plain, rng_plain), (checked, rng_checked) = run([]), run(list(_callbacks()))
    assert all(torch.equal(a, b) for a, b in zip(plain, checked, strict=True))
    assert torch.equal(rng_plain, rng_checked)
