"""A torchrun restart resumes by itself: rank 1 of a 2-process run SIGKILLed after step 3, torchrun starts both
workers again, and they continue from the run's last checkpoint to the end (benchmarks/preemption_torchrun.py runs
the 5 random kills and the bit-identical comparison against an uninterrupted run)."""

import torch

from lightning_gd.plugins.checkpoint_io import probe_checkpoint
from tests.helpers.timeouts import scaled_timeout
from tests.helpers.torchrun import LAST_CKPT, torchrun_fit


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_resumes_to_the_end(tmp_path):
    result = torchrun_fit(tmp_path / "job", steps=8, kill_after=3, timeout=scaled_timeout(240))
    assert result.exit == 0, result.log[-4000:]
    assert result.killed_after_step is not None and result.killed_after_step >= 3
    assert len(result.resumed_from) == 1, result.resumed_from  # rank zero says it once
    assert result.resumed_from[0].startswith("runs/quickstart/version_0/checkpoints/last.ckpt (step ")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in result.log  # no shared-store warning with the fresh store
    last = tmp_path / "job" / LAST_CKPT
    assert probe_checkpoint(last).global_step == 8
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["TextCorpusDataModule"]["world_size"] == 2


def test_the_command_warns_when_torchrun_would_restart_on_its_shared_store():
    from lightning_gd._lightning_cli import _torchrun_restarts_share_the_store

    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert _torchrun_restarts_share_the_store(shared)
    assert not _torchrun_restarts_share_the_store({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"})  # fresh store
    assert not _torchrun_restarts_share_the_store({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"})  # no restarts
    assert not _torchrun_restarts_share_the_store({})  # not under torchrun
