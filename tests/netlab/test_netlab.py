"""benchmarks/netlab: real namespaces, a real tbf-shaped veth link, a real 2-rank Lightning DDP job across it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is not an installed package

from benchmarks.netlab import NetLab, NetLabError, probe_netns  # noqa: E402
from tests.helpers.timeouts import scaled_timeout  # noqa: E402

_OK, _WHY = probe_netns("lgdtprobe")
pytestmark = pytest.mark.skipif(not _OK, reason=f"cannot create network namespaces here: {_WHY}")

TINY_JOB = ROOT / "benchmarks" / "netlab" / "tiny_job.py"


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_ddp_job_across_shaped_link(tmp_path: Path) -> None:
    """Both ranks of a Lightning DDP job finish across a 100 Mbit/s link, which measures close to 100 Mbit/s."""
    with NetLab("100mbit", prefix="lgdt") as lab:
        assert set(lab.ns) <= _netns()
        mbit = lab.measure_rate(seconds=0.5, port=29411)
        # tbf lets one burst through at line rate; TCP start-up costs a little: within a factor, not exact.
        assert 50 < mbit < 130, mbit
        job = [sys.executable, str(TINY_JOB), "--out", str(tmp_path), "--steps", "3"]
        lab.run_ranks(job, timeout=scaled_timeout(120), port=29511)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["steps"] == 3 for r in results)
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)  # DDP kept them in sync
    assert not {"lgdt0", "lgdt1"} & _netns()


def test_crashing_rank_stops_the_other_and_cleans_up(tmp_path: Path) -> None:
    """Rank 1 raises; rank 0 (blocked waiting for it) is stopped within the timeout; namespaces are removed."""
    sleeper = [sys.executable, "-c", "import os, sys, time; r = os.environ['RANK']; time.sleep(60); sys.exit(int(r))"]
    crash = [
        sys.executable,
        "-c",
        "import os, sys, time; r = int(os.environ['RANK']); r or time.sleep(60); sys.exit(r)",
    ]
    with pytest.raises(NetLabError, match="rank 1 exited with 1"), NetLab("1gbit", prefix="lgdt", verbose=False) as lab:
        lab.run_ranks(crash, timeout=min(50.0, scaled_timeout(20)))  # below rank 0's 60 s sleep
    assert not {"lgdt0", "lgdt1"} & _netns()
    with pytest.raises(NetLabError, match="timeout after 1"), NetLab("1gbit", prefix="lgdt", verbose=False) as lab:
        lab.run_ranks(sleeper, timeout=1)
    assert not {"lgdt0", "lgdt1"} & _netns()


def test_existing_namespace_is_refused_and_left_alone() -> None:
    """A name clash fails before anything is created, and the pre-existing namespace survives."""
    subprocess.run(["ip", "netns", "add", "lgdt1"], check=True)
    try:
        with pytest.raises(NetLabError, match="lgdt1 already exist"), NetLab("1gbit", prefix="lgdt"):
            pass
        assert "lgdt1" in _netns() and "lgdt0" not in _netns()
    finally:
        subprocess.run(["ip", "netns", "del", "lgdt1"], check=True)


def test_missing_tools_refused() -> None:
    """Without `ip`/`tc` on the PATH the CLI refuses with a clear message and exit status 2, creating nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.netlab", "--prefix", "lgdt"],
        cwd=ROOT, env={"PATH": "/nonexistent"}, capture_output=True, text=True, timeout=scaled_timeout(60),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "needs the `ip` and `tc` tools" in proc.stderr
    assert not {"lgdt0", "lgdt1"} & _netns()
