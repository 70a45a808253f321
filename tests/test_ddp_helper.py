"""The DDP job runner of tests/helpers/ddp.py: a networking failure of the machine is retried once, nothing else."""

import pytest

from tests.helpers.ddp import run_ddp_script

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
