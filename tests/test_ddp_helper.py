"""The DDP job runner of tests/helpers/ddp.py: a real 2-process job trains in sync; a networking failure of the
machine is retried once, nothing else."""

import time

import pytest

from tests.helpers.ddp import _with_teardown, run_ddp_script

_FLAKY = """
from pathlib import Path
from tests.helpers.ddp import write_result

attempts = Path("attempts")
attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
if len(attempts.read_text()) == 1:
    raise RuntimeError("{error}")
write_result({{"rank": 0}}, 0)
write_result({{"rank": 1}}, 1)
"""


def test_a_port_taken_between_choosing_and_binding_it_is_retried_once(tmp_path):
    results = run_ddp_script(_FLAKY.format(error="Address already in use"), tmp_path)
    assert results == [{"rank": 0}, {"rank": 1}] and (tmp_path / "attempts").read_text() == "xx"


def test_any_other_failure_fails_at_once(tmp_path):
    with pytest.raises(AssertionError, match="weights differ"):
        run_ddp_script(_FLAKY.format(error="weights differ"), tmp_path)
    assert (tmp_path / "attempts").read_text() == "x"  # not run again


def test_every_job_destroys_its_process_group_at_exit(tmp_path):
    # Left to the interpreter's finalisation, gloo's worker threads now and then abort a job that passed (exit -6).
    run_ddp_script(
        """
        from __future__ import annotations  # stays first: the teardown goes after it
        from pathlib import Path
        import torch.distributed as dist
        from tests.helpers.ddp import free_port, write_result

        destroy = dist.destroy_process_group
        dist.destroy_process_group = lambda: (Path("destroyed").write_text("yes"), destroy())
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        write_result({}, 0)
        write_result({}, 1)
        """,
        tmp_path,
    )
    assert (tmp_path / "destroyed").read_text() == "yes"
    assert _with_teardown("x = 1\n").startswith("import atexit")


_ONE_RANK_FAILS = """
import os
import time

if os.environ["LOCAL_RANK"] == "1":
    raise RuntimeError("rank 1 failed")
time.sleep(600)  # rank 0: as if waiting in a collective for rank 1
"""


def test_a_failed_rank_stops_the_others_under_an_external_launcher(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_ddp_script(_ONE_RANK_FAILS, tmp_path, launcher="external")
    assert time.monotonic() - start < 120  # rank 0 stopped, not left to the job's timeout


@pytest.mark.parametrize("launcher", ["lightning", "external"])
def test_two_process_cpu_ddp_job_trains_in_sync(tmp_path, launcher):
    results = run_ddp_script(
        """
        import torch
        from lightning.pytorch import Trainer, seed_everything
        from tests.helpers.ddp import write_result
        from tests.helpers.models import TinyClassifier, classification_loader

        seed_everything(0)
        model = TinyClassifier()
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, classification_loader())
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        write_result({"world_size": trainer.world_size, "rank": trainer.global_rank,
                      "weights": flat.tolist(), "step": trainer.global_step}, trainer.global_rank)
        """,
        tmp_path,
        launcher=launcher,
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in results)
    assert results[0]["weights"] == results[1]["weights"]  # DDP kept the replicas identical
