"""``lightning-gd analyze`` against dense references, on a user's own module named in a YAML, on two processes,
side by side, and on bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file

from lightning_gd.analysis import analyze
from lightning_gd.cli import main
from tests.callbacks.test_curvature_callbacks import _adam_p_by_hand
from tests.helpers.ddp import run_ddp_script
from tests.helpers.hessian import exact_hessian
from tests.helpers.models import TinyClassifier, classification_loader
from tests.helpers.resume import _working_dir

# A user's own LightningModule and data module, named in a YAML: float64 (64-true) and small enough for a dense
# Hessian (8 -> 16 -> 3: 195 parameters), trained with Adam so that the checkpoint holds Adam moments.
_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "precision": "64-true", "max_steps": 3, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "tiny"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
             "init_args": {"save_dir": "runs", "name": "tiny"}},
        ],
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}}],
    },
    "model": {"class_path": "tests.helpers.models.TinyClassifier",
              "init_args": {"batchnorm": False, "dropout": 0.0, "optimizer": "adam", "lr": 0.01}},
    "data": {"class_path": "tests.helpers.models.TinyClassificationData", "init_args": {"batch_size": 16}},
}  # fmt: skip
_NUMEL = 8 * 16 + 16 + 16 * 3 + 3
# Exact settings: Lanczos to 1e-10 over the whole space; Hutch++ with a sketch of the whole space (exact trace).
_EXACT = ["--analysis.num_batches", "2", "--analysis.k", "3", "--analysis.bottom_k", "2", "--analysis.tol", "1e-10",
          "--analysis.max_iter", str(_NUMEL), "--analysis.trace_probes", str(3 * _NUMEL),
          "--analysis.density_steps", "20", "--analysis.grid_1d", "5", "--analysis.grid_2d", "3",
          "--analysis.eigen_span", "1e-3", "--analysis.save_eigenvectors", "true"]  # fmt: skip
# Small settings for the checks that are not about accuracy.
_QUICK = ["--analysis.k", "2", "--analysis.max_iter", "12", "--analysis.trace_probes", "6",
          "--analysis.density_steps", "6", "--analysis.grid_1d", "3", "--analysis.grid_2d", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run of the YAML's module through ``lightning-gd fit``: checkpoints at steps 1, 2 and 3."""
    work = tmp_path_factory.mktemp("analyze")
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(_CONFIG), encoding="utf-8")
    with _working_dir(work):
        main(["fit", "--config", str(config)])
    ckpts = work / "runs" / "tiny" / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    return work, config, ckpts


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_report_matches_the_dense_hessian_of_a_float64_model(tiny_run, capsys):
    work, config, ckpts = tiny_run
    ckpt = ckpts / "step=3.ckpt"
    before = _files(work)
    with _working_dir(work):
        report = analyze(["--config", str(config), "--ckpt_path", str(ckpt), *_EXACT])
    out = ckpts.parent / "analysis" / "step=3"  # the checkpoint's run directory
    # Only the analysis directory is new, and no file changed (the checkpoint included).
    after = _files(work)
    assert {k: v for k, v in after.items() if k in before} == before
    new = sorted(k for k in after if k not in before)
    assert new and all(k.startswith(str(out.relative_to(work))) for k in new), new
    names = {Path(k).name for k in new}
    assert {"report.json", "report.md", "spectral_density.png", "per_layer_trace.png", "landscape_1d.png",
            "landscape_2d.png", "eigenvectors.safetensors"} <= names  # fmt: skip
    assert any(n.startswith("events.out.tfevents") for n in names)  # the YAML has a TensorBoard logger

    # The dense reference: the Hessian of the mean loss over the first two batches (equal sizes: one batch of 32).
    model = TinyClassifier(batchnorm=False, dropout=0.0).double()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    x, y = next(iter(classification_loader(n=64, batch_size=32)))  # the data module's first two batches of 16
    H = exact_hessian(model, (x.double(), y))
    eig = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(
        torch.tensor(report["top"]["eigenvalues"], dtype=torch.float64), eig[-3:].flip(0), rtol=1e-8, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(report["bottom"]["eigenvalues"], dtype=torch.float64), eig[:2], rtol=1e-6, atol=0
    )
    assert max(report["top"]["residual_norms"]) < 1e-8 * eig[-1].item()
    assert report["trace"]["value"] == pytest.approx(torch.trace(H).item(), rel=1e-7)
    per = report["trace"]["per_parameter"]
    sizes = [p.numel() for p in model.parameters()]
    blocks = torch.diagonal(H).split(sizes)
    for (name, _), block in zip(model.named_parameters(), blocks, strict=True):
        assert per[name] == pytest.approx(block.sum().item(), rel=1e-6, abs=1e-9)
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(model(x.double()), y).item(), rel=1e-12)
    assert report["batches"]["count"] == 2 and report["batches"]["samples"] == 32

    # Adam's preconditioned sharpness, from the checkpoint's optimizer state (Cohen et al. 2022).
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(state["optimizer_states"][0])
    s = _adam_p_by_hand(opt, tuple(model.parameters())).rsqrt()
    exact_pre = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()
    pre = report["preconditioned"]
    assert pre["lambda_max"] == pytest.approx(exact_pre, rel=1e-8)
    assert pre["threshold"] == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 0.01))
    assert pre["optimizer_step"] == 3

    # The 1-D landscape along the top eigenvector: loss + slope t + lambda_max t^2 / 2 up to O(t^3).
    land = report["landscape"]
    lam, loss0 = eig[-1].item(), report["loss"]
    for t, value in zip(land["eigen_1d"]["t"], land["eigen_1d"]["loss"], strict=True):
        predicted = loss0 + land["slope_along_v1"] * t + 0.5 * lam * t * t
        assert abs(value - predicted) <= 1e-2 * 0.5 * lam * t * t + 1e-15, (t, value, predicted)

    # The eigenvectors, in the parameters' shapes: unit eigenvectors of the dense Hessian.
    saved = load_file(str(out / "eigenvectors.safetensors"))
    assert saved["v0/net.0.weight"].shape == (16, 8) and saved["v2/net.2.bias"].shape == (3,)
    for i in range(3):
        v = torch.cat([saved[f"v{i}/{name}"].flatten() for name, _ in model.named_parameters()])
        assert v.norm().item() == pytest.approx(1.0, rel=1e-10)
        assert torch.linalg.vector_norm(H @ v - eig[-1 - i] * v) < 1e-7 * eig[-1].item()

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["top"]["eigenvalues"] == report["top"]["eigenvalues"]
    md = (out / "report.md").read_text()
    assert "first 2 batches of the training loader" in md and "landscape_2d.png" in md
    printed = capsys.readouterr().out
    number_lines = [line for line in printed.splitlines() if line.startswith("  ") and "wrote" not in line]
    assert number_lines and all("[2 training batches, seed 0]" in line for line in number_lines), printed


def test_two_processes_give_the_numbers_of_one(tiny_run, tmp_path):
    # Under --trainer.devices 2 each rank measures one of the two batches and the products are averaged: the
    # Hessian of the same mean loss, so the same numbers as on one process; both ranks return the same report.
    work, config, ckpts = tiny_run
    args = ["--config", str(config), "--ckpt_path", str(ckpts / "step=2.ckpt"), "--analysis.num_batches", "2",
            *_QUICK, "--analysis.landscape", "false"]  # fmt: skip
    with _working_dir(work):
        one = analyze(args)
    script = f"""
import os, sys
from lightning_gd.analysis import analyze
from tests.helpers.ddp import write_result
from tests.helpers.resume import _working_dir
with _working_dir({str(work)!r}):
    report = analyze({args!r} + ["--trainer.devices", "2", "--trainer.strategy", "ddp"])
report = {{k: v for k, v in report.items() if not k.startswith("_") and k not in ("time_s", "density")}}
write_result(report, int(os.environ.get("LOCAL_RANK", 0)))
"""
    r0, r1 = run_ddp_script(script, tmp_path)
    assert r0 == r1
    assert r0["batches"]["world_size"] == 2 and "1 per rank over 2 ranks" in r0["batches"]["description"]
    for key in ("top", "bottom"):
        torch.testing.assert_close(_f64(r0[key]["eigenvalues"]), _f64(one[key]["eigenvalues"]), rtol=1e-9, atol=1e-12)
    assert r0["trace"]["value"] == pytest.approx(one["trace"]["value"], rel=1e-9)
    assert r0["loss"] == pytest.approx(one["loss"], rel=1e-12)
    assert r0["preconditioned"]["lambda_max"] == pytest.approx(one["preconditioned"]["lambda_max"], rel=1e-9)


def test_compare_puts_two_checkpoints_side_by_side(tiny_run):
    work, config, ckpts = tiny_run
    with _working_dir(work):
        both = analyze(["--config", str(config), "--ckpt_path", str(ckpts / "step=1.ckpt"), "--compare",
                        str(ckpts / "step=3.ckpt"), "--analysis.num_batches", "1", *_QUICK])  # fmt: skip
    out = ckpts.parent / "analysis" / "step=1_vs_step=3"
    assert both["a"]["global_step"] == 1 and both["b"]["global_step"] == 3
    assert both["a"]["batches"] == both["b"]["batches"]  # the same batches
    assert both["a"]["top"]["eigenvalues"] != both["b"]["top"]["eigenvalues"]
    for name in ("report.md", "report.json", "spectral_density.png", "a_step=1/report.json", "b_step=3/report.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "step=1.ckpt (step 1)" in md and "step=3.ckpt (step 3)" in md
    assert json.loads((out / "report.json").read_text())["b"]["top"] == both["b"]["top"]


def test_bad_input_is_refused_with_one_clear_line(tiny_run, capsys):
    work, config, ckpts = tiny_run
    with _working_dir(work), pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--config", str(config), "--ckpt_path", "runs/nowhere/last.ckpt"])
    assert exit_info.value.code == 2
    assert "lightning-gd analyze: error: checkpoint not found: runs/nowhere/last.ckpt" in capsys.readouterr().err
    # Another model: the first mismatched parameter is named, with both shapes.
    with _working_dir(work), pytest.raises(MisconfigurationException, match=r"'net\.0\.weight', has shape \(16, 8\)"
                                           r" in the checkpoint and \(32, 8\) in the model"):  # fmt: skip
        analyze(["--config", str(config), "--ckpt_path", str(ckpts / "step=1.ckpt"), "--model.init_args.hidden",
                 "32"])  # fmt: skip
    # A budget below what the analysis needs: the callbacks' error, with the numbers.
    with _working_dir(work), pytest.raises(MisconfigurationException, match=r"memory_budget=1,000 bytes \(given\)"
                                           r" holds 0 parameter-sized vectors of 195 entries"):  # fmt: skip
        analyze(["--config", str(config), "--ckpt_path", str(ckpts / "step=1.ckpt"),
                 "--analysis.memory_budget", "1000"])  # fmt: skip
    with _working_dir(work), pytest.raises(MisconfigurationException, match=r"`analysis.trace_probes` must be an"):
        analyze(["--config", str(config), "--ckpt_path", str(ckpts / "step=1.ckpt"), "--analysis.trace_probes", "2"])


def test_numbers_are_finite_and_named(tiny_run):
    # A report without the landscape and without Adam's moments (preconditioned=false) still has every section.
    work, config, ckpts = tiny_run
    with _working_dir(work):
        report = analyze(["--config", str(config), "--ckpt_path", str(ckpts / "step=1.ckpt"),
                          "--analysis.preconditioned", "false", "--analysis.landscape", "false",
                          "--analysis.bottom_k", "0", *_QUICK])  # fmt: skip
    assert (
        "landscape" not in report and "bottom" not in report and report["preconditioned"]["skipped"] == "not asked for"
    )
    assert all(math.isfinite(v) for v in report["top"]["eigenvalues"])
    assert os.path.isfile(ckpts.parent / "analysis" / "step=1" / "report.md")
