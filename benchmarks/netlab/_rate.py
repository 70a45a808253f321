"""TCP rate probe, run inside a namespace by :meth:`NetLab.measure_rate`.

``_rate.py sink ADDR PORT``: listen, print ``ready``, receive until EOF, print ``<bytes> <seconds>`` (first byte to
last byte). ``_rate.py source ADDR PORT NBYTES``: connect and send NBYTES.
"""

from __future__ import annotations

import socket
import sys
import time

CHUNK = 1 << 20


def sink(addr: str, port: int) -> None:
    """Receive one connection's bytes and report the count and the time from first to last byte."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(CHUNK)
            total, t0, t1 = 0, 0.0, 0.0
            while n := conn.recv_into(buf):
                t1 = time.perf_counter()
                if not total:
                    t0 = t1
                total += n
    print(total, max(t1 - t0, 1e-9), flush=True)


def source(addr: str, port: int, nbytes: int) -> None:
    """Send ``nbytes`` zero bytes to ``addr:port``."""
    data = bytes(CHUNK)
    with socket.create_connection((addr, port), timeout=60) as s:
        left = nbytes
        while left > 0:
            left -= s.send(memoryview(data)[: min(CHUNK, left)])


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(sys.argv[2], int(sys.argv[3]))
    else:
        source(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
