"""The ``llama-tiny`` recipe under DeepSpeed ZeRO-2 (the variant the GPU ``llama-*`` recipes document), on CPU.

``lightning-gd fit --config llama-tiny --trainer.strategy deepspeed_stage_2`` needs CUDA; the test harness
(``tests/helpers/deepspeed.py``, never shipped) is reached from the same command line as a ``class_path``, so the
recipe's YAML, the CLI's parsing and linking, and Lightning's and DeepSpeed's code all run as a user's would. The
same 2-process job fits the recipe under plain DDP for comparison.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.ddp import run_ddp_script

_STRATEGY = json.dumps({"class_path": "tests.helpers.deepspeed.CPUDeepSpeedStrategy", "init_args": {"stage": 2}})

_SCRIPT = f"""
import tests.helpers.deepspeed  # first: sets DS_ACCELERATOR=cpu before DeepSpeed is imported

import csv
import os
from pathlib import Path

import torch

from lightning_gd.cli import LightningGDCLI, _resolve_config_names
from tests.helpers.ddp import write_result
from tests.helpers.resume import tiny_overrides

out = {{}}
for name, strategy in (("ddp", "ddp"), ("zero2", {_STRATEGY!r})):
    # What `lightning-gd fit` runs (lightning_gd.cli.main), shrunk to 6 steps of 2 layers, validating at step 3.
    args = ["fit", "--config", "llama-tiny", *tiny_overrides("llama-tiny", 3), "--trainer.devices", "2",
            "--trainer.strategy", strategy, "--trainer.logger.init_args.name", name]
    trainer = LightningGDCLI(args=_resolve_config_names(args)).trainer
    model = trainer.lightning_module
    rows = []
    if trainer.is_global_zero:
        with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    last = Path(trainer.checkpoint_callback.last_model_path)
    out[name] = {{
        "strategy": type(trainer.strategy).__name__, "optimizer": type(trainer.optimizers[0]).__name__,
        "global_step": trainer.global_step,
        "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
        "train_loss": [float(r["train/loss"]) for r in rows if r.get("train/loss")],
        "val_loss": [float(r["val/loss"]) for r in rows if r.get("val/loss")],
        "last_ckpt_is_dir": last.is_dir(), "plot": (Path(trainer.log_dir) / "loss_curves.png").is_file(),
    }}
write_result(out, int(os.environ.get("LOCAL_RANK", 0)))
"""


def test_llama_tiny_trains_under_zero2_like_ddp(tmp_path):
    r0, r1 = run_ddp_script(_SCRIPT, tmp_path, timeout=600)
    ddp, z2 = r0["ddp"], r0["zero2"]
    assert (z2["strategy"], z2["optimizer"]) == ("CPUDeepSpeedStrategy", "DeepSpeedZeroOptimizer")
    assert z2["global_step"] == ddp["global_step"] == 6
    assert r1["zero2"]["weights"] == z2["weights"]  # replicas equal
    # AdamW with the recipe's clipping at 1.0: DeepSpeed clips its flat partitions, DDP each tensor; the same update
    # up to float32 rounding (measured 4e-9).
    assert max(abs(a - b) for a, b in zip(z2["weights"], ddp["weights"], strict=True)) < 1e-6
    assert len(z2["train_loss"]) == 6 and z2["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-5)
    assert len(z2["val_loss"]) == 2 and z2["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)
    assert z2["train_loss"][-1] < z2["train_loss"][0]  # it learns
    assert z2["last_ckpt_is_dir"] and not ddp["last_ckpt_is_dir"]  # the recipe's last.ckpt: DeepSpeed's directory
    assert z2["plot"]  # MetricPlotter's loss_curves.png
