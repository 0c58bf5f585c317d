#!/usr/bin/env python3
"""Instructions per request of the proxy in one process (callgrind), without workers.

The real router, service, load balancer, proxy site and upstream pool of a
source tree serve GET / on a loopback socket; -c keep-alive clients and a
fixed-response upstream run in the same process and reactor (the worker's
reactor and log stream, where the tree has them), so every
request takes the same steps whatever the machine's load (the
`proxy_instructions.py` count, with its clients in another process, depends
on how many requests one reactor iteration handles). The count includes the
clients' and the upstream's instructions: `--direct` measures those alone
(the clients talk to the upstream), to be subtracted.

    python3 bench/inproc_instructions.py --mproxy-tree before=/tmp/a --mproxy-tree after=.
    python3 bench/inproc_instructions.py --direct

Each case runs the process twice under `valgrind --tool=callgrind` (--base and
--base + --requests requests after a 200-request warm-up); the difference
divided by --requests is printed. `--serve N` is the process itself (no
valgrind), with `--gc` to report the cyclic garbage left per request.
"""

from __future__ import annotations

import argparse
import gc
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


def serve(args) -> None:
    sys.path.insert(0, args.tree)
    try:
        # the worker's own reactor, in trees that have one
        from mproxy.workers.reactor import install
    except ImportError:
        pass
    else:
        install()
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from mproxy.balancer import LoadBalancer
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
    # the log lines as a worker writes them (to /dev/null here)
    from mproxy.workers.worker import FDLines

    turn_end = getattr(reactor, "call_at_turn_end", None)
    log_fd = os.open(os.devnull, os.O_WRONLY)
    log = FDLines(log_fd) if turn_end is None else FDLines(log_fd, turn_end)
    site = build_http_factory(reactor, router, JSONLogger(log), pools=pools)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    target = upport.getHost().port if args.direct else port.getHost().port
    request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: bench\r\n"
               b"Accept: */*\r\n\r\n" % target)
    state = {"left": 0, "done": 0, "open": 0, "phase": 0}

    class Client(Protocol):
        def connectionMade(self) -> None:
            self.buf = b""
            self.send()

        def send(self) -> None:
            if state["left"] <= 0:
                self.transport.loseConnection()
                return
            state["left"] -= 1
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            while True:
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                n = int(re.search(rb"(?i)content-length: (\d+)", self.buf[:i]).group(1))
                if len(self.buf) < i + 4 + n:
                    return
                self.buf = self.buf[i + 4 + n:]
                state["done"] += 1
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
            if args.gc:
                gc.collect()
                gc.disable()
            start(args.serve)
            return
        if args.gc:
            found = gc.collect()
            print(f"{state['done']} requests: {found / max(1, state['done']):.1f} objects of "
                  "cyclic garbage per request (collector off meanwhile)")
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
            "-c", str(args.connections)] + (["--direct"] if args.direct else [])
    if args.cpu >= 0:
        argv = ["taskset", "-c", str(args.cpu)] + argv
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tmp, timeout=3600)
    return total_ir(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--base", type=int, default=200)
    ap.add_argument("--connections", "-c", type=int, default=8)
    ap.add_argument("--direct", action="store_true", help="no proxy: clients to upstream")
    ap.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: no pin)")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help="with --serve: report cyclic garbage")
    args = ap.parse_args()
    if args.serve is not None:
        serve(args)
        return 0
    trees = dict(s.partition("=")[::2] for s in args.mproxy_tree) or {"here": args.tree}
    with tempfile.TemporaryDirectory(prefix="mproxy-inproc-") as tmp:
        for label, tree in trees.items():
            t0 = time.monotonic()
            a = count(tree, args.base, args, Path(tmp))
            b = count(tree, args.base + args.requests, args, Path(tmp))
            print(f"{label:<12} {(b - a) / args.requests:>12,.0f} instructions per request"
                  f" ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
