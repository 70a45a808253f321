from pathlib import Path

import pytest

from tests.helpers.ddp import run_ddp_script


@pytest.fixture(scope="session")
def backend_runs(tmp_path_factory):
    """Rank 0's and rank 1's results of ``_backends_job.py``: ``{backend: {case: result}}`` (one 2-process job for
    ``test_deepspeed.py`` and ``test_fsdp.py``)."""
    job = (Path(__file__).parent / "_backends_job.py").read_text()
    return run_ddp_script(job, tmp_path_factory.mktemp("backends"), timeout=900)


def same_on_both_ranks(runs, backend, case):
    """Rank 0's result of ``case`` under ``backend``, after checking that rank 1 ended with the same weights."""
    r0, r1 = runs[0][backend][case], runs[1][backend][case]
    assert r0 == r1 or ("weights" in r0 and r0["weights"] == r1["weights"]), (backend, case)
    return r0
