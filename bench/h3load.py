#!/usr/bin/env python3
"""
A small HTTP/3 load generator (aioquic, through mproxy's own
L{mproxy.testing.H3Client} on Twisted): C{-c} QUIC connections, each keeping
C{-m} requests in flight, for C{-d} seconds.  Prints one JSON object:
requests, elapsed_s, req_per_s, non_2xx, socket_errors and latency
percentiles (ms), the shape proxy_cpu.py reads from wrk.

    python3 bench/h3load.py https://localhost:8443/ -c 10 -m 5 -d 10

It is Python: a single process tops out far below a proxy written in C or
Go, so in proxy_cpu.py's HTTP/3 rows the load side (CPU 1) is usually the
bottleneck; the proxy's CPU per request is still its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("-c", "--connections", type=int, default=10)
    ap.add_argument("-m", "--streams", type=int, default=5,
                    help="requests in flight per connection")
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("--address", default="127.0.0.1", help="where to send (default: %(default)s)")
    args = ap.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, inlineCallbacks

    from mproxy.testing import H3Client

    u = urlsplit(args.url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    stats = {"requests": 0, "non_2xx": 0, "socket_errors": 0}
    latencies: list[float] = []
    out: dict = {}

    @inlineCallbacks
    def stream(client: H3Client, until: float):
        while time.monotonic() < until and not client.closed:
            t0 = time.monotonic()
            try:
                r = yield client.request("GET", path)
            except Exception:
                stats["socket_errors"] += 1
                return
            latencies.append(time.monotonic() - t0)
            stats["requests"] += 1
            if not 200 <= r.status < 400:
                stats["non_2xx"] += 1

    @inlineCallbacks
    def run():
        try:
            clients = []
            for _ in range(args.connections):
                c = H3Client(reactor, args.address, u.port or 443, server_name=u.hostname)
                yield c.connect()
                clients.append(c)
            start = time.monotonic()
            until = start + args.duration
            yield gatherResults([stream(c, until) for c in clients
                                 for _ in range(args.streams)])
            elapsed = time.monotonic() - start
            for c in clients:
                c.close()
            latencies.sort()
            n = len(latencies)
            out.update(stats, elapsed_s=elapsed, req_per_s=stats["requests"] / elapsed)
            if n:
                out["latency_avg_ms"] = sum(latencies) / n * 1000
                out["latency_max_ms"] = latencies[-1] * 1000
                for p in (50, 75, 90, 99):
                    out[f"latency_p{p}_ms"] = latencies[min(n - 1, n * p // 100)] * 1000
        except Exception as e:
            out["error"] = repr(e)
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(out))
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
