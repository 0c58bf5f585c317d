#!/usr/bin/env python3
"""Proxy throughput and CPU cost per request: direct vs mproxy vs nginx vs caddy.

For each target the same upstream (nginx serving a small fixed body with
keepalive, /up -> 200) is loaded with wrk through the proxy under test:

  direct       wrk -> upstream                (no proxy: the ceiling)
  mproxy       wrk -> mproxy run -> upstream  (deployed with `mproxy deploy`)
  nginx        wrk -> nginx proxy_pass (keepalive pool, JSON access log on)
  nginx-nolog  as nginx with access_log off (optional, shows the log's cost)
  caddy        wrk -> caddy reverse_proxy (JSON access log on), if installed
  *-tls        the same proxies terminating HTTPS (self-signed ECDSA cert for
               localhost; mproxy deployed with --host localhost --tls and the
               cert files); the upstream stays plain HTTP. Not in the default set.
  *-h2         mproxy-h2, caddy-h2, nginx-h2: the -tls setup loaded over
               HTTP/2 by h2load (nghttp2-client), -c connections with
               --h2-streams (10) streams in flight on each
  *-h3         mproxy-h3 (run with --http3), caddy-h3: the -tls setup loaded
               over HTTP/3 by bench/h3load.py (aioquic, one Python process:
               usually the bottleneck itself; CPU us/req is still the proxy's)

The proxy is pinned to CPU 0; wrk and the upstream share CPU 1. The proxy's
CPU time is utime+stime from /proc/PID/stat summed over its process tree, as
a delta over the measured run, divided by the requests wrk completed.

  mproxy-w1, mproxy-w2, caddy-multi, nginx-multi
               every core: `mproxy run --workers 1` / `--workers 2`, caddy
               and nginx (worker_processes auto) with their default worker
               counts, none pinned (the load stays pinned); mproxy's CPU
               is that of the supervisor and its workers. The other mproxy
               rows run with one worker on the pinned CPU.

  mproxy@LABEL, mproxy-tls@LABEL
               mproxy (plain, HTTPS) run from another source tree given
               with --mproxy-tree LABEL=DIR, to compare two versions of the
               code in one run (--rounds alternates them).

Workloads (--workloads, each a set of rows; the row of a target under a
workload other than "small" is named TARGET:WORKLOAD):

  small        GET / (a --body-size response; the default)
  get64k, get1m
               GET of a 64 KiB / 1 MiB response (the upstream serves files)
  post1m       POST of a 1 MiB request body (wrk script), small response
  rate         GET / at a constant --rate (default 1,000 req/s) for
               --rate-duration (30 s) by bench/rateload.py: latency, not
               capacity; the ratios give each proxy's p99 minus direct's.
               On a VM, --awake keeps the pinned vCPUs from halting between
               requests (their wake-up would otherwise be in every row)

Usage: python3 bench/proxy_cpu.py [--targets direct,mproxy,nginx,caddy]
       [--duration 10] [--runs 3] [--connections 50]
       [--mproxy-tree before=/path/a --mproxy-tree after=/path/b
        --targets mproxy@before,mproxy@after --rounds 3]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _protocols as P  # noqa: E402

ALL_TARGETS = ["direct", "mproxy", "nginx", "nginx-nolog", "caddy",
               "mproxy-tls", "nginx-tls", "caddy-tls",
               # HTTP/2 (h2load) and HTTP/3 (bench/h3load.py) over the -tls setups
               "mproxy-h2", "caddy-h2", "nginx-h2", "mproxy-h3", "caddy-h3",
               # every core, unpinned (worker processes)
               "mproxy-w1", "mproxy-w2", "caddy-multi", "nginx-multi"]
#: unpinned targets: name -> (the target it runs as, extra mproxy run options)
MULTI = {"mproxy-w1": ("mproxy", ["--workers", "1"]), "mproxy-w2": ("mproxy", ["--workers", "2"]),
         "caddy-multi": ("caddy", []), "nginx-multi": ("nginx", [])}
DEFAULT_TARGETS = ["direct", "mproxy", "nginx", "caddy"]

#: workload -> (path under the target's URL, request body bytes, response
#: body bytes or None for --body-size)
WORKLOADS = {
    "small": ("", 0, None),
    "get64k": ("files/64k", 0, C.BODY_FILES["64k"]),
    "get1m": ("files/1m", 0, C.BODY_FILES["1m"]),
    "post1m": ("upload", 1048576, None),
    "rate": ("", 0, None),
}

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> dict:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    if not m:
        raise C.BenchError("could not parse wrk output:\n" + out)
    res = {"requests": int(m.group(1)), "elapsed_s": _ms(m.group(2), m.group(3)) / 1000.0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["req_per_s"] = float(m.group(1)) if m else res["requests"] / res["elapsed_s"]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if m:
        res["latency_avg_ms"] = _ms(m.group(1), m.group(2))
        res["latency_max_ms"] = _ms(m.group(5), m.group(6))
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        res[f"latency_p{pct}_ms"] = _ms(val, unit)
    return res


def run_wrk(url: str, args, duration: float, cpu: int | None) -> dict:
    script = getattr(args, "wrk_script", None)
    argv = C.pin_prefix(cpu) + [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s",
        "--timeout", "5s", "--latency"] + (["-s", script] if script else []) + [url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                       stdin=subprocess.DEVNULL)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise C.BenchError(f"wrk failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    res = parse_wrk(r.stdout)
    # wrk's own CPU (it shares the load CPU with the upstream): the client's
    # cost per request through each target
    res["wrk_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return res


def measure(url: str, args, proxy_pid: int | None, upstream_pid: int,
            upstream_port: int) -> dict:
    proxy_pids = C.tree_pids(proxy_pid) if proxy_pid else []
    up_pids = C.tree_pids(upstream_pid)
    awake = C.Awake([args.proxy_cpu, args.load_cpu]) if getattr(args, "awake_now", False) else None
    if awake is not None:
        awake.__enter__()
        w0 = awake.cpu_seconds()
    a0 = C.nginx_accepts(upstream_port)
    lo0 = C.listen_overflows()
    s0 = C.cpu_times()
    if getattr(args, "rt", False):
        C.set_realtime(proxy_pids + up_pids, args.realtime)
    by_pid0 = C.cpu_seconds_by_pid(proxy_pids)
    p0, u0, t0 = C.cpu_seconds(proxy_pids), C.cpu_seconds(up_pids), time.monotonic()
    split: dict[int, int] = {}
    sampler = None
    if len(proxy_pids) > 1:
        # which process holds how many of the client connections, sampled
        # half-way through the run (the load keeps its connections open)
        port = urlsplit(P.split_url(url)[1]).port
        sampler = threading.Timer(args.run_duration / 2,
                                  lambda: split.update(C.established_by_pid(proxy_pids, port)))
        sampler.start()
    try:
        res = P.run_load(url, args, args.run_duration, args.load_cpu, run_wrk)
    finally:
        if sampler is not None:
            sampler.cancel()
        if getattr(args, "rt", False):
            C.set_realtime(proxy_pids + up_pids, 0)
        if awake is not None:
            w1 = awake.cpu_seconds()
            awake.__exit__(None, None, None)
    p1, u1, t1 = C.cpu_seconds(proxy_pids), C.cpu_seconds(up_pids), time.monotonic()
    by_pid1 = C.cpu_seconds_by_pid(proxy_pids)
    if len(proxy_pids) > 1:
        # per process: CPU share of a core and client connections held
        res["per_process"] = {
            str(pid): {"cpu_util": round((by_pid1[pid] - by_pid0.get(pid, by_pid1[pid]))
                                         / (t1 - t0), 3),
                       "connections": split.get(pid)}
            for pid in proxy_pids if pid in by_pid1}
    s1 = C.cpu_times()
    a1 = C.nginx_accepts(upstream_port)
    lo1 = C.listen_overflows()
    if lo0 is not None and lo1 is not None:
        # SYNs dropped on a full accept queue (machine-wide): a listen backlog
        # too small for the connection burst; clients then wait 1 s+ to retry.
        res["listen_overflows"] = lo1 - lo0
    if a0 is not None and a1 is not None:
        # New connections the upstream accepted during the run (minus our own
        # status request): shows whether the proxy reuses upstream connections.
        res["upstream_new_connections"] = a1 - a0 - 1
    # How busy each pinned CPU was: tells which side was the bottleneck.
    for label, cpu in (("proxy_cpu", args.proxy_cpu), ("load_cpu", args.load_cpu)):
        if cpu is not None and cpu >= 0:
            res[f"{label}{cpu}_usage"] = usage = C.cpu_busy(s0, s1, cpu)
            if awake is not None and cpu in w1 and usage:
                # the busy loops' own time is not load
                spin = (w1[cpu] - w0.get(cpu, 0.0)) / (t1 - t0)
                usage["awake_loop"] = round(spin, 3)
                usage["busy"] = round(max(0.0, usage["busy"] - spin), 3)
    n = max(res["requests"], 1)
    res["wall_s"] = t1 - t0
    res["upstream_cpu_s"] = u1 - u0
    res["upstream_cpu_us_per_req"] = (u1 - u0) / n * 1e6
    if "wrk_cpu_s" in res:
        res["wrk_cpu_us_per_req"] = res["wrk_cpu_s"] / n * 1e6
    if proxy_pid:
        res["proxy_cpu_s"] = p1 - p0
        res["proxy_cpu_us_per_req"] = (p1 - p0) / n * 1e6
        res["proxy_cpu_util"] = (p1 - p0) / (t1 - t0)
        res["proxy_rss_kib"] = C.rss_kib(proxy_pids)
        # Other processes (not ours) running on the proxy's CPU during the run:
        # then req/s is understated; CPU per request is still the proxy's own.
        busy = res.get(f"proxy_cpu{args.proxy_cpu}_usage", {}).get("busy")
        if busy is not None:
            res["proxy_cpu_foreign"] = round(max(0.0, busy - res["proxy_cpu_util"]), 3)
        res["proxy_pids"] = len(proxy_pids)
    body = args.body_bytes_per_req
    if body:
        res["body_bytes_per_req"] = body
        res["mib_per_s"] = res["req_per_s"] * body / 1048576
        if proxy_pid:
            res["proxy_cpu_ns_per_kib"] = res["proxy_cpu_us_per_req"] * 1000 / (body / 1024)
    return res


def verify(url: str, expected: bytes, cafile: str | None = None) -> None:
    url = P.split_url(url)[1]
    deadline = time.monotonic() + 10
    while True:
        try:
            status, body = C.http_get(url, cafile=cafile)
        except OSError as e:
            status, body = None, repr(e).encode()
        if status == 200 and body == expected:
            return
        if time.monotonic() > deadline:
            raise C.BenchError(f"GET {url} -> {status} {body[:200]!r}, expected 200 with the "
                               "upstream's body")
        time.sleep(0.2)


def start_target(name: str, procs: C.Procs, workdir: Path, upstream_port: int, args):
    """Start the proxy for `name`; return (url, pid or None, extra-info dict).
    A -h2/-h3 target runs as its -tls one, loaded by h2load / h3load."""
    name, prefix = P.protocol_target(name)
    url, pid, extra = _start_target(name, procs, workdir, upstream_port, args,
                                    ["--http3"] if prefix == "h3+" else None)
    return prefix + url, pid, extra


def _start_target(name: str, procs: C.Procs, workdir: Path, upstream_port: int, args,
                  mproxy_args: list[str] | None = None):
    if name == "direct":
        return f"http://{C.HOST}:{upstream_port}/", None, {}
    if name in MULTI:
        base, extra_args = MULTI[name]
        unpinned = argparse.Namespace(**{**vars(args), "proxy_cpu": -1, "multi": base})
        return _start_target(base, procs, workdir, upstream_port, unpinned,
                             (mproxy_args or []) + extra_args)
    name, _, label = name.partition("@")
    base, tls = (name[:-4], True) if name.endswith("-tls") else (name, False)
    cert = C.make_cert(workdir / "cert") if tls else None
    extra = {"cafile": str(cert[0])} if tls else {}
    scheme_host = f"https://{C.TLS_HOST}" if tls else f"http://{C.HOST}"
    if base in ("nginx", "nginx-nolog"):
        (port,) = C.free_ports(1)
        conf = C.nginx_proxy_config(workdir, port, upstream_port,
                                    access_log=(base == "nginx"), tls=cert)
        if getattr(args, "multi", None):
            conf.write_text(conf.read_text().replace("worker_processes 1;",
                                                     "worker_processes auto;"))
        p = procs.start(name, C.pin_prefix(args.proxy_cpu) + C.nginx_argv(conf), workdir)
        C.wait_port(port, 15, p)
        return (f"{scheme_host}:{port}/", p.pid,
                {**extra, "access_log": str(workdir / "access.log")})
    if base == "caddy":
        (port,) = C.free_ports(1)
        conf = C.caddy_config(workdir, port, upstream_port, tls=cert)
        argv, env = C.caddy_argv_env(conf)
        p = procs.start(name, C.pin_prefix(args.proxy_cpu) + argv, workdir, env=env)
        C.wait_port(port, 15, p)
        return (f"{scheme_host}:{port}/", p.pid,
                {**extra, "access_log": str(workdir / "access.log")})
    if base == "mproxy":
        cmd, env = args.mproxy_trees[label] if label else args.mproxy_argv
        if not getattr(args, "multi", None):  # the pinned rows: one worker
            workers = getattr(args, "mproxy_workers", None)  # unless a script sets it
            mproxy_args = (mproxy_args or []) + (
                ["--workers", str(workers)] if workers else single_worker(cmd, env))
        mp = C.MProxy(procs, cmd, env, workdir, args.proxy_cpu, extra_args=mproxy_args)
        opts = []
        if tls:
            opts = ["--host", C.TLS_HOST, "--tls", "--tls-certificate-path", str(cert[0]),
                    "--tls-private-key-path", str(cert[1])]
        mp.deploy(f"{C.HOST}:{upstream_port}", opts)
        port = mp.https_port if tls else mp.http_port
        return f"{scheme_host}:{port}/", mp.pid, {**extra, "mproxy": mp}
    raise ValueError(name)


_single_worker: dict[tuple[str, ...], list[str]] = {}


def single_worker(cmd: list[str], env: dict) -> list[str]:
    """
    C{["--workers", "1"]} for an mproxy whose C{run} has a C{--workers}
    option (one process: the pinned single-core figure), else nothing.
    """
    key = tuple(cmd)
    if key not in _single_worker:
        r = subprocess.run(cmd + ["run", "--help"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=60,
                           stdin=subprocess.DEVNULL)
        _single_worker[key] = ["--workers", "1"] if "--workers" in r.stdout else []
        C.log(f"mproxy run {'has' if _single_worker[key] else 'has no'} --workers option"
              + (": running with --workers 1" if _single_worker[key] else ""))
    return _single_worker[key]


def tree_command(directory: str) -> tuple[list[str], dict]:
    """The mproxy CLI of the source tree at `directory` (PYTHONPATH=directory)."""
    root = Path(directory).resolve()
    if not (root / "mproxy" / "cli" / "main.py").exists():
        raise SystemExit(f"error: {root} holds no mproxy source tree")
    # `python -c` puts the current directory first on sys.path, ahead of
    # PYTHONPATH: the tree goes in front of it, or a run from another
    # checkout would measure that checkout
    return ([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); "
             "sys.argv[0] = 'mproxy'; "
             "from mproxy.cli.main import run; sys.exit(run())"], {"PYTHONPATH": str(root)})


def bench_target(name: str, tmp: Path, upstream, upstream_port: int, body: bytes, args,
                 workload: str = "small") -> dict:
    workdir = tmp / (name if workload == "small" else f"{name}:{workload}")
    n = 1
    while workdir.exists():  # another round of the same target
        n += 1
        workdir = tmp / f"{name}.{n}"
    workdir.mkdir()
    if name in MULTI:  # unpinned: no proxy CPU to watch
        args = argparse.Namespace(**{**vars(args), "proxy_cpu": -1})
    with C.Procs() as procs:
        root, pid, extra = start_target(name, procs, workdir, upstream_port, args)
        verify(root, body, extra.get("cafile"))
        url = ("rate+" if workload == "rate" else "") + root + WORKLOADS[workload][0]
        C.log(f"{name}: warm-up {args.warmup:g}s on {url}")
        if args.warmup > 0:
            P.run_load(root + WORKLOADS[workload][0], args, args.warmup, args.load_cpu,
                       run_wrk)
        runs = []
        for i in range(args.runs):
            quiet = True
            if args.wait_quiet > 0:
                quiet = C.wait_quiet([args.proxy_cpu, args.load_cpu], args.wait_quiet)
            r = measure(url, args, pid, upstream.pid, upstream_port)
            r["started_quiet"] = quiet
            r["round"] = getattr(args, "round", 1)
            runs.append(r)
            cpu = (f", proxy CPU {r['proxy_cpu_us_per_req']:.1f} us/req "
                   f"({r['proxy_cpu_util'] * 100:.0f}% of a core)" if pid else "")
            bad = (f", {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors"
                   if r["non_2xx"] or r["socket_errors"] else "")
            foreign = r.get("proxy_cpu_foreign", 0)
            if foreign > 0.05:
                bad += (f"; WARNING: other processes used {foreign * 100:.0f}% of CPU "
                        f"{args.proxy_cpu} (req/s understated)")
            if r.get("listen_overflows"):
                bad += (f"; WARNING: {r['listen_overflows']} SYNs dropped on a full accept "
                        "queue (listen backlog too small?)")
            if "upstream_new_connections" in r:
                bad += f"; {r['upstream_new_connections']} new upstream connections"
            if r.get("per_process"):
                bad += "; per process (connections, core use): " + ", ".join(
                    f"{v['connections']}/{v['cpu_util'] * 100:.0f}%"
                    for v in r["per_process"].values())
            if "generator_cpu_util" in r:
                bad += (f"; rate generator {r['generator_cpu_util'] * 100:.0f}% of a core, "
                        f"p99 send lag {r['send_lag_p99_ms']:.2f} ms"
                        + (f" (late {r['send_late_p99_ms']:.2f}, in send() "
                           f"{r['send_call_p99_ms']:.2f}; {r['send_late_over_1ms']} sends "
                           "over 1 ms late)" if "send_late_p99_ms" in r else ""))
            load = r.get(f"load_cpu{args.load_cpu}_usage", {})
            busy = (f"; load CPU {load['busy'] * 100:.0f}% busy, {load['steal'] * 100:.0f}% "
                    "stolen" if load else "")
            if "wrk_cpu_us_per_req" in r:
                busy += (f"; wrk {r['wrk_cpu_us_per_req']:.1f} us/req, upstream "
                         f"{r['upstream_cpu_us_per_req']:.1f} us/req")
            C.log(f"{name}: run {i + 1}/{args.runs}: {r['req_per_s']:.0f} req/s{cpu}{bad}{busy}")
        verify(root, body, extra.get("cafile"))
        out = {"target": name, "workload": workload, "url": url, "runs": runs}
        if "mproxy" in extra:
            out["mproxy_request_log_lines"] = extra["mproxy"].request_log_lines()
        if "access_log" in extra:
            out["access_log_lines"] = count_log_lines(Path(extra["access_log"]))
    out["summary"] = summarize(runs)
    logged = out.get("mproxy_request_log_lines", out.get("access_log_lines"))
    if logged is not None and name != "nginx-nolog":
        total = out["summary"]["requests"]
        out["logged_fraction_vs_measured"] = round(logged / total, 3) if total else None
        if logged < total:
            C.log(f"{name}: WARNING: only {logged} request log lines for {total} measured "
                  "requests; the logging cost is not fully included")
    return out


def tree_commands(specs: list[str]) -> dict[str, tuple[list[str], dict]]:
    """The mproxy command of each --mproxy-tree LABEL=DIR, by label."""
    trees = {}
    for spec in specs:
        label, _, directory = spec.partition("=")
        trees[label] = tree_command(directory)
    return trees


def borrow_settings(args) -> None:
    """For a bench script that starts and loads targets with this module's
    helpers: the mproxy commands they read (this tree's and
    args.mproxy_tree's), and this module's own run settings off: one worker
    kind, no realtime generator, no busy loops, the rate workload's
    defaults."""
    args.mproxy_argv = C.mproxy_command(None)
    args.mproxy_trees = tree_commands(args.mproxy_tree)
    args.multi = None
    args.realtime = 0
    args.awake = 0
    args.rate = 1000
    args.rate_duration = args.duration


def add_run_args(ap, workloads: str) -> None:
    """The options of a bench script that runs wrk at proxy_cpu.py's
    targets, workload by workload (run_each)."""
    ap.add_argument("--targets", default="mproxy-tls,caddy-tls")
    ap.add_argument("--workloads", default=workloads)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--connections", "-c", type=int, default=50)
    ap.add_argument("--threads", "-t", type=int, default=1)
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--keep-tmp", action="store_true")


def run_each(args, prefix: str, run, sendfile: bool = False) -> int:
    """For a script with add_run_args's options that measures with perf:
    one nginx upstream (serving SMALL_BODY; its files with sendfile() if
    `sendfile`), then `run(target, workload, tmp, upstream, port, body)`
    for each workload and target, targets in alternating order round by
    round; its temporary directory (prefix `prefix`) kept with --keep-tmp.
    The exit status."""
    C.install_signal_handlers()
    if not shutil.which("perf"):
        C.log("error: perf not found")
        return 1
    borrow_settings(args)
    targets = [t for t in args.targets.split(",") if t]
    workloads = [w for w in args.workloads.split(",") if w]
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with C.Procs() as procs:
            upstream, up_port = C.start_upstream(procs, tmp / "upstream", args.load_cpu,
                                                 C.SMALL_BODY, sendfile=sendfile)
            for rnd in range(args.rounds):
                order = targets if rnd % 2 == 0 else targets[::-1]
                for w in workloads:
                    for t in order:
                        run(t, w, tmp, upstream, up_port, C.SMALL_BODY)
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def set_workload(args, workload: str, tmp: Path) -> None:
    """The load settings of `workload`: run length, wrk script, body bytes
    counted per request."""
    _, upload, download = WORKLOADS[workload]
    args.run_duration = args.rate_duration if workload == "rate" else args.duration
    # the fixed-rate load uses a fraction of a core: real-time priority for it
    # cannot starve the machine, and keeps other processes' load out of its latency
    args.rt = bool(args.realtime) and workload == "rate"
    args.awake_now = bool(args.awake) and workload == "rate"
    args.wrk_script = None
    if upload:
        script = tmp / f"post-{upload}.lua"
        script.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {upload})\n'
                          'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        args.wrk_script = str(script)
    args.body_bytes_per_req = upload or download or 0


def count_log_lines(path: Path) -> int:
    """Lines in an access log and its rotated siblings (caddy rolls at 100 MB,
    gzipped)."""
    n = 0
    for p in sorted(path.parent.glob(path.stem + "*")):
        opener = gzip.open if p.suffix == ".gz" else open
        try:
            with opener(p, "rb") as f:
                n += sum(1 for _ in f)
        except OSError:
            pass
    return n


def summarize(runs: list[dict]) -> dict:
    keys = ["req_per_s", "proxy_cpu_us_per_req", "proxy_cpu_util", "upstream_cpu_us_per_req",
            "latency_p50_ms", "latency_p99_ms", "proxy_rss_kib", "proxy_cpu_foreign",
            "upstream_new_connections", "listen_overflows", "mib_per_s",
            "proxy_cpu_ns_per_kib", "generator_cpu_util", "send_lag_p99_ms",
            "send_late_p99_ms", "send_call_p99_ms", "send_late_over_1ms", "wrk_cpu_us_per_req"]
    s = {}
    for r in runs:
        for k, v in list(r.items()):
            if k.startswith("load_cpu") and k.endswith("_usage") and v:
                r["load_cpu_busy"] = v["busy"]
    keys.append("load_cpu_busy")
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if vals:
            s[k] = statistics.median(vals)
    s["requests"] = sum(r["requests"] for r in runs)
    s["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    return s


def round_ratios(runs_a: list[dict], runs_b: list[dict]) -> list[float]:
    """req/s of A over B in each round both ran in (medians of that round's
    runs): with the targets interleaved, each ratio shares one stretch of the
    machine's noise."""
    def by_round(runs):
        rounds: dict[int, list[float]] = {}
        for r in runs:
            rounds.setdefault(r.get("round", 1), []).append(r["req_per_s"])
        return {k: statistics.median(v) for k, v in rounds.items()}

    a, b = by_round(runs_a), by_round(runs_b)
    return [a[k] / b[k] for k in sorted(a) if k in b and b[k]]


def fmt(v, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def report(results: dict[str, dict]) -> tuple[str, dict]:
    lines = []
    hdr = (f"{'target':<22} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'proxy CPU':>10} "
           f"{'core use':>8} {'upstrm CPU':>10} {'RSS MiB':>7} {'errors':>6} {'load CPU':>8} "
           f"{'MiB/s':>7} {'proxy CPU':>9}")
    lines.append(hdr)
    lines.append(f"{'':<22} {'':>9} {'':>7} {'':>7} {'us/req':>10} {'':>8} {'us/req':>10} "
                 f"{'':>7} {'':>6} {'busy':>8} {'':>7} {'ns/KiB':>9}")
    lines.append("-" * len(hdr))
    for name, r in results.items():
        s = r["summary"]
        rss = s.get("proxy_rss_kib")
        util = s.get("proxy_cpu_util")
        lb = s.get("load_cpu_busy")
        lines.append(
            f"{name:<22} {s['req_per_s']:>9.0f} {fmt(s.get('latency_p50_ms'), '7.2f')} "
            f"{fmt(s.get('latency_p99_ms'), '7.2f')} {fmt(s.get('proxy_cpu_us_per_req'), '10.1f')} "
            f"{fmt(None if util is None else util * 100, '7.0f')}{' ' if util is None else '%'} "
            f"{fmt(s.get('upstream_cpu_us_per_req'), '10.1f')} "
            f"{fmt(None if rss is None else rss / 1024, '7.1f')} {s['errors']:>6} "
            f"{fmt(None if lb is None else lb * 100, '7.0f')}{'%' if lb is not None else ' '} "
            f"{fmt(s.get('mib_per_s'), '7.1f')} {fmt(s.get('proxy_cpu_ns_per_kib'), '9.1f')}")
    ratios = {}

    def ratio(a, b, key):
        sa, sb = results.get(a, {}).get("summary", {}), results.get(b, {}).get("summary", {})
        if sa.get(key) and sb.get(key):
            return sa[key] / sb[key]
        return None

    noisy = [n for n, r in results.items() if r["summary"].get("proxy_cpu_foreign", 0) > 0.05]
    if noisy:
        lines.append(f"WARNING: other processes shared the proxy CPU during {', '.join(noisy)} "
                     "(see proxy_cpu_foreign in the JSON): req/s for those rows is understated;"
                     " CPU us/req is less affected, but not immune (shared caches and cores).")
    for name, r in results.items():
        splits = []
        for run in r["runs"]:
            procs = [v for v in run.get("per_process", {}).values()
                     if v["connections"] or v["cpu_util"] >= 0.02]
            if procs:
                splits.append("+".join(str(v["connections"]) for v in procs) + " ("
                              + "/".join(f"{v['cpu_util'] * 100:.0f}%" for v in procs) + ")")
        if splits:
            lines.append(f"{name}: client connections per process (core use), by run: "
                         + ", ".join(splits))
    lines.append("")
    lines.append("Ratios (medians; >1 means the first is higher):")
    pairs = [("mproxy", b) for b in ("direct", "nginx", "nginx-nolog", "caddy")]
    suffixes = [""] + [f":{w}" for w in WORKLOADS if w != "small"]
    trees = list(dict.fromkeys(n.partition("@")[2].partition(":")[0]
                               for n in results if "@" in n))
    for base in ("mproxy", "mproxy-tls"):
        pairs += [(f"{base}@{b}{sfx}", f"{base}@{a}{sfx}") for sfx in suffixes
                  for i, a in enumerate(trees) for b in trees[i + 1:]]
    pairs += [("nginx", "direct"), ("caddy", "direct"),
              ("mproxy-tls", "nginx-tls"), ("mproxy-tls", "caddy-tls"),
              ("mproxy-tls", "mproxy"), ("nginx-tls", "nginx"), ("caddy-tls", "caddy"),
              ("mproxy-h2", "caddy-h2"), ("mproxy-h2", "nginx-h2"), ("mproxy-h3", "caddy-h3"),
              ("mproxy-h2", "mproxy-tls"), ("caddy-h2", "caddy-tls"), ("nginx-h2", "nginx-tls"),
              ("mproxy-h3", "mproxy-tls"),
              ("mproxy-w2", "mproxy-w1"), ("mproxy-w2", "caddy-multi"),
              ("mproxy-w1", "caddy-multi"), ("mproxy-w2", "nginx-multi"),
              ("mproxy-w2", "mproxy")]
    pairs += [(f"{p}{sfx}", f"{q}{sfx}") for sfx in suffixes[1:]
              for p, q in [("mproxy", "direct"), ("mproxy", "caddy"), ("mproxy", "nginx"),
                           ("caddy", "direct"), ("nginx", "direct"),
                           ("mproxy-tls", "caddy-tls"), ("mproxy-tls", "nginx-tls")]]
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        rq = ratio(a, b, "req_per_s")
        cu = ratio(a, b, "proxy_cpu_us_per_req")
        ratios[f"{a}_vs_{b}"] = {"req_per_s": rq, "proxy_cpu_us_per_req": cu}
        if a.endswith(":rate"):
            # a fixed rate: the figure is the latency the proxy adds
            sa, sb = results[a]["summary"], results[b]["summary"]
            txt = f"  {a} / {b}:"
            for pct in ("p50", "p99"):
                va, vb = sa.get(f"latency_{pct}_ms"), sb.get(f"latency_{pct}_ms")
                if va is not None and vb is not None:
                    ratios[f"{a}_vs_{b}"][f"{pct}_added_ms"] = va - vb
                    txt += f" {pct} {va:.2f} ms vs {vb:.2f} ms ({va - vb:+.2f} ms)"
            lines.append(txt)
            continue
        txt = f"  {a} / {b}: req/s x{rq:.3f}" if rq else f"  {a} / {b}:"
        if cu:
            txt += f", proxy CPU per request x{cu:.2f}"
        mb = ratio(a, b, "mib_per_s")
        if mb:
            txt += f", throughput x{mb:.3f}"
        lines.append(txt)
        paired = round_ratios(results[a]["runs"], results[b]["runs"])
        if len(paired) > 1:
            # --rounds: the two targets ran next to each other in each round
            ratios[f"{a}_vs_{b}"]["req_per_s_by_round"] = paired
            lines.append(f"    per round: {', '.join(f'x{x:.3f}' for x in paired)}"
                         f" (median x{statistics.median(paired):.3f})")
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma list from {','.join(ALL_TARGETS)}, or all (default: %(default)s; "
                         "mproxy/caddy are skipped with a warning if unavailable)")
    ap.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per target")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per target (median)")
    ap.add_argument("--connections", "-c", type=int, default=50)
    ap.add_argument("--threads", "-t", type=int, default=1)
    ap.add_argument("--h2-streams", type=int, default=10,
                    help="HTTP/2 streams in flight per connection for the -h2 rows (h2load -m)")
    ap.add_argument("--body-size", type=int, default=128, help="upstream body bytes")
    ap.add_argument("--workloads", default="small",
                    help=f"comma list from {','.join(WORKLOADS)}, or all (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=1000,
                    help="requests per second of the rate workload")
    ap.add_argument("--rate-duration", type=float, default=30,
                    help="seconds per measured run of the rate workload")
    ap.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (-1: no pin)")
    ap.add_argument("--load-cpu", type=int, default=1,
                    help="CPU for wrk and the upstream (-1: no pin)")
    ap.add_argument("--mproxy-cmd", help="command to run the mproxy CLI "
                    "(default: $MPROXY_CMD, else this checkout, else `mproxy` on PATH)")
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR",
                    help="run mproxy from source tree DIR as targets mproxy@LABEL and "
                         "mproxy-tls@LABEL (repeatable)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="benchmark the target list this many times, alternating targets "
                         "(each round: warm-up and --runs runs per target; the medians are "
                         "over all rounds)")
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS",
                    help="before each run, wait up to this long until the pinned CPUs are "
                         "idle (<10%% busy), for shared machines (0: don't wait)")
    ap.add_argument("--realtime", type=int, default=0, metavar="PRIORITY",
                    help="for the rate workload: run the generator, the upstream and the "
                         "proxy under SCHED_FIFO with this priority (e.g. 20), so that other "
                         "processes on a shared machine do not delay them (0: off)")
    ap.add_argument("--awake", action="store_true",
                    help="for the rate workload: keep the pinned CPUs from idling during "
                         "each measured run (a busy loop per CPU at SCHED_IDLE, which every "
                         "other process preempts at once). On a VM an idle vCPU halts and "
                         "its wake-up can take milliseconds, which then enters every row's "
                         "latency; the loops' CPU time is left out of the busy figures")
    ap.add_argument("--upstream-sendfile", action="store_true",
                    help="the nginx upstream sends /files/* with sendfile() instead of "
                         "reading them into 32 KiB buffers: about half of its CPU per MiB "
                         "off the load CPU, which otherwise sets the pace of the get1m rows "
                         "(every target gets the same upstream; off by default)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = ap.parse_args(argv)

    C.install_signal_handlers()
    if not shutil.which("wrk"):
        C.log("error: wrk not found (apt-get install wrk)")
        return 1
    if not shutil.which("nginx"):
        C.log("error: nginx not found (apt-get install nginx-light); it is the upstream")
        return 1
    if C.cpu_count() < 2 and (args.proxy_cpu >= 0 or args.load_cpu >= 0):
        C.log("warning: fewer than 2 CPUs available; not pinning")
        args.proxy_cpu = args.load_cpu = -1
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if workloads == ["all"]:
        workloads = list(WORKLOADS)
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    if targets == ["all"]:
        targets = list(ALL_TARGETS)
    args.mproxy_trees = {}
    for spec in args.mproxy_tree:
        label, sep, directory = spec.partition("=")
        if not sep or not label or not directory:
            ap.error(f"--mproxy-tree wants LABEL=DIR, not {spec!r}")
        args.mproxy_trees[label] = tree_command(directory)
    for t in targets:
        base, _, label = t.partition("@")
        if label and base in ("mproxy", "mproxy-tls", "mproxy-h2", "mproxy-h3"):
            if label not in args.mproxy_trees:
                ap.error(f"target {t!r}: no --mproxy-tree {label}=DIR")
            continue
        if t not in ALL_TARGETS:
            if t != "all":
                ap.error(f"unknown target {t!r}")
    skipped = {}
    for t in ("caddy", "caddy-tls", "caddy-h2", "caddy-h3", "caddy-multi"):
        if t in targets and not C.caddy_available():
            skipped[t] = "caddy not installed (apt-get install caddy)"
    for t in targets:
        if t.partition("@")[0].endswith(("-tls", "-h2", "-h3")) and not shutil.which("openssl"):
            skipped[t] = "openssl CLI not found (needed to make the test certificate)"
        if P.missing_tool(t):
            skipped[t] = P.missing_tool(t)
    args.mproxy_argv = (None, {})
    if {"mproxy", "mproxy-tls", "mproxy-h2", "mproxy-h3", "mproxy-w1", "mproxy-w2"} & set(targets):
        args.mproxy_argv = C.mproxy_command(args.mproxy_cmd)
        if args.mproxy_argv[0] is None:
            for t in ("mproxy", "mproxy-tls", "mproxy-h2", "mproxy-h3", "mproxy-w1", "mproxy-w2"):
                if t in targets:
                    skipped[t] = "mproxy CLI not available (pip install -e . or --mproxy-cmd)"
    for t, why in skipped.items():
        C.log(f"skipping {t}: {why}")
    targets = [t for t in targets if t not in skipped]

    filler = b"Hello from the upstream! " * ((args.body_size // 25) + 1)
    body = filler[:args.body_size - 1] + b"\n"
    tmp = Path(tempfile.mkdtemp(prefix="mproxy-bench-"))
    results: dict[str, dict] = {}
    rc = 0
    try:
        with C.Procs() as procs:
            upstream, up_port = C.start_upstream(procs, tmp / "upstream", args.load_cpu, body,
                                                 sendfile=args.upstream_sendfile)
            verify(f"http://{C.HOST}:{up_port}/", body)
            for round_no in range(args.rounds):
                args.round = round_no + 1
                if args.rounds > 1:
                    C.log(f"round {round_no + 1}/{args.rounds}")
                # odd rounds in the given order, even rounds reversed (A B, B A, ...):
                # a drift in the machine's load favours neither of two neighbours
                order = targets if round_no % 2 == 0 else targets[::-1]
                for workload, target in [(w, t) for w in workloads for t in order]:
                    name = target if workload == "small" else f"{target}:{workload}"
                    if name in skipped or target in skipped:
                        continue
                    if workload == "rate" and P.protocol_target(target)[1]:
                        skipped[name] = "the rate workload is HTTP/1.1 only"
                        continue
                    set_workload(args, workload, tmp)
                    try:
                        out = bench_target(target, tmp, upstream, up_port, body, args, workload)
                    except (C.BenchError, subprocess.SubprocessError, OSError) as e:
                        C.log(f"{name}: FAILED: {type(e).__name__}: {e}")
                        skipped[name] = f"failed: {str(e).splitlines()[0]}"
                        results.pop(name, None)
                        rc = 1
                        continue
                    if name in results:
                        results[name]["runs"] += out["runs"]
                        results[name]["summary"] = summarize(results[name]["runs"])
                    else:
                        results[name] = out
    except KeyboardInterrupt:
        C.log("interrupted; cleaning up")
        rc = 130
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if not results:
        return rc or 1
    table, ratios = report(results)
    print()
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
          f"x{args.runs * args.rounds} "
          f"(median), body {args.body_size} B, proxy on CPU {args.proxy_cpu}, "
          f"wrk+upstream on CPU {args.load_cpu}, workloads {','.join(workloads)}, "
          f"TCP congestion control {C.tcp_congestion_control()}"
          + ("; upstream sendfile on" if args.upstream_sendfile else "")
          + (f" (rate: {args.rate:g} req/s for {args.rate_duration:g} s"
             + ("; CPUs kept awake" if args.awake else "")
             + (f"; SCHED_FIFO {args.realtime}" if args.realtime else "") + ")"
             if "rate" in workloads else ""))
    print(table)
    for t, why in skipped.items():
        print(f"  (skipped {t}: {why})")
    if not args.no_json:
        path = C.write_results("proxy_cpu", {
            "kind": "proxy_cpu", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": C.machine_info(),
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("mproxy_argv", "mproxy_trees")},
            "workloads": workloads,
            "mproxy_cmd": args.mproxy_argv[0], "skipped": skipped,
            "results": results, "ratios": ratios})
        print(f"\nJSON: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
