#!/usr/bin/env python3
"""Instructions per HTTP/2 request of the proxy in one process (callgrind).

`inproc_instructions.py` for HTTP/2: the real router, service, load
balancer, proxy site and upstream pool of a source tree, with the tree's
HTTP/2 connection (`mproxy.http.h2.H2Channel`) on a plain loopback socket
(no TLS: its cost is the same in every tree); -c clients with -m streams in
flight each, and a fixed-response HTTP/1.1 upstream, in the same process and
reactor, so that the count does not depend on the machine's load. The
clients send pre-built frames (the first HEADERS block of a connection
puts its fields in the dynamic table, the later ones refer to them, as
h2load's and browsers' do) and read only frame headers, so their share of
the count is small and the same for every tree.

    python3 bench/inproc_h2_instructions.py --mproxy-tree before=/tmp/a --mproxy-tree after=.

Each case runs the process twice under `valgrind --tool=callgrind` (--base and
--base + --requests requests after a 200-request warm-up); the difference
divided by --requests is printed. `--serve N` is the process itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = (b"Hello from the upstream! " * 6)[:127] + b"\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
            % (len(BODY), BODY))
WARMUP = 200
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream_id.to_bytes(4, "big") + payload)


def serve(args) -> None:
    sys.path.insert(0, args.tree)
    from hpack import Encoder
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from mproxy.balancer import LoadBalancer
    from mproxy.http.h2 import H2Channel
    from mproxy.http.proxy import build_http_factory
    from mproxy.http.upstream import PoolRegistry
    from mproxy.logging import JSONLogger
    from mproxy.router import Router
    from mproxy.service import Service
    from mproxy.spec import ServiceOptions, TargetOptions

    class Upstream(Protocol):
        buf = b""

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                _, _, self.buf = self.buf.partition(b"\r\n\r\n")
                self.transport.write(RESPONSE)

    upport = reactor.listenTCP(0, Factory.forProtocol(Upstream), interface="127.0.0.1")
    address = f"127.0.0.1:{upport.getHost().port}"
    pools = PoolRegistry(reactor)
    router = Router()
    lb = LoadBalancer([address], [], reactor, pool_factory=pools)
    lb.mark_all_healthy()
    router.install(Service("default", ServiceOptions(), TargetOptions(), lb, reactor))
    log = open(os.devnull, "w")
    site = build_http_factory(reactor, router, JSONLogger(log), pools=pools)

    class H2Factory(Factory):
        def buildProtocol(self, addr):
            return H2Channel(site, reactor, 75.0)

    port = reactor.listenTCP(0, H2Factory(), interface="127.0.0.1")
    target = port.getHost().port
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
              (b":authority", b"127.0.0.1:%d" % target), (b"user-agent", b"bench"),
              (b"accept", b"*/*")]
    # as h2load and browsers send them: the first request's fields go into
    # the connection's dynamic table, the later ones refer to them
    encoder = Encoder()
    first_block = encoder.encode(fields)
    block = encoder.encode(fields)
    # every window as large as it can be: the clients never send WINDOW_UPDATE
    hello = (PREFACE + frame(0x4, 0, 0, (4).to_bytes(2, "big") + (2**31 - 1).to_bytes(4, "big"))
             + frame(0x8, 0, 0, (2**31 - 1 - 65535).to_bytes(4, "big")))
    state = {"left": 0, "done": 0, "open": 0, "phase": 0}

    class Client(Protocol):
        def connectionMade(self) -> None:
            self.buf = b""
            self.next_id = 1
            self.in_flight = 0
            self.transport.write(hello)
            self.send()

        def send(self) -> None:
            out = []
            while self.in_flight < args.streams and state["left"] > 0:
                state["left"] -= 1
                self.in_flight += 1
                out.append(frame(0x1, 0x5, self.next_id, first_block if self.next_id == 1
                                 else block))
                self.next_id += 2
            if out:
                self.transport.write(b"".join(out))
            elif self.in_flight == 0:
                self.transport.loseConnection()

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data
            i = 0
            ended = 0
            acks = b""
            while len(buf) - i >= 9:
                n = int.from_bytes(buf[i:i + 3], "big")
                if len(buf) - i < 9 + n:
                    break
                kind, flags = buf[i + 3], buf[i + 4]
                if kind in (0x0, 0x1) and flags & 0x1:
                    ended += 1
                elif kind == 0x4 and not flags & 0x1:
                    acks += frame(0x4, 0x1, 0, b"")
                i += 9 + n
            self.buf = buf[i:]
            if acks:
                self.transport.write(acks)
            if ended:
                self.in_flight -= ended
                state["done"] += ended
                self.send()

        def connectionLost(self, reason) -> None:
            state["open"] -= 1
            if state["open"] == 0:
                reactor.callLater(0.05, next_phase)

    def start(n: int) -> None:
        state.update(left=n, done=0, open=args.connections)
        factory = ClientFactory.forProtocol(Client)
        for _ in range(args.connections):
            reactor.connectTCP("127.0.0.1", target, factory)

    def next_phase() -> None:
        if state["phase"] == 0:
            state["phase"] = 1
            start(args.serve)
            return
        if state["done"] != args.serve:
            print(f"only {state['done']} of {args.serve} responses", file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(start, WARMUP)
    reactor.run()


def total_ir(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"totals:\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise SystemExit(f"no instruction total in {path}")


def count(tree: str, n: int, args, tmp: Path) -> int:
    out = tmp / f"callgrind.{os.getpid()}.{n}.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
            str(Path(__file__).resolve()), "--tree", tree, "--serve", str(n),
            "-c", str(args.connections), "-m", str(args.streams)]
    if args.cpu >= 0:
        argv = ["taskset", "-c", str(args.cpu)] + argv
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp,
                       timeout=3600, text=True)
    if r.returncode != 0 or "only " in r.stderr:
        raise SystemExit(f"{tree}: run failed ({r.returncode}): {r.stderr[-2000:]}")
    return total_ir(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--base", type=int, default=200)
    ap.add_argument("--connections", "-c", type=int, default=8)
    ap.add_argument("--streams", "-m", type=int, default=10,
                    help="streams in flight per connection")
    ap.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: no pin)")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args)
        return 0
    trees = dict(s.partition("=")[::2] for s in args.mproxy_tree) or {"here": args.tree}
    with tempfile.TemporaryDirectory(prefix="mproxy-inproc-h2-") as tmp:
        for label, tree in trees.items():
            t0 = time.monotonic()
            a = count(tree, args.base, args, Path(tmp))
            b = count(tree, args.base + args.requests, args, Path(tmp))
            print(f"{label:<12} {(b - a) / args.requests:>12,.0f} instructions per HTTP/2 request"
                  f" ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
