#!/usr/bin/env python3
"""System calls, context switches and CPU split per MiB of body (perf stat, strace).

Where CPU time is spent in the kernel, instruction counts of the proxy's
own code (proxy_instructions.py) do not show it: this script counts, for
one proxy process pinned to its CPU under proxy_cpu.py's load (wrk, the
same nginx upstream, the same workloads), the system calls it makes
(`perf stat` on the syscall tracepoints), its context switches, and its
user and system CPU time, each per request and per MiB of body.  With
--strace SECONDS it also records a few seconds of the socket reads and
writes (`strace`) and prints their sizes, split into the client side and
the upstream side (by the peer port `ss` shows for each descriptor).

The counts depend little on the machine's load (they are per request),
the CPU split somewhat more; the figures are for A/B comparison, in one run.

Usage: python3 bench/syscall_counts.py --targets mproxy-tls,caddy-tls \\
           [--workload post1m] [--duration 10] [--strace 3] \\
           [--mproxy-tree before=/path/a]   # then target mproxy-tls@before
See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from proxy_cpu import (  # noqa: E402
    WORKLOADS, run_wrk, set_workload, start_target, tree_command, verify)

#: the system calls counted one by one (the total is counted too)
SYSCALLS = ("read", "recvfrom", "recvmsg", "readv", "write", "sendto", "sendmsg", "writev",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "nanosleep", "getpid", "mmap",
            "munmap", "mremap", "brk")
SOCKET_IO = ("read", "recvfrom", "recvmsg", "readv", "write", "sendto", "sendmsg", "writev")


def thread_ids(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            out.extend(int(t.name) for t in Path(f"/proc/{p}/task").iterdir())
        except OSError:
            pass
    return out


def split_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the live processes in `pids`."""
    u = s = 0
    for p in pids:
        try:
            data = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        f = data[data.rfind(")") + 2:].split()
        u += int(f[11])
        s += int(f[12])
    return u / C.CLK_TCK, s / C.CLK_TCK


def perf_stat(tids: list[int], duration: float, out: Path) -> subprocess.Popen:
    events = ["task-clock", "context-switches", "cpu-migrations", "page-faults",
              "raw_syscalls:sys_enter"]
    events += [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
    available = Path("/sys/kernel/tracing/available_events")
    if available.exists():
        have = set(available.read_text().split())
        events = [e for e in events if ":" not in e or e in have]
    argv = ["perf", "stat", "-x", ",", "-o", str(out), "-t", ",".join(map(str, tids))]
    for e in events:
        argv += ["-e", e]
    argv += ["--", "sleep", f"{duration:g}"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def parse_perf(path: Path) -> dict[str, float]:
    res: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or not parts[0] or line.startswith("#"):
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        name = parts[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter",
                                                                    "syscalls")
        res[name] = res.get(name, 0) + value
    return res


def socket_peers(pids: list[int]) -> dict[int, int]:
    """fd -> peer port of each TCP socket of the processes (`ss -tnp`)."""
    r = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, timeout=30)
    out: dict[int, int] = {}
    wanted = set(pids)
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        peer = cols[4].rpartition(":")[2]
        for pid, fd in re.findall(r"pid=(\d+),fd=(\d+)", line):
            if int(pid) in wanted and peer.isdigit():
                out[int(fd)] = int(peer)
    return out


_STRACE_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((\d+),.*\)\s+=\s+(-?\d+)")


def strace_sizes(pids: list[int], seconds: float, out: Path, upstream_port: int,
                 result: dict) -> None:
    """Record `seconds` of socket I/O of `pids`; put per (side, call) the
    number of calls, bytes, and size percentiles into `result`."""
    argv = ["strace", "-f", "-qq", "-o", str(out), "-e",
            "trace=" + ",".join(SOCKET_IO)]
    for p in pids:
        argv += ["-p", str(p)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(seconds / 2)
    peers = socket_peers(pids)
    time.sleep(seconds / 2)
    proc.terminate()
    proc.wait(10)
    sizes: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for line in out.read_text(errors="replace").splitlines():
        m = _STRACE_LINE.match(line)
        if not m:
            continue
        call, fd, ret = m.group(1), int(m.group(2)), int(m.group(3))
        peer = peers.get(fd)
        side = ("upstream" if peer == upstream_port else
                "client" if peer is not None else "other")
        sizes[(side, call)].append(ret)
    for (side, call), vals in sorted(sizes.items()):
        ok = sorted(v for v in vals if v >= 0)
        failed = len(vals) - len(ok)
        pct = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]) if ok else (lambda q: 0)
        result[f"{side}.{call}"] = {
            "calls": len(vals), "failed": failed, "bytes": sum(ok),
            "p10": pct(0.10), "p50": pct(0.5), "p90": pct(0.9), "max": ok[-1] if ok else 0}


def measure_target(name: str, tmp: Path, upstream, up_port: int, body: bytes, args) -> dict:
    workdir = tmp / name.replace("@", "_")
    n = 1
    while workdir.exists():
        n += 1
        workdir = tmp / f"{name.replace('@', '_')}.{n}"
    workdir.mkdir()
    path = WORKLOADS[args.workload][0]
    with C.Procs() as procs:
        root, pid, extra = start_target(name, procs, workdir, up_port, args)
        verify(root, body, extra.get("cafile"))
        url = root + path
        if args.warmup > 0:
            run_wrk(url, args, args.warmup, args.load_cpu)
        pids = C.tree_pids(pid)
        tids = thread_ids(pids)
        u0, s0 = split_times(pids)
        perf_out = workdir / "perf.csv"
        perf = perf_stat(tids, args.duration, perf_out)
        res = run_wrk(url, args, args.duration, args.load_cpu)
        perf.wait(args.duration + 30)
        u1, s1 = split_times(pids)
        counts = parse_perf(perf_out)
        sizes: dict = {}
        if args.strace > 0:
            t = threading.Thread(target=strace_sizes, args=(
                pids, args.strace, workdir / "strace.txt", up_port, sizes))
            t.start()
            strace_res = run_wrk(url, args, args.strace, args.load_cpu)
            t.join()
            sizes["requests"] = strace_res["requests"]
        profile = ""
        if args.perf_record > 0:
            data = workdir / "perf.data"
            rec = subprocess.Popen(
                ["perf", "record", "-q", "-o", str(data), "-F", "2000", "-g",
                 "-t", ",".join(map(str, tids)), "--", "sleep", f"{args.perf_record:g}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run_wrk(url, args, args.perf_record, args.load_cpu)
            rec.wait(args.perf_record + 60)
            rep = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--stdio", "-g", "none",
                 "--percent-limit", "0.7", "--sort", "dso,sym"],
                capture_output=True, text=True, timeout=300)
            profile = "\n".join(l for l in rep.stdout.splitlines()
                                if l.strip() and not l.startswith("#"))
        verify(root, body, extra.get("cafile"))
    reqs = max(res["requests"], 1)
    mib = reqs * args.body_bytes_per_req / 1048576 if args.body_bytes_per_req else None
    return {"target": name, "requests": res["requests"], "req_per_s": res["req_per_s"],
            "user_s": u1 - u0, "sys_s": s1 - s0, "counts": counts, "mib": mib,
            "sizes": sizes, "profile": profile}


def report(results: list[dict], per_mib: bool) -> str:
    unit = "MiB" if per_mib else "request"
    keys = ["task-clock", "context-switches", "cpu-migrations", "page-faults", "syscalls"] + list(SYSCALLS)
    keys = [k for k in keys if any(r["counts"].get(k) for r in results)]
    width = max(len(r["target"]) for r in results) + 2
    lines = [f"per {unit}:".ljust(22) + "".join(r["target"].rjust(width) for r in results)]

    def per(r: dict, v: float) -> float:
        d = r["mib"] if per_mib else max(r["requests"], 1)
        return v / d if d else 0.0

    lines.append("requests".ljust(22) + "".join(f"{r['requests']:>{width}}" for r in results))
    lines.append("req/s".ljust(22) + "".join(f"{r['req_per_s']:>{width}.1f}" for r in results))
    for label, key in (("user ms", "user_s"), ("system ms", "sys_s")):
        lines.append(label.ljust(22) + "".join(
            f"{per(r, r[key]) * 1000:>{width}.2f}" for r in results))
    for k in keys:
        name = "task-clock ms" if k == "task-clock" else k
        lines.append(name.ljust(22) + "".join(
            f"{per(r, r['counts'].get(k, 0)):>{width}.1f}" for r in results))
    for r in results:
        sizes = r["sizes"]
        if not sizes:
            continue
        n = max(sizes.get("requests", 1), 1)
        lines.append(f"\n{r['target']}: socket I/O sizes over {n} requests (strace; "
                     "per request: calls, bytes; sizes p10/p50/p90/max; failed = EAGAIN etc.)")
        for key, v in sizes.items():
            if key == "requests":
                continue
            lines.append(f"  {key:<22} {v['calls'] / n:8.1f} calls {v['bytes'] / n:10.0f} B"
                         f"  {v['p10']}/{v['p50']}/{v['p90']}/{v['max']}"
                         f"  failed {v['failed'] / n:.1f}")
    for r in results:
        if r.get("profile"):
            lines.append(f"\n{r['target']}: perf record (self time, dso/symbol >= 0.7 %)")
            lines.append(r["profile"])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="mproxy-tls,caddy-tls")
    ap.add_argument("--workload", default="post1m", choices=[w for w in WORKLOADS if w != "rate"])
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--connections", "-c", type=int, default=50)
    ap.add_argument("--threads", "-t", type=int, default=1)
    ap.add_argument("--body-size", type=int, default=128)
    ap.add_argument("--strace", type=float, default=0, metavar="SECONDS",
                    help="also record this many seconds of socket I/O sizes (strace)")
    ap.add_argument("--perf-record", type=float, default=0, metavar="SECONDS",
                    help="also profile this many seconds (perf record -g; self time by symbol)")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--mproxy-cmd")
    ap.add_argument("--mproxy-tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the targets this many times")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    # proxy_cpu.set_workload's settings for the rate workload (not run here)
    args.realtime = 0
    args.awake = 0
    args.rate_duration = args.duration
    C.install_signal_handlers()
    for tool in ("wrk", "nginx", "perf") + (("strace", "ss") if args.strace else ()):
        if not shutil.which(tool):
            C.log(f"error: {tool} not found")
            return 1
    args.mproxy_trees = {}
    for spec in args.mproxy_tree:
        label, sep, directory = spec.partition("=")
        if not sep:
            ap.error(f"--mproxy-tree wants LABEL=DIR, not {spec!r}")
        args.mproxy_trees[label] = tree_command(directory)
    args.mproxy_argv = C.mproxy_command(args.mproxy_cmd)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    filler = b"Hello from the upstream! " * ((args.body_size // 25) + 1)
    body = filler[:args.body_size - 1] + b"\n"
    tmp = Path(tempfile.mkdtemp(prefix="mproxy-syscalls-"))
    results: list[dict] = []
    try:
        set_workload(args, args.workload, tmp)
        with C.Procs() as procs:
            (up_port,) = C.free_ports(1)
            conf = C.nginx_upstream_config(tmp / "upstream", up_port, body)
            upstream = procs.start("upstream", C.pin_prefix(args.load_cpu) + C.nginx_argv(conf),
                                   tmp / "upstream")
            C.wait_port(up_port, 15, upstream)
            for round_no in range(args.rounds):
                order = targets if round_no % 2 == 0 else targets[::-1]
                for t in order:
                    C.log(f"{t}: {args.workload}, {args.duration:g} s")
                    r = measure_target(t, tmp, upstream, up_port, body, args)
                    r["target"] = f"{t}#{round_no + 1}" if args.rounds > 1 else t
                    results.append(r)
    except KeyboardInterrupt:
        C.log("interrupted")
        return 130
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results.sort(key=lambda r: r["target"])
    print(f"\n{args.workload}, wrk -c{args.connections} -d{args.duration:g}s, proxy on CPU "
          f"{args.proxy_cpu}")
    print(report(results, per_mib=bool(args.body_bytes_per_req)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
