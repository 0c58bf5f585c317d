#!/usr/bin/env python3
"""
A constant-rate HTTP/1.1 load generator (wrk2-style): C{--rate} GET
requests a second for C{-d} seconds over C{-c} keep-alive connections.
Request i is due at start + i / rate; each latency is counted from the
moment its request was due, not from when it was sent, so a stall (a
slow server, or no free connection) shows up in the percentiles instead
of lowering the rate (no coordinated omission).  Prints one JSON object:
requests, elapsed_s, req_per_s, non_2xx, socket_errors, latency
percentiles (ms), the shape proxy_cpu.py reads from wrk, plus the
generator's own lateness and CPU (C{generator_cpu_util}).  Lateness is
reported three ways: C{send_lag_p99_ms}, how long after its due time a
request had gone out (C{send} returned); C{send_late_p99_ms}, how long
after its due time the generator began to send it (its own timing:
waking up, handling responses); C{send_call_p99_ms}, how long the
C{send} call itself took (the kernel's loopback path, which on a VM
includes waking the receiver's CPU), and C{send_late_over_1ms}, how many
requests began to go out more than a millisecond late.

    python3 bench/rateload.py http://127.0.0.1:8080/ --rate 1000 -d 30 -c 50
    python3 bench/rateload.py https://localhost:8443/ ...   # TLS, certificate not checked

It is kept cheap so that it is far from saturated at 1,000 req/s (10-20 %
of a core, its early wake-ups included): raw non-blocking sockets, one pre-built request, a
minimal response parser (status line and Content-Length; chunked
responses count as errors), and C{select} with microsecond timeouts
(epoll's are whole milliseconds) for sending on time, waking up
C{--spin-us} (100) microseconds early and polling until the due time.  Compare
percentiles with a direct row of the same run all the same.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import select
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

#: a request still unanswered this long after it was sent counts as a socket error
TIMEOUT = 5.0
#: microseconds before each due time the generator stops sleeping and polls
#: instead (yielding the CPU to any process of its own real-time priority,
#: e.g. the upstream): a wake-up from sleep comes tens of microseconds late
#: on a VM, which every latency would include
SPIN_US = 100.0


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


class Connection:
    """
    One keep-alive connection: at most one request in flight (C{due} is
    its due time, None when idle), the bytes of its response so far.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.sock: socket.socket | None = None
        self.due: float | None = None
        self.sent = 0.0
        self.buffer = b""

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.due = None

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def read(self) -> int | None:
        """
        Read what has arrived; the status once the response is complete,
        else None.

        @raise OSError: the connection failed or closed.
        @raise ValueError: a response this parser does not handle.
        """
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not data:
                raise ConnectionResetError("closed by the server")
            self.buffer += data
            if self.tls is None or not self.sock.pending():  # type: ignore[attr-defined]
                break
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:stop if stop >= 0 else len(head)])
        elif b"\r\ntransfer-encoding:" in head:
            raise ValueError("chunked responses are not supported")
        if len(self.buffer) < end + 4 + length:
            return None
        if len(self.buffer) > end + 4 + length:
            raise ValueError("more bytes than one response")
        status = int(self.buffer[9:12])
        self.buffer = b""
        return status


def _fine_timers() -> None:
    # the kernel may otherwise fire a timer up to 50 us late (timer slack)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def run(url: str, rate: float, duration: float, connections: int, spin: float = 0.0) -> dict:
    u = urlsplit(url)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    tls = None
    if u.scheme == "https":
        # keep-alive HTTPS like wrk's -tls rows; the bench's certificate is self-signed
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if tls else 80)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "User-Agent: rateload\r\n\r\n").encode()
    _fine_timers()
    conns = [Connection(host, port, tls) for _ in range(connections)]
    for conn in conns:
        conn.open()
    idle = collections.deque(conns)
    inflight: dict[int, Connection] = {}
    waiting: collections.deque[float] = collections.deque()  # due, no free connection
    latencies: list[float] = []
    lags: list[float] = []
    lates: list[float] = []
    calls: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0}
    clock = time.monotonic
    interval = 1.0 / rate
    total = int(rate * duration)
    cpu0 = os.times()
    start = clock()
    i = 0

    def failed(conn: Connection) -> None:
        counts["socket_errors"] += 1
        inflight.pop(conn.fileno(), None)
        conn.close()
        try:
            conn.open()
        except OSError:
            counts["socket_errors"] += 1
            return
        idle.append(conn)

    while True:
        now = clock()
        while i < total and start + i * interval <= now:
            waiting.append(start + i * interval)
            i += 1
        while waiting and idle:
            conn = idle.popleft()
            due = waiting.popleft()
            conn.due = due
            inflight[conn.fileno()] = conn
            before = clock()
            try:
                conn.sock.send(request)  # type: ignore[union-attr]
            except OSError:
                failed(conn)
                continue
            conn.sent = clock()
            lags.append(conn.sent - due)
            lates.append(before - due)
            calls.append(conn.sent - before)
        if i >= total and not inflight and not waiting:
            break
        now = clock()
        if i < total:
            wait = max(0.0, start + i * interval - now)
            if spin:
                # wake up C{spin} early and poll (yielding to any other
                # process of the same real-time priority) until it is due
                if wait > spin:
                    wait -= spin
                else:
                    wait = 0.0
                    os.sched_yield()
        else:
            wait = 0.05
        if inflight:
            ready, _, _ = select.select(list(inflight.values()), [], [], wait)
        else:
            ready = []
            if wait > 0:
                time.sleep(wait)
        for conn in ready:
            try:
                status = conn.read()
            except (OSError, ValueError):
                failed(conn)
                continue
            if status is None:
                continue
            assert conn.due is not None
            latencies.append(clock() - conn.due)
            if not 200 <= status < 400:
                counts["non_2xx"] += 1
            del inflight[conn.fileno()]
            conn.due = None
            idle.append(conn)
        if inflight:
            now = clock()
            for conn in [c for c in inflight.values() if now - c.sent > TIMEOUT]:
                failed(conn)
        if i >= total and clock() - start > duration + 10:
            for conn in list(inflight.values()):
                failed(conn)
            waiting.clear()
    elapsed = clock() - start
    cpu1 = os.times()
    for conn in conns:
        conn.close()
    ms = [x * 1000 for x in latencies]
    res = {"requests": len(ms), "elapsed_s": elapsed, "req_per_s": len(ms) / elapsed,
           "non_2xx": counts["non_2xx"], "socket_errors": counts["socket_errors"],
           "scheduled": total,
           "generator_cpu_util": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system)
                                       / elapsed, 3)}
    if lags:
        res["send_lag_p99_ms"] = percentile([x * 1000 for x in lags], 99)
        res["send_late_p99_ms"] = percentile([x * 1000 for x in lates], 99)
        res["send_call_p99_ms"] = percentile([x * 1000 for x in calls], 99)
        res["send_late_over_1ms"] = sum(1 for x in lates if x > 0.001)
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
    ap.add_argument("--spin-us", type=float, default=SPIN_US,
                    help="wake up this many microseconds before each due time and poll "
                         "until it (0: sleep until it)")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.url, args.rate, args.duration, args.connections,
                         args.spin_us / 1e6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
