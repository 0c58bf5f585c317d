#!/usr/bin/env python3
"""What the load side pays per MiB through each proxy (wrk and the nginx upstream).

proxy_cpu.py's body rows run wrk and the nginx upstream on one CPU (--load-cpu)
and the proxy on another; when that CPU is busy, the proxy that makes the
load side work harder per MiB gets the lower throughput although its own CPU
per byte is lower.  For each target (proxy_cpu.py's names) and body workload
this starts the same upstream and proxy, warms up, then runs wrk for
--duration seconds under `perf stat` while a second `perf stat` watches the
nginx processes, and prints per MiB of body, for wrk, for nginx and for the
proxy: CPU (user/system from rusage or /proc), context switches, system calls
by kind, and wrk's read() results by kind (tracepoint filters, cheap enough
for the measured run): without read-ahead OpenSSL reads a TLS record's 5-byte
header and then its body, so a full 16 KiB record is a read of 5 and one of
16,401 bytes; other sizes are short records or a record read in parts; an
EAGAIN is a read with nothing there (wrk also spins on EAGAIN while its TLS
handshake waits for the server: it polls its connecting sockets for writing).
With --sizes a further short run records wrk's and nginx's read/write-like
calls (perf tracepoints) and prints their sizes; --profile a flat perf
profile of both.

Usage: python3 bench/load_side.py --targets mproxy-tls,caddy-tls --workloads get1m
           [--duration 5] [--sizes] [--mproxy-tree before=DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import proxy_cpu as PC  # noqa: E402
import syscalls_per_mib as S  # noqa: E402

EVENTS = ["task-clock", "context-switches", "cpu-migrations", "syscalls:sys_enter_*"]


def _counts(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    kinds = iter(READ_KINDS)
    for line in path.read_text().splitlines():
        if "sys_exit_read" in line:
            f = line.split(";")
            name = next(kinds)[0]
            if f[0] and not f[0].startswith("<"):
                out["read=" + name] = float(f[0])
            continue
        f = line.split(";")
        if len(f) < 3 or not f[0] or f[0].startswith("<"):
            continue
        try:
            v = float(f[0])
        except ValueError:
            continue
        if v:
            out[f[2].replace("syscalls:sys_enter_", "")] = v
    return out


def _wrk_argv(url: str, args, duration: float) -> list[str]:
    script = getattr(args, "wrk_script", None)
    return C.pin_prefix(args.load_cpu) + [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s",
        "--timeout", "5s", "--latency"] + (["-s", script] if script else []) + [url]


def _perf_p(events: list[str], pids: list[int], out: Path) -> subprocess.Popen:
    """`perf stat` of `events` on the processes `pids` until stopped."""
    return subprocess.Popen(["perf", "stat", "-x", ";", "-o", str(out), "-e", ",".join(events),
                             "-p", ",".join(map(str, pids))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGINT)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


#: wrk's read() results counted by kind (tracepoint filters, cheap enough for
#: the measured run): a TLS record header, a whole full-size record, EAGAIN,
#: and every other size (short records, or a record read in parts)
READ_KINDS = [("header", "ret == 5"), ("full_record", "ret == 16401"), ("eagain", "ret == -11"),
              ("eof_or_error", "ret <= 0 && ret != -11"),
              ("other_size", "ret > 0 && ret != 5 && ret != 16401")]


def _read_kinds() -> list[str]:
    out = []
    for _, f in READ_KINDS:
        out += ["-e", "syscalls:sys_exit_read", "--filter", f]
    return out


def _run_wrk(argv: list[str], out: Path, record: Path | None) -> tuple[dict, float, float]:
    """wrk under perf (stat, or record of the sized calls); its rusage."""
    if record is None:
        cmd = (["perf", "stat", "-x", ";", "-o", str(out), "-e", ",".join(EVENTS)]
               + _read_kinds() + ["--"] + argv)
    else:
        ev = []
        for s in S.SIZED + S.WAITS:
            ev += ["-e", f"syscalls:sys_enter_{s}", "-e", f"syscalls:sys_exit_{s}"]
        cmd = ["perf", "record", "-q", "-m", "8M", "-o", str(record)] + ev + ["--"] + argv
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    stdout, stderr = p.communicate(timeout=300)
    # the children's rusage: wrk's (perf's own is small next to it)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise C.BenchError(f"wrk failed: {stderr}\n{stdout}")
    return PC.parse_wrk(stdout), ru.ru_utime, ru.ru_stime


def _fd_sizes(data: Path, mib: float) -> dict[str, dict]:
    """Sizes of every sized call by (comm, syscall), per MiB."""
    r = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,event,trace"],
                       capture_output=True, text=True, timeout=600)
    pending: dict[int, str] = {}
    calls: dict[str, list[int]] = collections.defaultdict(list)
    for line in r.stdout.splitlines():
        m = S._LINE.match(line)
        if not m:
            continue
        tid = int(m.group(2) or m.group(1))
        kind, sc, rest = m.group(3), m.group(4), m.group(5)
        if kind == "enter":
            pending[tid] = sc
            continue
        if pending.pop(tid, None) != sc:
            continue
        rm = re.search(r"0x([0-9a-f]+)", rest)
        ret = int(rm.group(1), 16) if rm else 0
        if ret >= 1 << 63:
            ret -= 1 << 64
        calls[sc].append(ret)
    out = {}
    for sc, rets in sorted(calls.items()):
        good = [x for x in rets if x > 0]
        hist = collections.Counter(rets if sc not in S.WAITS else [])
        out[sc] = {"calls_per_mib": len(rets) / mib,
                   "failed_or_0_per_mib": sum(1 for x in rets if x <= 0) / mib,
                   "mean": (sum(good) / len(good)) if good else 0,
                   "top_sizes": [(k, round(v / mib, 2)) for k, v in hist.most_common(8)]}
    return out


def measure(name: str, workload: str, tmp: Path, up_pid: int, up_port: int, body: bytes,
            args) -> dict:
    workdir = tmp / f"{name}:{workload}"
    n = 1
    while workdir.exists():
        n += 1
        workdir = tmp / f"{name}:{workload}.{n}"
    workdir.mkdir()
    PC.set_workload(args, workload, tmp)
    out: dict = {"target": name, "workload": workload}
    with C.Procs() as procs:
        root, pid, extra = PC.start_target(name, procs, workdir, up_port, args)
        PC.verify(root, body, extra.get("cafile"))
        url = root + PC.WORKLOADS[workload][0]
        if args.warmup > 0:
            PC.run_wrk(url, args, args.warmup, args.load_cpu)
        proxy_pids = C.tree_pids(pid) if pid else []
        up_pids = C.tree_pids(up_pid)
        argv = _wrk_argv(url, args, args.duration)
        ng = _perf_p(EVENTS, up_pids, workdir / "nginx-stat.txt")
        px = _perf_p(EVENTS, proxy_pids, workdir / "proxy-stat.txt") if proxy_pids else None
        time.sleep(0.3)
        up0 = C.cpu_seconds(up_pids)
        pr0 = C.cpu_seconds(proxy_pids) if proxy_pids else 0
        cpu0 = C.cpu_times()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        res, ut, st = _run_wrk(argv, workdir / "wrk-stat.txt", None)
        cpu1 = C.cpu_times()
        up1 = C.cpu_seconds(up_pids)
        pr1 = C.cpu_seconds(proxy_pids) if proxy_pids else 0
        _stop(ng)
        if px is not None:
            _stop(px)
        mib = res["requests"] * args.body_bytes_per_req / 1048576
        out.update(requests=res["requests"], req_per_s=res["req_per_s"], mib=mib,
                   mib_per_s=res["req_per_s"] * args.body_bytes_per_req / 1048576,
                   errors=res["non_2xx"] + res["socket_errors"])
        out["wrk_user_ms"] = (ut - before.ru_utime) * 1000 / mib
        out["wrk_sys_ms"] = (st - before.ru_stime) * 1000 / mib
        out["nginx_ms"] = (up1 - up0) * 1000 / mib
        out["proxy_ms"] = (pr1 - pr0) * 1000 / mib
        out["load_cpu_busy"] = C.cpu_busy(cpu0, cpu1, args.load_cpu).get("busy")
        out["proxy_cpu_busy"] = C.cpu_busy(cpu0, cpu1, args.proxy_cpu).get("busy")
        for who in ("wrk", "nginx", "proxy"):
            f = workdir / f"{who}-stat.txt"
            if f.exists():
                c = _counts(f)
                out[f"{who}_task_ms"] = c.pop("task-clock", 0) / mib
                out[f"{who}_per_mib"] = {k: v / mib for k, v in
                                         sorted(c.items(), key=lambda kv: -kv[1])}
        if args.sizes:
            rec = workdir / "wrk.data"
            ngrec = workdir / "nginx.data"
            ev = []
            for s in S.SIZED + S.WAITS + ["sendfile64"]:
                ev += ["-e", f"syscalls:sys_enter_{s}", "-e", f"syscalls:sys_exit_{s}"]
            ngp = subprocess.Popen(["perf", "record", "-q", "-m", "8M", "-o", str(ngrec),
                                    "-p", ",".join(map(str, up_pids))] + ev,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(0.3)
            res2, _, _ = _run_wrk(_wrk_argv(url, args, min(args.duration, 3)), workdir / "x",
                                  rec)
            _stop(ngp)
            mib2 = res2["requests"] * args.body_bytes_per_req / 1048576
            out["wrk_sizes"] = _fd_sizes(rec, mib2)
            out["nginx_sizes"] = _fd_sizes(ngrec, mib2)
        if args.profile:
            prof = workdir / "wrk-prof.data"
            ngprof = workdir / "nginx-prof.data"
            ngp = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-o", str(ngprof),
                                    "-p", ",".join(map(str, up_pids))],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(0.3)
            subprocess.run(["perf", "record", "-q", "-F", "2000", "-o", str(prof), "--"]
                           + _wrk_argv(url, args, min(args.duration, 4)),
                           capture_output=True, text=True, timeout=120)
            _stop(ngp)
            out["wrk_profile"] = S._profile(prof)
            out["nginx_profile"] = S._profile(ngprof)
        out["cipher"] = _cipher(root, extra.get("cafile"))
        PC.verify(root, body, extra.get("cafile"))
    return out


def _cipher(root: str, cafile: str | None) -> str | None:
    """The TLS version and cipher an OpenSSL client with default settings gets."""
    if not root.startswith("https://"):
        return None
    import socket
    import ssl
    from urllib.parse import urlsplit
    u = urlsplit(root)
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", u.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=u.hostname) as s:
            return f"{s.version()} {s.cipher()[0]}"


def show(r: dict) -> None:
    print(f"\n== {r['target']}:{r['workload']}: {r['requests']} responses, {r['mib']:.0f} MiB, "
          f"{r['mib_per_s']:.1f} MiB/s, {r['errors']} errors; load CPU "
          f"{(r['load_cpu_busy'] or 0) * 100:.0f}% busy, proxy CPU {(r['proxy_cpu_busy'] or 0) * 100:.0f}%")
    print(f"   wrk   CPU ms/MiB: user {r['wrk_user_ms']:.3f} system {r['wrk_sys_ms']:.3f} "
          f"(task-clock {r.get('wrk_task_ms', 0):.3f})")
    print(f"   nginx CPU ms/MiB: {r['nginx_ms']:.3f} (task-clock {r.get('nginx_task_ms', 0):.3f})")
    print(f"   proxy CPU ms/MiB: {r['proxy_ms']:.3f} (task-clock {r.get('proxy_task_ms', 0):.3f})")
    for who in ("wrk", "nginx", "proxy"):
        pm = r.get(f"{who}_per_mib")
        if pm:
            print(f"   {who:5s} per MiB: " + ", ".join(f"{k} {v:.2f}" for k, v in pm.items()
                                                    if v >= 0.05))
    print(f"   negotiated: {r.get('cipher')}")
    for who in ("wrk", "nginx"):
        if r.get(f"{who}_profile"):
            print(f"   {who} profile:\n" + r[f"{who}_profile"])
    for who in ("wrk", "nginx"):
        for sc, s in r.get(f"{who}_sizes", {}).items():
            print(f"   {who:5s} {sc:14s} {s['calls_per_mib']:8.2f}/MiB "
                  f"({s['failed_or_0_per_mib']:.2f} <=0) mean {s['mean']:.0f}  {s['top_sizes']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    PC.add_run_args(ap, "get1m")
    ap.add_argument("--sizes", action="store_true",
                    help="also record wrk's and nginx's read/write sizes (a further short run)")
    ap.add_argument("--profile", action="store_true",
                    help="also a flat perf profile of wrk and of nginx (a further short run)")
    ap.add_argument("--upstream-sendfile", action="store_true",
                    help="the nginx upstream sends its files with sendfile()")
    args = ap.parse_args(argv)
    return PC.run_each(args, "mproxy-load-", lambda t, w, tmp, upstream, port, body: show(
        measure(t, w, tmp, upstream.pid, port, body, args)), sendfile=args.upstream_sendfile)


if __name__ == "__main__":
    sys.exit(main())
