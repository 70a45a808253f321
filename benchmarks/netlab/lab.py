"""Two network namespaces joined by a rate-limited veth pair, and a 2-rank job run across them.

Layout (``prefix`` defaults to ``lgdnl``)::

    netns <prefix>0                              netns <prefix>1
      <prefix>a 10.213.0.1/30  <==== veth ====>  <prefix>b 10.213.0.2/30
      egress: tbf rate R                           egress: tbf rate R

Rank 0 runs in ``<prefix>0`` (``MASTER_ADDR=10.213.0.1``), rank 1 in ``<prefix>1``, each through
``ip netns exec``. The /30 exists only inside the two namespaces, so no traffic leaves them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks._harness import rank_env

__all__ = ["NetLab", "NetLabError", "RankResult", "probe_netns", "parse_rate"]

_RATE_SCRIPT = Path(__file__).with_name("_rate.py")
ADDR0, ADDR1, PREFIXLEN = "10.213.0.1", "10.213.0.2", 30


class NetLabError(RuntimeError):
    """The lab cannot be built or a job in it failed (the message says which and why)."""


def parse_rate(rate: str | float) -> float:
    """Bits per second from ``"100mbit"``, ``"1gbit"``, ``"10gbit"``, ``"500kbit"`` or a number (bit/s)."""
    if isinstance(rate, int | float):
        return float(rate)
    text = rate.strip().lower()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * mult
    return float(text)


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetLabError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _existing_netns() -> set[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def check_prerequisites() -> None:
    """Raise :class:`NetLabError` unless running as root with ``ip`` and ``tc`` on the PATH."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetLabError(f"netlab needs the `ip` and `tc` tools (iproute2); not found: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise NetLabError("netlab needs root (network namespaces, veth pairs and qdiscs); run it as root")


def probe_netns(name: str = "lgdnlprobe") -> tuple[bool, str]:
    """Whether a network namespace can really be created here: ``(ok, reason)``; removes the probe namespace."""
    try:
        check_prerequisites()
    except NetLabError as err:
        return False, str(err)
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return False, f"`ip netns add` failed: {proc.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return True, ""


@dataclass
class RankResult:
    """Exit status and output of one rank."""

    rank: int
    returncode: int | None
    stdout: str
    stderr: str


@dataclass
class NetLab:
    """Context manager: builds the namespaces and the shaped link on enter, removes everything on exit.

    Teardown runs on normal exit, on an exception, on SIGINT/SIGTERM (turned into exceptions while the lab is
    open) and at interpreter exit (``atexit``). It is idempotent and only removes what this object created.

    Args:
        rate: Link rate per direction (``"1gbit"``, ``"100mbit"`` or bit/s), a tbf on each veth end's egress.
        latency_ms: tbf ``latency``: the longest a packet may wait in the shaper's queue (not a delay).
        delay_ms: Fixed one-way delay per end, through ``netem`` if the kernel has it; without netem the lab
            warns and runs without added delay (``delay_applied`` says which).
        prefix: Namespace / interface name prefix (at most 12 characters).

    Example::

        with NetLab("100mbit") as lab:
            print(lab.measure_rate())
            lab.run_ranks([sys.executable, "train.py"], timeout=600)
    """

    rate: str | float = "1gbit"
    latency_ms: float = 50.0
    delay_ms: float = 0.0
    prefix: str = "lgdnl"
    verbose: bool = True
    delay_applied: bool = field(default=False, init=False)
    _created: list[str] = field(default_factory=list, init=False, repr=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)
    _old_handlers: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rate_bps = parse_rate(self.rate)
        if self.rate_bps <= 0:
            raise NetLabError(f"rate must be positive, got {self.rate!r}")
        if not self.prefix.isalnum() or len(self.prefix) > 12:
            raise NetLabError(f"prefix must be alphanumeric and at most 12 characters, got {self.prefix!r}")
        self.ns = (f"{self.prefix}0", f"{self.prefix}1")
        self.ifaces = (f"{self.prefix}a", f"{self.prefix}b")
        self.addrs = (ADDR0, ADDR1)

    # ------------------------------------------------------------------ setup / teardown
    def __enter__(self) -> NetLab:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create the namespaces, the veth pair, addresses and the tbf shapers (and netem delay if asked)."""
        check_prerequisites()
        taken = _existing_netns() & set(self.ns)
        if taken:  # never touch a namespace we did not create
            raise NetLabError(
                f"network namespace(s) {', '.join(sorted(taken))} already exist; remove them (`ip netns del NAME`)"
                " or pick another prefix"
            )
        atexit.register(self.teardown)
        self._install_signal_handlers()
        try:
            for ns in self.ns:
                _run(["ip", "netns", "add", ns])
                self._created.append(ns)
            a, b = self.ifaces
            # Both ends are created directly inside their namespaces: nothing appears in the root namespace.
            _run(["ip", "link", "add", a, "netns", self.ns[0], "type", "veth", "peer", "name", b, "netns", self.ns[1]])
            for ns, iface, addr in zip(self.ns, self.ifaces, self.addrs, strict=True):
                self._ns(ns, "ip", "addr", "add", f"{addr}/{PREFIXLEN}", "dev", iface)
                self._ns(ns, "ip", "link", "set", iface, "up")
                self._ns(ns, "ip", "link", "set", "lo", "up")
                self._shape(ns, iface)
        except BaseException:
            self.teardown()
            raise
        self._log(
            f"netlab: {self.ns[0]}:{self.ifaces[0]} {ADDR0} <-> {self.ns[1]}:{self.ifaces[1]} {ADDR1}, tbf "
            f"{self.rate_bps / 1e6:g} Mbit/s, latency {self.latency_ms:g} ms"
            + (f", delay {self.delay_ms:g} ms" if self.delay_applied else "")
        )

    def _shape(self, ns: str, iface: str) -> None:
        # tbf needs a bucket of at least rate/HZ bytes or it cannot reach its rate: 2 ms of traffic, >= 64 KiB.
        burst = max(64 * 1024, int(self.rate_bps / 8 * 0.002))
        tbf = ["tbf", "rate", f"{int(self.rate_bps)}bit", "burst", str(burst), "latency", f"{self.latency_ms:g}ms"]
        parent = ["root"]
        if self.delay_ms > 0:
            netem = ["tc", "qdisc", "add", "dev", iface, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms}ms"]
            proc = _run(["ip", "netns", "exec", ns, *netem], check=False)
            if proc.returncode == 0:
                self.delay_applied = True
                parent = ["parent", "1:1", "handle", "10:"]
            else:
                self._log(f"netlab: WARNING: no fixed-delay qdisc (netem) in this kernel ({proc.stderr.strip()});"
                          " running without added delay")  # fmt: skip
        self._ns(ns, "tc", "qdisc", "add", "dev", iface, *parent, *tbf)

    def teardown(self) -> None:
        """Stop every rank still running and delete the namespaces (which removes the veth pair and qdiscs)."""
        self._stop_procs()
        while self._created:
            ns = self._created.pop()
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                print(f"netlab: could not delete netns {ns}: {proc.stderr.strip()}", file=sys.stderr)
        self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            # An exception unwinds through the `with` block / finally, which runs the teardown.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: atexit and the context manager still tear down
            pass

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _stop_procs(self, grace: float = 3.0) -> None:
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self._procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self._procs.clear()

    # ------------------------------------------------------------------ running things in the namespaces
    def _ns(self, ns: str, *cmd: str) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *cmd])

    def _spawn(self, ns: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        # Own session per rank: killpg stops the rank and anything it started.
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], env=dict(env or os.environ), start_new_session=True, **kw
        )
        self._procs.append(p)
        return p

    def measure_rate(self, seconds: float = 1.0, port: int = 29400) -> float:
        """Time a TCP transfer from namespace 0 to namespace 1 (Python sockets); returns and prints Mbit/s.

        About ``seconds`` worth of data at the set rate (2 MB to 400 MB); the receiver times first to last byte.
        """
        if not self._created:
            raise NetLabError("the lab is not set up")
        nbytes = int(min(400e6, max(2e6, self.rate_bps / 8 * seconds)))
        py = [sys.executable, str(_RATE_SCRIPT)]
        sink = self._spawn(self.ns[1], [*py, "sink", ADDR1, str(port)], stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None
            if sink.stdout.readline().strip() != "ready":
                raise NetLabError("rate sink did not start")
            src = self._spawn(self.ns[0], [*py, "source", ADDR1, str(port), str(nbytes)])
            if src.wait(timeout=120) != 0:
                raise NetLabError("rate source failed")
            out, _ = sink.communicate(timeout=60)
            got, secs = (float(x) for x in out.split())
        finally:
            self._stop_procs()
        if got != nbytes:
            raise NetLabError(f"rate probe received {got:.0f} of {nbytes} bytes")
        mbit = got * 8 / secs / 1e6
        self._log(f"netlab: measured link rate {mbit:.1f} Mbit/s (set {self.rate_bps / 1e6:g}; {got / 1e6:.1f} MB in "
                  f"{secs:.2f} s)")  # fmt: skip
        return mbit

    def run_ranks(
        self,
        cmd: Sequence[str],
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
        port: int = 29500,
        capture: bool = False,
    ) -> list[RankResult]:
        """Run ``cmd`` as rank 0 in namespace 0 and rank 1 in namespace 1, with a multi-node DDP environment.

        Each rank gets ``MASTER_ADDR`` (namespace 0's veth address), ``MASTER_PORT``, ``WORLD_SIZE=2``,
        ``NODE_RANK``, ``LOCAL_RANK=0``, ``GLOBAL_RANK`` / ``RANK`` and ``GLOO_SOCKET_IFNAME`` (its veth): Lightning's
        ``LightningEnvironment`` treats this as an external 2-node launch (``Trainer(num_nodes=2, devices=1)``).

        Raises:
            NetLabError: if a rank exits non-zero (the other is stopped at once) or the job exceeds ``timeout``
                (both are stopped); the message carries the exit codes.
        """
        if not self._created:
            raise NetLabError("the lab is not set up")
        procs = []
        for rank in range(2):
            env_r = rank_env(rank, 2, port, addr=ADDR0, one_rank_per_node=True, base=env)
            env_r["GLOO_SOCKET_IFNAME"] = self.ifaces[rank]
            kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} if capture else {}
            procs.append(self._spawn(self.ns[rank], cmd, env=env_r, **kw))
        deadline = time.monotonic() + timeout
        failed: str | None = None
        try:
            while True:
                codes = [p.poll() for p in procs]
                if all(c == 0 for c in codes):
                    break
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = ", ".join(f"rank {r} exited with {c}" for r, c in bad)
                    break
                if time.monotonic() > deadline:
                    failed = f"timeout after {timeout:g} s (exit codes so far: {codes})"
                    break
                time.sleep(0.05)
        finally:
            # Reading the pipes first would block on a hung rank: stop it, then collect what it wrote.
            if failed is not None:
                self._stop_procs()
        results = []
        for rank, p in enumerate(procs):
            out, err = p.communicate() if capture else ("", "")
            results.append(RankResult(rank, p.returncode, out or "", err or ""))
        self._procs = [p for p in self._procs if p not in procs]
        if failed is not None:
            tails = "".join(f"\n--- rank {r.rank} stderr (tail) ---\n{r.stderr[-2000:]}" for r in results if r.stderr)
            raise NetLabError(f"netlab job failed: {failed}; the other rank was stopped{tails}")
        return results

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)
