"""CLI: ``python -m benchmarks.netlab --rate 100mbit [--latency-ms 50] [--delay-ms 0] [-- CMD ...]``.

Builds the lab, prints the measured link rate, runs CMD (default: the tiny Lightning DDP job) as rank 0 and rank
1 in the two namespaces, and tears everything down. Exit status: 0 on success, 1 if the job failed, 2 if the lab
could not be built.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.netlab.lab import NetLab, NetLabError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the job in the lab, return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netlab", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", default="1gbit", help="link rate per direction: 10gbit, 1gbit, 100mbit, ...")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="tbf queue limit, in ms of traffic")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="fixed one-way delay (needs netem)")
    parser.add_argument("--prefix", default="lgdnl", help="namespace/interface name prefix")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before both ranks are stopped")
    parser.add_argument("--no-measure", action="store_true", help="skip the TCP rate probe")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command run by both ranks")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        with NetLab(args.rate, args.latency_ms, args.delay_ms, args.prefix) as lab, tempfile.TemporaryDirectory() as d:
            if not args.no_measure:
                lab.measure_rate()
            if not cmd:
                cmd = [sys.executable, str(Path(__file__).with_name("tiny_job.py")), "--out", d]
            try:
                lab.run_ranks(cmd, timeout=args.timeout)
            except NetLabError as err:
                print(err, file=sys.stderr)
                return 1
            print("netlab: both ranks finished")
    except NetLabError as err:
        print(f"netlab: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the lab is already torn down by now
        print("netlab: interrupted; namespaces removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
