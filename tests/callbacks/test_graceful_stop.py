"""GracefulStop: Ctrl-C (SIGINT) and SIGTERM sent by another process stop a real ``lightning-gd fit`` with its work
saved (a checkpoint that loads, the plots, the sample); a second Ctrl-C exits at once; under 2-process DDP a
signal to one rank stops every rank at the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.callbacks import GracefulStop
from lightning_gd.plugins.checkpoint_io import is_temporary, probe_checkpoint
from lightning_gd.recipes.registry import recipe_path
from tests.helpers.ddp import REPO_ROOT, run_ddp_script
from tests.helpers.interrupt import TINY_QUICKSTART
from tests.helpers.timeouts import scaled_timeout

RUN = Path("runs") / "quickstart" / "version_0"


def _start(tmp_path: Path, config: str = "quickstart") -> tuple[subprocess.Popen, Path]:
    """``lightning-gd fit`` in a subprocess, training far longer than the test; returns it once step 3 is done."""
    marker, log = tmp_path / "step3", tmp_path / "stderr.txt"
    cmd = [
        sys.executable, "-m", "lightning_gd", "fit", "--config", config, *TINY_QUICKSTART,
        "--trainer.max_steps", "100000",
        "--trainer.callbacks+=tests.helpers.interrupt.TouchAtStep", "--trainer.callbacks.path", str(marker),
        "--trainer.callbacks.step", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + scaled_timeout(180)
    while not marker.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.2)
    return proc, log


def _lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("lightning-gd:")]


@pytest.mark.parametrize(("sig", "name"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_saves_a_checkpoint_the_plots_and_the_sample_then_exits(tmp_path, sig, name):
    proc, log = _start(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=scaled_timeout(120)) == 128 + sig, log.read_text()[-3000:]
    lines = _lines(log)
    assert lines[0] == (
        f"lightning-gd: {name}: stopping after this step, once a checkpoint, the plots and the sample are saved"
        f" ({name} again exits at once)"
    )
    saved = tmp_path / RUN / "checkpoints" / "interrupted.ckpt"
    step = probe_checkpoint(saved).global_step
    assert step >= 3
    assert lines[1] == f"lightning-gd: saved {RUN / 'checkpoints' / 'interrupted.ckpt'} at step {step}: the same" \
        " command continues from it"  # fmt: skip
    assert len(lines) == 2, lines
    run = tmp_path / RUN
    assert (run / "sample.txt").read_text().startswith("def ")
    assert (run / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in log.read_text()


def test_a_second_ctrl_c_exits_at_once_keeping_the_complete_checkpoints(tmp_path):
    # A long sample at the end, so that the second Ctrl-C lands while the outputs are being written.
    config = yaml.safe_load(recipe_path("quickstart").read_text())
    sampler = next(c for c in config["trainer"]["callbacks"] if c["class_path"] == "TextSampler")
    sampler["init_args"]["max_new_tokens"] = 1_000_000
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    proc, log = _start(tmp_path, config="quickstart.yaml")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + scaled_timeout(120)
    while not any(line.startswith("lightning-gd: saved") for line in _lines(log)):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=scaled_timeout(60)) == 130
    assert time.monotonic() - sent < scaled_timeout(10)  # not the minutes the sample would take
    assert _lines(log)[-1] == "lightning-gd: Ctrl-C again: exiting at once (the last complete checkpoint is kept)"
    ckpts = tmp_path / RUN / "checkpoints"
    assert not [p for p in os.listdir(ckpts) if is_temporary(p)]
    for path in ckpts.iterdir():
        probe_checkpoint(path)  # every checkpoint left is whole
    assert not (tmp_path / RUN / "sample.txt").exists()  # it was cut short


def test_a_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path):
    results = run_ddp_script(
        """
        from lightning.pytorch import Trainer
        from lightning_gd.callbacks import GracefulStop, MetricPlotter
        from lightning_gd.plugins import AtomicCheckpointIO
        from tests.helpers.ddp import write_result
        from tests.helpers.interrupt import SignalAtStep
        from tests.helpers.models import TinyClassifier, classification_loader

        stop = GracefulStop()
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1000, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                          callbacks=[SignalAtStep(3, "SIGTERM", rank=1), MetricPlotter(metrics=["train/loss"]), stop])
        code = None
        try:
            trainer.fit(TinyClassifier(), classification_loader(n=256, batch_size=8))
        except SystemExit as exit_info:
            code = exit_info.code
        write_result({"code": code, "step": trainer.global_step, "saved": stop.saved_path}, trainer.global_rank)
        """,
        tmp_path,
    )
    assert [r["code"] for r in results] == [143, 143]
    assert results[0]["step"] == results[1]["step"] == 3  # rank 0 got no signal and stopped with rank 1
    assert results[0]["saved"] == results[1]["saved"]
    ckpt = torch.load(results[0]["saved"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3


def test_arguments_are_checked():
    with pytest.raises(MisconfigurationException, match="`signals` must name catchable signals, got 'SIGKILL'"):
        GracefulStop(signals=("SIGKILL",))
    with pytest.raises(MisconfigurationException, match="`filename` must not be empty"):
        GracefulStop(filename="")
