#!/usr/bin/env python3
"""Instructions per proxied request (valgrind callgrind): a repeatable CPU figure.

Wall-clock and CPU-time figures (proxy_cpu.py) move by 10 % and more on a
shared machine. Instruction counts do not: this script runs `mproxy run`
under `valgrind --tool=callgrind`, sends it a fixed number of keep-alive
requests (to the same nginx upstream as proxy_cpu.py), stops it, and reads
the total instruction count (Ir) callgrind writes at exit. It does that
twice per case, with --base and with --base + --requests requests; the
difference divided by --requests is the instructions per request, with
start-up, deploy and shutdown cancelled out.

Cases: each source tree given with --mproxy-tree LABEL=DIR (default: this
checkout as "here"), over plain HTTP, (--tls) HTTPS and (--h2) HTTP/2 over
TLS (h2load -n N -c --connections -m --h2-streams). --workload get64k,
get1m or post1m (HTTP/1.1 only) sends proxy_cpu.py's body requests instead
of GET /: the figure is then also given per MiB of body.

Usage: python3 bench/proxy_instructions.py --mproxy-tree before=/path/a \\
           --mproxy-tree after=/path/b [--requests 2000] [--base 300] [--tls] [--h2]
           [--no-plain]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from proxy_cpu import WORKLOADS, single_worker, tree_commands, verify  # noqa: E402


def load(host: str, port: int, total: int, connections: int, cafile: str | None,
         workload: str = "small") -> int:
    """Send `total` requests of `workload` (GET / by default) over
    `connections` keep-alive connections; returns how many got a 200 (with
    the whole body, for the downloads)."""
    path, upload, download = WORKLOADS[workload]
    body = b"x" * upload if upload else None
    ok = [0] * connections
    share = [total // connections + (1 if i < total % connections else 0)
             for i in range(connections)]

    def worker(i: int) -> None:
        if cafile:
            ctx = ssl.create_default_context(cafile=cafile)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, context=ctx, timeout=120)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=120)
        for _ in range(share[i]):
            if body is not None:
                conn.request("POST", "/" + path, body=body,
                             headers={"Content-Type": "application/octet-stream"})
            else:
                conn.request("GET", "/" + path)
            r = conn.getresponse()
            got = r.read()
            if r.status == 200 and (download is None or len(got) == download):
                ok[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def load_h2(host: str, port: int, total: int, connections: int, streams: int) -> int:
    """h2load: `total` GET / over `connections` HTTP/2 connections with
    `streams` in flight on each; returns how many got a 2xx."""
    r = subprocess.run(["h2load", "-t1", f"-n{total}", f"-c{connections}", f"-m{streams}",
                        f"https://{host}:{port}/"], capture_output=True, text=True,
                       timeout=3600, stdin=subprocess.DEVNULL)
    m = re.search(r"status codes: (\d+) 2xx", r.stdout)
    if r.returncode != 0 or not m:
        raise C.BenchError(f"h2load failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    return int(m.group(1))


def total_ir(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise C.BenchError(f"no instruction total in {path}")


def total_ir_all(workdir: Path, supervisor: int, timeout: float = 120) -> int:
    """The instruction total of the process that served the requests.
    `mproxy run --workers 1` is a supervisor (the process started, PID
    `supervisor`), the worker and a standby worker, all traced: the worker
    with the largest total served them (the supervisor's and the standby's
    counts grow with the run's wall time, not with the requests, so they are
    left out). A worker is any other process: the first workers are forked
    from the supervisor (their command line is the supervisor's), later ones
    are `python -m mproxy.workers`. Without worker processes, the one
    process's total. Waits for each process's file to be complete: a
    worker may still be exiting after the supervisor."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(workdir.glob("callgrind.out.*"))
        try:
            totals = [total_ir(f) for f in files]
        except C.BenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
            continue
        break
    if not files:
        raise C.BenchError(f"no callgrind output in {workdir}")
    workers = []
    for f, t in zip(files, totals):
        pid = next((line[5:].strip() for line in f.read_text(errors="replace").splitlines()
                    if line.startswith("pid:")), "?")
        is_worker = pid != str(supervisor)
        C.log(f"  {f.name}: {t:,} instructions ({'worker' if is_worker else 'main'})")
        if is_worker:
            workers.append(t)
    return max(workers) if workers else sum(totals)


def one_run(label: str, cmd: list[str], env: dict, tls: bool, n: int, tmp: Path,
            upstream_port: int, body: bytes, args, h2: bool = False) -> int:
    """Total Ir of one mproxy process that served n requests (after its deploy)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmp))
    # every process: with --workers the requests are served by a worker process
    wrapper = ["valgrind", "--tool=callgrind", "--trace-children=yes",
               f"--callgrind-out-file={workdir}/callgrind.out.%p"]
    with C.Procs() as procs:
        mp = C.MProxy(procs, cmd, env, workdir, args.proxy_cpu, wrapper=wrapper,
                      start_timeout=300, extra_args=single_worker(cmd, env))
        opts = ["--health-check-interval", "1h"] if args.slow_health else []
        cafile = None
        if tls:
            cert = C.make_cert(workdir / "cert")
            cafile = str(cert[0])
            opts += ["--host", C.TLS_HOST, "--tls", "--tls-certificate-path", str(cert[0]),
                     "--tls-private-key-path", str(cert[1])]
        mp.deploy(f"{C.HOST}:{upstream_port}", opts, timeout=300)
        host = C.TLS_HOST if tls else C.HOST
        port = mp.https_port if tls else mp.http_port
        scheme = "https" if tls else "http"
        verify(f"{scheme}://{host}:{port}/", body, cafile)
        t0 = time.monotonic()
        if h2:
            got = load_h2(host, port, n, args.connections, args.h2_streams)
        else:
            got = load(host, port, n, args.connections, cafile, args.workload)
        if got != n:
            raise C.BenchError(f"{label}: only {got} of {n} requests got a 200")
        C.log(f"{label}: {n} requests in {time.monotonic() - t0:.1f}s under callgrind")
        mp.proc.popen.send_signal(signal.SIGTERM)
        mp.proc.popen.wait(300)
    return total_ir_all(workdir, mp.pid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--requests", type=int, default=2000, help="requests measured")
    ap.add_argument("--base", type=int, default=300,
                    help="requests of the baseline run (subtracted)")
    ap.add_argument("--connections", "-c", type=int, default=8)
    ap.add_argument("--tls", action="store_true", help="also measure HTTPS")
    ap.add_argument("--h2", action="store_true",
                    help="also measure HTTP/2 over TLS (h2load; --connections connections)")
    ap.add_argument("--h2-streams", type=int, default=10,
                    help="HTTP/2 streams in flight per connection (h2load -m)")
    ap.add_argument("--no-plain", action="store_true", help="skip plain HTTP")
    ap.add_argument("--workload", default="small",
                    choices=[w for w in WORKLOADS if w != "rate"],
                    help="the requests sent (proxy_cpu.py's workloads; HTTP/1.1 only)")
    ap.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (-1: no pin)")
    ap.add_argument("--load-cpu", type=int, default=1, help="CPU for the upstream (-1: no pin)")
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temp dir (the callgrind.out files, for callgrind_annotate)")
    ap.add_argument("--slow-health", action="store_true",
                    help="deploy with --health-check-interval 1h (trees that accept it)")
    args = ap.parse_args(argv)
    if args.h2 and args.workload != "small":
        ap.error("--workload is for HTTP/1.1 (h2load sends GET /)")
    C.install_signal_handlers()
    for tool in ("valgrind", "nginx") + (("h2load",) if args.h2 else ()):
        if not shutil.which(tool):
            C.log(f"error: {tool} not found")
            return 1
    trees = tree_commands(args.mproxy_tree or [f"here={C.REPO_ROOT}"])
    body = C.SMALL_BODY
    tmp = Path(tempfile.mkdtemp(prefix="mproxy-bench-ir-"))
    results: dict[str, float] = {}
    try:
        with C.Procs() as procs:
            upstream, up_port = C.start_upstream(procs, tmp / "upstream", args.load_cpu, body)
            kinds = ([] if args.no_plain else ["mproxy"]) + (["mproxy-tls"] if args.tls else [])
            kinds += ["mproxy-h2"] if args.h2 else []
            cases = [(label, kind) for kind in kinds for label in trees]
            for label, kind in cases:
                name = f"{kind}@{label}"
                tls, h2 = kind != "mproxy", kind == "mproxy-h2"
                cmd, env = trees[label]
                base = one_run(name, cmd, env, tls, args.base, tmp, up_port, body, args, h2)
                full = one_run(name, cmd, env, tls, args.base + args.requests, tmp, up_port,
                               body, args, h2)
                results[name] = (full - base) / args.requests
                C.log(f"{name}: {results[name]:,.0f} instructions per request")
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    _, upload, download = WORKLOADS[args.workload]
    mib = (upload or download or 0) / 1048576
    print(f"callgrind instructions per request ({args.requests} requests, "
          f"{args.connections} keep-alive connections"
          + (f"; workload {args.workload}" if args.workload != "small" else "")
          + (f"; HTTP/2: {args.h2_streams} streams each" if args.h2 else "") + "):")
    for name, ir in results.items():
        print(f"  {name:<22} {ir:>12,.0f}" + (f"   {ir / mib:>14,.0f} per MiB" if mib else ""))
    labels = list(trees)
    for base in ("mproxy", "mproxy-tls", "mproxy-h2"):
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                x, y = results.get(f"{base}@{b}"), results.get(f"{base}@{a}")
                if x and y:
                    print(f"  {base}@{b} / {base}@{a}: x{x / y:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
