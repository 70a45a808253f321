"""AtomicCheckpointIO: a save replaces the checkpoint in one step or not at all (even under SIGKILL); a damaged
checkpoint fails with one line naming the file and the reason; probe_checkpoint reads the step cheaply."""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lightning_gd.plugins.checkpoint_io import AtomicCheckpointIO, CheckpointLoadError, is_temporary, probe_checkpoint
from tests.helpers.ddp import REPO_ROOT
from tests.helpers.timeouts import scaled_timeout


def _good(step: int = 3) -> dict:
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.arange(1000.0)}}


class _FailsHalfway:
    """Pickling fails after torch.save has started writing the file."""

    def __reduce__(self):
        raise pickle.PicklingError("stop here")


def test_a_failed_save_keeps_the_previous_checkpoint_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint(_good(3), path)
    before = path.read_bytes()
    with pytest.raises(pickle.PicklingError):
        io.save_checkpoint({**_good(4), "bad": _FailsHalfway()}, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left
    assert io.load_checkpoint(path)["global_step"] == 3


def test_a_killed_save_keeps_the_previous_checkpoint_and_the_next_save_clears_its_leftover(tmp_path):
    # A real SIGKILL while torch.save is writing (blocked inside the pickling of the checkpoint).
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_good(3), path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import time, torch
        from lightning_gd.plugins.checkpoint_io import AtomicCheckpointIO

        class Slow:
            def __reduce__(self):
                open({str(tmp_path / "writing")!r}, "w").close()
                time.sleep(600)

        AtomicCheckpointIO().save_checkpoint({{"global_step": 9, "big": torch.zeros(10_000_000), "slow": Slow()}},
                                             {str(path)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + scaled_timeout(120)
    while not (tmp_path / "writing").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the saving process did not start writing"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=scaled_timeout(30))
    leftovers = [p for p in os.listdir(tmp_path) if is_temporary(p)]
    assert len(leftovers) == 1  # the unfinished file of the killed save
    assert path.read_bytes() == before  # the previous checkpoint is whole
    assert probe_checkpoint(path).global_step == 3
    AtomicCheckpointIO().save_checkpoint(_good(4), path)  # the next save of that file removes the dead one's leftover
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "writing"]
    assert probe_checkpoint(path).global_step == 4


def test_a_damaged_checkpoint_fails_with_one_line_naming_the_file_and_reason(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_good(), path)
    path.write_bytes(path.read_bytes()[:2000])  # truncated, as by a copy that stopped
    with pytest.raises(CheckpointLoadError) as info:
        io.load_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint {path} cannot be loaded: the file is truncated or is not a checkpoint"
        " (torch: failed finding central directory)"
    )
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointLoadError, match="truncated"):
        probe_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")


def test_a_checkpoint_that_reads_keeps_its_own_load_error(tmp_path):
    # Not damage: a weights_only load refusing an object. The original error stays (not "cannot be loaded").
    io, path = AtomicCheckpointIO(), tmp_path / "obj.ckpt"
    io.save_checkpoint({**_good(), "obj": datetime.date(2026, 12, 2)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        io.load_checkpoint(path, weights_only=True)
    assert io.load_checkpoint(path, weights_only=False)["global_step"] == 3


def test_probe_reads_step_epochs_and_recipe(tmp_path):
    path = tmp_path / "x.ckpt"
    loops = {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}}
    torch.save({**_good(7), "loops": loops, "callbacks": {"RecipeTag": {"recipe": "quickstart"}}}, path)
    info = probe_checkpoint(path)
    assert (info.global_step, info.epochs_completed, info.recipe) == (7, 2, "quickstart")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointLoadError, match="not a Lightning checkpoint"):
        probe_checkpoint(path)


def test_probe_of_checkpoint_directories_needs_their_completion_marker(tmp_path):
    deepspeed = tmp_path / "ds.ckpt"
    (deepspeed / "checkpoint").mkdir(parents=True)
    torch.save(_good(5), deepspeed / "checkpoint" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointLoadError, match="DeepSpeed checkpoint directory is incomplete"):
        probe_checkpoint(deepspeed)
    (deepspeed / "latest").write_text("checkpoint")
    assert probe_checkpoint(deepspeed).global_step == 5
    fsdp = tmp_path / "fsdp.ckpt"
    fsdp.mkdir()
    torch.save(_good(6), fsdp / "meta.pt")
    with pytest.raises(CheckpointLoadError, match="sharded checkpoint directory is incomplete"):
        probe_checkpoint(fsdp)
    (fsdp / ".metadata").write_bytes(b"")
    assert probe_checkpoint(fsdp).global_step == 6
