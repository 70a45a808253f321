"""``lightning-gd analyze`` on a checkpoint of every shipped recipe, shrunk as in tests/test_resume.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_gd.analysis import analyze
from lightning_gd.recipes.registry import recipes
from tests.helpers.resume import _working_dir, run_fit, tiny_overrides

# Few products and points: this checks that every recipe runs end to end, not the accuracy (tests/analysis/
# test_analyze.py checks that against a dense Hessian).
_QUICK = ["--analysis.k", "2", "--analysis.max_iter", "6", "--analysis.trace_probes", "3",
          "--analysis.density_steps", "4", "--analysis.grid_1d", "3", "--analysis.grid_2d", "3",
          "--analysis.save_eigenvectors", "true"]  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_every_recipe_checkpoint_is_analysed(recipe, tmp_path):
    args = tiny_overrides(recipe, steps=1, work=tmp_path)
    with _working_dir(tmp_path):
        run_fit(recipe, args, tmp_path / "ckpts", every_n=1)
        # The recipe's own ModelCheckpoint writes <run>/checkpoints/last.ckpt: the report goes into that run.
        last = sorted(tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt"))
        ckpt = last[0] if last else tmp_path / "ckpts" / "step=2.ckpt"
        report = analyze(["--config", recipe, *args, "--ckpt_path", str(ckpt), *_QUICK])
    out = (ckpt.parent.parent if last else tmp_path / "runs") / "analysis"
    reports = sorted(out.rglob("report.json")) if last else sorted(tmp_path.rglob("analysis/*/report.json"))
    assert len(reports) == 1, reports
    on_disk = json.loads(reports[0].read_text())
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert on_disk["global_step"] == step > 0 and on_disk["top"]["eigenvalues"] == report["top"]["eigenvalues"]
    numbers = [
        report["loss"],
        report["trace"]["value"],
        *report["top"]["eigenvalues"],
        *report["bottom"]["eigenvalues"],
    ]
    assert all(math.isfinite(v) for v in numbers), numbers
    for name in report["files"]:
        assert (reports[0].parent / name).is_file(), name
