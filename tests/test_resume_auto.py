"""Automatic resume in ``lightning-gd fit``: a relaunch of the same command continues the run from its newest
checkpoint that loads, in the same run directory, and ends bit-identical to an uninterrupted run.

The interruptions are real: a SIGINT the process sends itself after a chosen step (``tests.helpers.interrupt``),
handled by ``GracefulStop`` exactly as a terminal's Ctrl-C; the damaged checkpoints are truncated files.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import lightning.pytorch  # noqa: F401  (Lightning's log handler keeps the real stderr, see tests/test_cli.py)
import pytest
import torch
import yaml

from lightning_gd.cli import main
from lightning_gd.plugins import AtomicCheckpointIO
from lightning_gd.recipes.registry import recipe_path
from tests.helpers.interrupt import TINY_QUICKSTART
from tests.helpers.resume import compare_runs

TINY = TINY_QUICKSTART
STOP_AT = ["--trainer.callbacks+=tests.helpers.interrupt.SignalAtStep", "--trainer.callbacks.step"]
RUN = Path("runs") / "quickstart" / "version_0"


def _fit(capfd, *args: str, steps: int = 8, config: str = "quickstart") -> tuple[int, list[str]]:
    """``lightning-gd fit --config CONFIG TINY ARGS``; its exit status and the command's own lines."""
    code = 0
    try:
        main(["fit", "--config", config, *TINY, "--trainer.max_steps", str(steps), *args])
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("lightning-gd:")]


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        main(["fit", "--config", "quickstart", *TINY, "--trainer.max_steps", "8"])
    finally:
        os.chdir(cwd)
    return tmp / RUN


def test_a_relaunch_resumes_where_ctrl_c_stopped_and_ends_bit_identical(uninterrupted, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    code, lines = _fit(capfd, *STOP_AT, "3")
    assert code == 130, lines  # 128 + SIGINT
    assert any(line.startswith("lightning-gd: Ctrl-C: stopping after this step") for line in lines), lines
    saved = RUN / "checkpoints" / "interrupted.ckpt"
    assert f"lightning-gd: saved {saved} at step 3: the same command continues from it" in lines, lines
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == 3
    assert {"loss_curves.png", "sample.txt"} <= {p.name for p in RUN.iterdir()}  # the end-of-fit outputs

    code, lines = _fit(capfd)  # the same command again (without the test's signal)
    assert code == 0
    assert lines == [f"lightning-gd: resuming from {saved} (step 3 of 8); --resume never starts a new run instead"]
    assert sorted(p.name for p in RUN.parent.iterdir()) == ["version_0"]  # the same run directory
    assert not saved.exists()  # superseded by the run's own checkpoints once it ended
    result = compare_runs(
        uninterrupted / "checkpoints" / "last.ckpt", RUN / "checkpoints" / "last.ckpt",
        _metrics(uninterrupted), _metrics(RUN), after=3,
    )  # fmt: skip
    assert result.tensors_compared > 10 and result.metric_values_compared > 10
    # metrics.csv holds the whole run: the first launch's rows were kept, not deleted by the CSVLogger.
    steps = {int(r["step"]) for r in _metrics(RUN) if r.get("train/loss")}
    assert steps == {int(r["step"]) for r in _metrics(uninterrupted) if r.get("train/loss")}

    code, lines = _fit(capfd)  # and once more: the run is complete
    assert code == 0
    assert len(lines) == 1 and "runs/quickstart is complete" in lines[0] and "max_steps 8" in lines[0], lines
    assert "--resume never" in lines[0] and "--trainer.max_steps" in lines[0]


def test_a_damaged_newest_checkpoint_is_skipped_naming_it(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    assert _fit(capfd, steps=4)[0] == 0
    ckpts = RUN / "checkpoints"
    last = ckpts / "last.ckpt"
    best = next(p for p in ckpts.iterdir() if p.name.startswith("epoch="))
    os.utime(best, (1, 1))  # older than last.ckpt
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    code, lines = _fit(capfd, steps=6)
    assert code == 0
    assert lines[0].startswith(f"lightning-gd: skipping {last}: the file is truncated"), lines
    assert lines[1].startswith(f"lightning-gd: resuming from {best} (step "), lines
    assert len(lines) == 2, lines
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # rewritten whole


def test_an_explicit_damaged_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    code, lines = _fit(capfd, "--ckpt_path", str(bad))
    assert code == 2
    assert lines == [f"lightning-gd: error: checkpoint {bad} cannot be loaded: the file is truncated or is not a"
                     " checkpoint (torch: failed finding central directory)"], lines  # fmt: skip
    assert not Path("runs").exists()


def test_no_checkpoint_that_loads_is_refused_with_the_way_out(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (RUN / "checkpoints").mkdir(parents=True)
    (RUN / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 10)
    code, lines = _fit(capfd)
    assert code == 2
    assert lines[-1].startswith("lightning-gd: error: no checkpoint of runs/quickstart loads (1 damaged"), lines
    assert "pass --resume never to start a new run" in lines[-1]
    code, lines = _fit(capfd, "--resume", "never", steps=2)
    assert code == 0 and lines == [], lines
    assert (RUN.parent / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_resume_never_and_run_name_start_new_runs(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    assert _fit(capfd, steps=2)[0] == 0
    assert _fit(capfd, "--resume", "never", steps=2) == (0, [])
    assert _fit(capfd, "--run_name", "other", steps=2) == (0, [])
    assert sorted(p.name for p in RUN.parent.iterdir()) == ["version_0", "version_1"]
    assert (Path("runs") / "other" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_another_recipes_run_is_refused_naming_both(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    assert _fit(capfd, steps=2)[0] == 0
    shutil.copy(recipe_path("quickstart"), tmp_path / "mine.yaml")  # recipe "mine", same run directory
    code, lines = _fit(capfd, steps=4, config="mine.yaml")
    assert code == 2
    assert "runs/quickstart holds checkpoints of recipe 'quickstart', not of this run's recipe 'mine'" in lines[0]
    assert "--run_name" in lines[0] and "--resume_mismatch warn" in lines[0]
    code, lines = _fit(capfd, "--resume_mismatch", "warn", steps=4, config="mine.yaml")
    assert code == 0
    assert lines[0].startswith("lightning-gd: warning: runs/quickstart holds checkpoints of recipe 'quickstart'")
    assert lines[1].startswith("lightning-gd: resuming from"), lines


def test_a_longer_run_keeps_the_schedule_and_says_which_length(tmp_path, monkeypatch, capfd):
    from lightning_gd.cli import LightningGDCLI, _resolve_config_names

    monkeypatch.chdir(tmp_path)
    assert _fit(capfd, steps=4)[0] == 0

    def relaunch(*extra):
        args = _resolve_config_names(["fit", "--config", "quickstart", *TINY, "--trainer.max_steps", "6", *extra])
        with pytest.warns(UserWarning, match=r"schedule is 4 steps long and this run's") as caught:
            cli = LightningGDCLI(args=args)
        ours = [str(w.message) for w in caught if "ScheduleLengthCheck" in str(w.message)]
        assert len(ours) == 1, ours
        assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # the command's checkpoint writer
        return cli.trainer.lr_scheduler_configs[0].scheduler, ours[0]

    scheduler, message = relaunch()
    assert scheduler.total_steps == 4 and "following the checkpoint's 4 steps" in message
    assert "--resume_schedule this_run" in message
    shutil.rmtree(RUN.parent / "version_0" / "checkpoints")
    assert _fit(capfd, "--resume", "never", steps=4)[0] == 0  # version_1, 4 steps
    scheduler, message = relaunch("--resume_schedule", "this_run")
    assert scheduler.total_steps == 6 and "following this run's 6 steps" in message


def test_a_user_yaml_without_loggers_resumes_in_lightning_logs(tmp_path, monkeypatch, capfd):
    # The user's own config: no logger (Lightning's default), no ModelCheckpoint (Lightning's default one).
    config = yaml.safe_load(recipe_path("quickstart").read_text())
    trainer = config["trainer"]
    del trainer["logger"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    code, lines = _fit(capfd, *STOP_AT, "3", config="own.yaml")
    assert code == 130
    saved = Path("lightning_logs") / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert saved.is_file(), lines
    code, lines = _fit(capfd, config="own.yaml")
    assert code == 0 and lines[0].startswith(f"lightning-gd: resuming from {saved} (step 3 of 8)"), lines
    assert sorted(p.name for p in Path("lightning_logs").iterdir()) == ["version_0"]


def test_a_start_error_is_printed_by_rank_zero_only(tmp_path, monkeypatch, capfd):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\0" * 10)
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as in rank 1 of a torchrun job
    code, lines = _fit(capfd, "--ckpt_path", str(bad))
    assert code == 2 and lines == []
