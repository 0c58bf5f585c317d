#!/usr/bin/env python3
"""
A constant-rate HTTP/1.1 load generator (wrk2-style): C{--rate} GET
requests a second for C{-d} seconds over up to C{-c} keep-alive
connections.  Each request's latency is counted from the moment it was
due, not from when a connection became free, so a stall shows up in the
percentiles instead of lowering the rate (no coordinated omission).
Prints one JSON object: requests, elapsed_s, req_per_s, non_2xx,
socket_errors and latency percentiles (ms), the shape proxy_cpu.py reads
from wrk.

    python3 bench/rateload.py http://127.0.0.1:8080/ --rate 1000 -d 30 -c 50

It is one Python process (asyncio): at 1,000 req/s it is far from its
limit, and its own overhead is the same for every target, so compare
percentiles with a direct row of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


class Client:
    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port = host, port
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "User-Agent: rateload\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise ValueError("chunked responses are not supported")
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(url: str, rate: float, duration: float, connections: int) -> dict:
    u = urlsplit(url)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    idle: asyncio.Queue[Client] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Client(u.hostname or "127.0.0.1", u.port or 80, path))
    latencies: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0}
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        client = await idle.get()
        try:
            status = await asyncio.wait_for(client.get(), 5)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            counts["socket_errors"] += 1
            client.close()
        else:
            latencies.append(time.monotonic() - due)
            if not 200 <= status < 400:
                counts["non_2xx"] += 1
        finally:
            idle.put_nowait(client)

    interval = 1.0 / rate
    start = time.monotonic()
    total = int(rate * duration)
    for i in range(total):
        due = start + i * interval
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.ensure_future(one(due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    elapsed = time.monotonic() - start
    while not idle.empty():
        idle.get_nowait().close()
    ms = [x * 1000 for x in latencies]
    res = {"requests": len(ms), "elapsed_s": elapsed, "req_per_s": len(ms) / elapsed,
           "non_2xx": counts["non_2xx"], "socket_errors": counts["socket_errors"],
           "scheduled": total}
    if ms:
        res["latency_avg_ms"] = sum(ms) / len(ms)
        res["latency_max_ms"] = max(ms)
        for p in (50, 75, 90, 99, 99.9):
            res[f"latency_p{p:g}_ms".replace(".", "_")] = percentile(ms, p)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=1000, help="requests per second")
    ap.add_argument("-d", "--duration", type=float, default=30.0)
    ap.add_argument("-c", "--connections", type=int, default=50)
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.url, args.rate, args.duration, args.connections))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
