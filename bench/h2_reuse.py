#!/usr/bin/env python3
"""Upstream connection reuse under HTTP/2 bursts: new upstream connections and
proxy CPU per request, for one or more mproxy source trees (and Caddy).

Each target is loaded with a fixed number of requests (`h2load -n`, 50
connections x 10 streams by default, over TLS) after a warm-up, with the
proxy pinned to one CPU (one worker) and h2load plus the upstream nginx on
the other. Printed per run: the connections the upstream accepted per
request (its stub_status), the proxy's CPU per request and req/s. A fixed
request count ends on its own however loaded the machine is (a timed
h2load run may not); the connection count depends far less on foreign
load than the wall-clock figures, which are hints on a shared machine.
Targets are alternated in each round.

    python3 bench/h2_reuse.py --mproxy-tree before=/tmp/a --mproxy-tree after=. --caddy

Prints one line per run and the medians; no JSON is written.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from proxy_cpu import single_worker, tree_commands  # noqa: E402


def h2load(url: str, n: int, args) -> tuple[int, int, float]:
    """(requests done, 2xx, seconds)"""
    argv = C.pin_prefix(args.load_cpu) + [
        "h2load", "-t1", f"-c{args.connections}", f"-m{args.streams}", f"-n{n}", url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise C.BenchError(f"h2load failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", r.stdout)
    ok = re.search(r"status codes: (\d+) 2xx", r.stdout)
    t = re.search(r"finished in ([\d.]+)(us|ms|s)", r.stdout)
    secs = float(t.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[t.group(2)]
    return int(done.group(1)), int(ok.group(1)), secs


def start(label: str, procs: C.Procs, workdir: Path, upstream_port: int, args):
    cert = C.make_cert(workdir / "cert")
    if label == "caddy":
        (port,) = C.free_ports(1)
        conf = C.caddy_config(workdir, port, upstream_port, tls=cert)
        argv, env = C.caddy_argv_env(conf)
        p = procs.start("caddy", C.pin_prefix(args.proxy_cpu) + argv, workdir, env=env)
        C.wait_port(port, 15, p)
        return f"https://{C.TLS_HOST}:{port}/", p.pid
    cmd, env = args.trees[label]
    mp = C.MProxy(procs, cmd, env, workdir, args.proxy_cpu, extra_args=single_worker(cmd, env))
    mp.deploy(f"{C.HOST}:{upstream_port}",
              ["--host", C.TLS_HOST, "--tls", "--tls-certificate-path", str(cert[0]),
               "--tls-private-key-path", str(cert[1])])
    return f"https://{C.TLS_HOST}:{mp.https_port}/", mp.pid


def run_one(label: str, tmp: Path, upstream_port: int, args, i: int) -> dict:
    workdir = tmp / f"{label}.{i}"
    workdir.mkdir()
    with C.Procs() as procs:
        url, pid = start(label, procs, workdir, upstream_port, args)
        h2load(url, args.warmup, args)
        pids = C.tree_pids(pid)
        a0, c0 = C.nginx_accepts(upstream_port), C.cpu_seconds(pids)
        done, ok, secs = h2load(url, args.requests, args)
        a1, c1 = C.nginx_accepts(upstream_port), C.cpu_seconds(pids)
    new = a1 - a0 - 1  # (minus the status request itself)
    return {"label": label, "requests": done, "ok": ok, "new_per_req": new / max(done, 1),
            "new": new, "cpu_us_per_req": (c1 - c0) / max(done, 1) * 1e6,
            "req_per_s": done / secs if secs else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--caddy", action="store_true", help="add Caddy as a target")
    ap.add_argument("--requests", "-n", type=int, default=30000)
    ap.add_argument("--warmup", type=int, default=5000, help="requests before each run")
    ap.add_argument("--connections", "-c", type=int, default=50)
    ap.add_argument("--streams", "-m", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    args = ap.parse_args()
    C.install_signal_handlers()
    args.trees = tree_commands(args.mproxy_tree)
    labels = list(args.trees) + (["caddy"] if args.caddy else [])
    if not labels:
        ap.error("give --mproxy-tree and/or --caddy")
    results: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="mproxy-h2reuse-") as t, C.Procs() as procs:
        tmp = Path(t)
        _, upstream_port = C.start_upstream(procs, tmp / "upstream", args.load_cpu, b"x" * 128)
        for rnd in range(args.rounds):
            order = labels if rnd % 2 == 0 else labels[::-1]
            for label in order:
                r = run_one(label, tmp, upstream_port, args, rnd)
                results[label].append(r)
                C.log(f"{label}: {r['requests']} requests ({r['ok']} 2xx), {r['new']} new "
                      f"upstream connections ({r['new_per_req'] * 100:.1f} %), "
                      f"{r['cpu_us_per_req']:.1f} us CPU/request, {r['req_per_s']:.0f} req/s")
                time.sleep(1)
    print(f"{'target':16} {'new conn/req':>12} {'CPU us/req':>10} {'req/s':>8}  (medians)")
    for label, rs in results.items():
        print(f"{label:16} {statistics.median(r['new_per_req'] for r in rs) * 100:11.1f}% "
              f"{statistics.median(r['cpu_us_per_req'] for r in rs):10.1f} "
              f"{statistics.median(r['req_per_s'] for r in rs):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
