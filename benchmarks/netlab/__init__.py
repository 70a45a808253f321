"""netlab: a 2-rank Lightning DDP job across two network namespaces joined by a rate-limited veth link.

See :class:`~benchmarks.netlab.lab.NetLab` and ``python -m benchmarks.netlab --help``.
"""

from benchmarks.netlab.lab import NetLab, NetLabError, RankResult, parse_rate, probe_netns

__all__ = ["NetLab", "NetLabError", "RankResult", "parse_rate", "probe_netns"]
