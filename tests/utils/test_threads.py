"""OpenMP defaults set by the ``lightning-gd`` command before torch starts."""

import os
import subprocess
import sys

import pytest

from lightning_gd.utils.threads import _v1_quota, _v2_quota, set_thread_defaults, usable_cpus
from tests.helpers.timeouts import scaled_timeout

_PROBE = (
    "import os, sys\n"
    "from lightning_gd.cli import main\n"
    "main(['recipes'])\n"
    "print('WAIT', os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
)


def _command_sets(env_update: dict[str, str]) -> str:
    """OMP_WAIT_POLICY after `lightning-gd recipes` ran in a fresh interpreter, and whether torch was imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LIGHTNING_GD_THREAD_DEFAULTS")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**env, **env_update},
        capture_output=True,
        text=True,
        timeout=scaled_timeout(60),
        check=True,
    )
    return next(line for line in proc.stdout.splitlines() if line.startswith("WAIT "))


def test_the_command_sets_passive_waiting_before_torch():
    assert _command_sets({}) == "WAIT PASSIVE False"


def test_the_users_setting_and_the_opt_out_are_kept():
    assert _command_sets({"OMP_WAIT_POLICY": "ACTIVE"}) == "WAIT ACTIVE False"
    assert _command_sets({"LIGHTNING_GD_THREAD_DEFAULTS": "0"}) == "WAIT None False"


def test_nothing_is_set_once_torch_is_imported():
    import torch  # noqa: F401  (this process has it: OpenMP has read its settings)

    env: dict[str, str] = {}
    assert set_thread_defaults(env) == {} and env == {}


def test_cgroup_quotas(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _v2_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _v2_quota(tmp_path) is None
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert _v1_quota(tmp_path) is None
    (tmp_path / "cpu.cfs_quota_us").write_text("400000\n")
    assert _v1_quota(tmp_path) == 4.0
    assert _v2_quota(tmp_path / "missing") is None and _v1_quota(tmp_path / "missing") is None


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
