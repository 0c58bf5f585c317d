#!/usr/bin/env python3
"""How long a burst of new TLS connections waits for its handshakes at a busy proxy.

For each target (proxy_cpu.py's names: mproxy-tls@LABEL with --mproxy-tree,
mproxy-tls, caddy-tls, ...) this starts the same nginx upstream and proxy as
proxy_cpu.py (the proxy pinned to --proxy-cpu, the load to --load-cpu), keeps
the proxy busy with wrk (-c --connections, GET --workload), then opens --burst
new TLS connections at once and times each handshake from the connect.  It
prints the median and the largest per target and round (targets alternate
between rounds).

A proxy that takes one new connection per event-loop turn makes the last of a
burst wait a turn per connection before it; while it waits, wrk (which polls
a handshaking socket for writing) spins on it.

mproxy runs --workers (1; all pinned to --proxy-cpu as the other proxies
are), and for each mproxy round the burst's connections each of its
processes holds (sockets open during the burst minus before it) are printed:
how the burst was spread over the workers.  --stall-worker stops (SIGSTOP)
one of mproxy's first workers for the burst: a worker stuck or very busy
while another idles.  --load-on-one stops all but one of them while wrk
connects, so that the one takes every load connection (the others' sockets
queue them meanwhile, and it takes those too): one worker busy with the load,
the others idle when the burst comes.

Usage: python3 bench/accept_burst.py --mproxy-tree before=DIR --mproxy-tree after=. \\
           --targets mproxy-tls@before,mproxy-tls@after,caddy-tls [--burst 30] [--rounds 2]
           [--workers 2] [--stall-worker] [--load-on-one]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import proxy_cpu as PC  # noqa: E402


def children(pid: int) -> list[int]:
    """The child processes of `pid` (mproxy's workers and its spare)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def sockets_open(pid: int) -> int:
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return n


def first_workers(pid: int) -> list[int]:
    """mproxy's workers forked at start (their command line is the
    supervisor's; the spare's is `python -m mproxy.workers`)."""
    def cmdline(p: int) -> bytes:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""
    mine = cmdline(pid)
    return [c for c in children(pid) if cmdline(c) == mine]


def handshakes(port: int, cafile: str, n: int, limit: float,
               during=lambda: None) -> list[float]:
    """Open `n` TLS connections at once; each one's handshake time (s);
    `during()` runs once they are done, before they are closed."""
    ctx = ssl.create_default_context(cafile=cafile)
    conns = []
    t0 = time.monotonic()
    try:
        for _ in range(n):
            s = socket.create_connection((C.HOST, port), timeout=5)
            s.setblocking(False)
            conns.append((ctx.wrap_socket(s, server_hostname=C.TLS_HOST,
                                          do_handshake_on_connect=False), time.monotonic()))
        done: dict[int, float] = {}
        while len(done) < n and time.monotonic() - t0 < limit:
            for i, (c, start) in enumerate(conns):
                if i in done:
                    continue
                try:
                    c.do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                done[i] = time.monotonic() - start
            time.sleep(0.001)
        during()
        return sorted(done.values())
    finally:
        for c, _ in conns:
            c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="mproxy-tls,caddy-tls")
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--workload", default="get1m", choices=["get64k", "get1m"])
    ap.add_argument("--connections", "-c", type=int, default=30,
                    help="wrk's connections keeping the proxy busy")
    ap.add_argument("--burst", type=int, default=30, help="new TLS connections opened at once")
    ap.add_argument("--busy", type=float, default=2, help="seconds of load before the burst")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="mproxy run --workers")
    ap.add_argument("--stall-worker", action="store_true",
                    help="SIGSTOP one mproxy worker for the burst")
    ap.add_argument("--load-on-one", action="store_true",
                    help="all wrk connections on one mproxy worker, the others idle")
    args = ap.parse_args(argv)
    C.install_signal_handlers()
    for tool in ("wrk", "nginx", "openssl"):
        if not shutil.which(tool):
            C.log(f"error: {tool} not found")
            return 1
    args.threads = 1
    args.mproxy_cmd = None
    args.duration = args.busy + 4
    PC.borrow_settings(args)
    args.mproxy_workers = args.workers
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if not t.partition("@")[0].endswith("-tls"):
            ap.error(f"{t}: only TLS targets (the burst times TLS handshakes)")
    body = C.SMALL_BODY
    tmp = Path(tempfile.mkdtemp(prefix="mproxy-burst-"))
    results: dict[str, list[list[float]]] = {t: [] for t in targets}
    try:
        with C.Procs() as procs:
            upstream, up_port = C.start_upstream(procs, tmp / "upstream", args.load_cpu, body)
            PC.set_workload(args, args.workload, tmp)
            for rnd in range(args.rounds):
                for target in (targets if rnd % 2 == 0 else targets[::-1]):
                    workdir = Path(tempfile.mkdtemp(dir=tmp, prefix=target.replace("@", "-")))
                    with C.Procs() as inner:
                        root, _, extra = PC.start_target(target, inner, workdir, up_port, args)
                        PC.verify(root, body, extra.get("cafile"))
                        url = root + PC.WORKLOADS[args.workload][0]
                        port = int(root.rstrip("/").rsplit(":", 1)[1])
                        pid = extra["mproxy"].pid if "mproxy" in extra else None
                        held: list[int] = []
                        if pid is not None and args.load_on_one:
                            held = first_workers(pid)[1:]
                            for p in held:
                                os.kill(p, signal.SIGSTOP)
                        try:
                            load = subprocess.Popen(
                                C.pin_prefix(args.load_cpu) + [
                                    "wrk", "-t1", f"-c{args.connections}",
                                    f"-d{args.busy + 4:g}s", url],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
                            if held:
                                time.sleep(1)  # wrk connects meanwhile
                        finally:
                            for p in held:
                                os.kill(p, signal.SIGCONT)
                        procs_before: dict[int, int] = {}
                        spread: list[int] = []
                        stopped: list[int] = []

                        def count() -> None:
                            spread.extend(sockets_open(p) - before
                                          for p, before in procs_before.items())
                            for p in stopped:
                                os.kill(p, signal.SIGCONT)
                            stopped.clear()

                        try:
                            time.sleep(args.busy - (1 if held else 0))
                            if pid is not None:
                                procs_before = {p: sockets_open(p) for p in children(pid)}
                                if args.stall_worker and first_workers(pid):
                                    stopped.append(first_workers(pid)[0])
                                    os.kill(stopped[0], signal.SIGSTOP)
                            times = handshakes(port, extra["cafile"], args.burst, 10, count)
                        finally:
                            for p in stopped:
                                os.kill(p, signal.SIGCONT)
                            load.wait(60)
                    results[target].append(times)
                    med = statistics.median(times) * 1000 if times else float("nan")
                    top = times[-1] * 1000 if times else float("nan")
                    C.log(f"{target}: round {rnd + 1}: {len(times)}/{args.burst} handshakes, "
                          f"median {med:.0f} ms, largest {top:.0f} ms"
                          + (f"; per process {'/'.join(map(str, spread))}" if spread else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.burst} new TLS connections at once, the proxy busy with wrk -c"
          f"{args.connections} {args.workload} (mproxy --workers {args.workers}"
          f"{', the load on one' if args.load_on_one else ''}"
          f"{', one stopped' if args.stall_worker else ''}): handshake time from connect (ms)")
    print(f"{'target':28s} {'median':>8s} {'largest':>8s}   per round (median/largest)")
    for t, rounds in results.items():
        all_ = sorted(x for r in rounds for x in r)
        if not all_:
            print(f"{t:28s} {'-':>8s}")
            continue
        per = ", ".join(f"{statistics.median(r) * 1000:.0f}/{r[-1] * 1000:.0f}" for r in rounds if r)
        print(f"{t:28s} {statistics.median(all_) * 1000:8.0f} {all_[-1] * 1000:8.0f}   {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
