#!/usr/bin/env python3
"""System calls, context switches and socket I/O sizes per MiB of body (perf).

For each target (proxy_cpu.py's names: mproxy-tls, caddy-tls, mproxy@LABEL,
...) and body workload (get64k, get1m, post1m) this starts the same nginx
upstream and proxy as proxy_cpu.py (the proxy pinned to --proxy-cpu, wrk and
the upstream to --load-cpu), warms up, then runs wrk for --duration seconds
while perf watches every process of the proxy:

  * `perf stat`: task-clock, context switches, CPU migrations and every
    `syscalls:sys_enter_*` tracepoint (counts);
  * `perf record` of the read/write-like system calls' enter and exit
    tracepoints: each call's file descriptor and result, so the sizes can
    be split by socket (client side: the listening port's peer; upstream
    side) and given as a histogram;
  * utime/stime of the proxy's processes from /proc (the user/system split).

Everything is printed per MiB of body (wrk's completed requests x body
size), so runs of different lengths and speeds compare.  Counts of system
calls per MiB do not depend on how loaded the machine is as much as CPU
time does, but they do depend on timing (how much is waiting per wake-up):
compare runs made under similar load.

--kernel-events adds kernel tracepoint counts to perf stat's (packets
sent, loopback deliveries, softirqs, sockets told data is ready, wake-ups):
work a proxy's system calls cause in the kernel beyond the calls themselves
(on loopback the receiving socket's TCP work runs in the sender's context).
--no-sizes counts only; --profile takes a flat perf profile of the proxy
instead of the sizes (--callgraph: with DWARF call graphs), --pyspy a py-spy
profile of its busiest process (samples holding the GIL only).  perf's
tracepoints cost each system call a little: a proxy that makes many (Caddy
writes each TLS record on its own) loses more CPU to them than one that
makes few, so take CPU figures from proxy_cpu.py.

Usage: python3 bench/syscalls_per_mib.py --targets mproxy-tls,caddy-tls \\
           --workloads get64k,get1m [--duration 5] [--mproxy-tree before=DIR]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import proxy_cpu as PC  # noqa: E402

#: system calls whose enter/exit pairs are recorded (fd, size)
SIZED = ["read", "write", "recvfrom", "sendto", "sendmsg", "recvmsg", "writev", "readv"]
WAITS = ["epoll_wait", "epoll_pwait", "epoll_pwait2"]
#: --kernel-events: tracepoints counted beside the system calls
KERNEL_EVENTS = ["net:net_dev_xmit", "net:netif_rx", "irq:softirq_entry", "sock:sk_data_ready",
                 "sched:sched_waking", "skb:consume_skb"]


def _sockets(pids: list[int]) -> dict[tuple[int, int], str]:
    """(pid, fd) -> "lport:rport" of the TCP sockets the processes hold."""
    inodes: dict[str, tuple[int, int]] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                m = re.match(r"socket:\[(\d+)\]", link)
                if m:
                    inodes[m.group(1)] = (pid, int(fd))
        except OSError:
            continue
    out: dict[tuple[int, int], str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                lport = int(f[1].rsplit(":", 1)[1], 16)
                rport = int(f[2].rsplit(":", 1)[1], 16)
                out[inodes[f[9]]] = f"{lport}:{rport}"
    return out


def _side(ports: str | None, proxy_port: int, upstream_port: int) -> str:
    if ports is None:
        return "other"
    lport, rport = (int(x) for x in ports.split(":"))
    if lport == proxy_port:
        return "client"
    if rport == upstream_port:
        return "upstream"
    return "other"


def _bucket(n: int) -> str:
    if n <= 0:
        return "<=0"
    for limit, name in ((1024, "<1K"), (4096, "<4K"), (16384, "<16K"), (16406, "16K rec"),
                        (65536, "<64K"), (131072, "<128K"), (262144, "<256K")):
        if n < limit:
            return name
    return ">=256K"


def measure(name: str, workload: str, tmp: Path, upstream, up_port: int, body: bytes,
            args) -> dict:
    workdir = tmp / f"{name}:{workload}"
    n = 1
    while workdir.exists():
        n += 1
        workdir = tmp / f"{name}:{workload}.{n}"
    workdir.mkdir()
    PC.set_workload(args, workload, tmp)
    with C.Procs() as procs:
        root, pid, extra = PC.start_target(name, procs, workdir, up_port, args)
        PC.verify(root, body, extra.get("cafile"))
        url = root + PC.WORKLOADS[workload][0]
        proxy_port = int(root.rstrip("/").rsplit(":", 1)[1])
        pids = C.tree_pids(pid)
        w0 = {p: sum(_times(p)) for p in pids}
        if args.warmup > 0:
            PC.run_wrk(url, args, args.warmup, args.load_cpu)
        pids = C.tree_pids(pid)
        # perf watches every process of the proxy
        pid_list = ",".join(str(p) for p in pids)
        stat_out = workdir / "perf-stat.txt"
        rec_out = workdir / "perf.data"
        events = ["task-clock", "context-switches", "cpu-migrations", "page-faults"]
        if args.kernel_events:
            events += KERNEL_EVENTS
        events.append("syscalls:sys_enter_*")
        stat = subprocess.Popen(["perf", "stat", "-x", ";", "-o", str(stat_out),
                                 "-e", ",".join(events), "-p", pid_list],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        rec_events = []
        for s in SIZED + WAITS:
            rec_events += ["-e", f"syscalls:sys_enter_{s}", "-e", f"syscalls:sys_exit_{s}"]
        rec = None
        if args.pyspy:
            busiest = max(pids, key=lambda p: sum(_times(p)) - w0.get(p, 0))
            rec = subprocess.Popen(["py-spy", "record", "-r", "500", "-f", "raw", "-o",
                                    str(workdir / "pyspy.txt"), "-d", str(int(args.duration)),
                                    "--gil", "-p", str(busiest)] + (["--native"] if args.native else []),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        elif args.profile:
            rec = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-o",
                                    str(workdir / "perf-prof.data"), "-p", pid_list]
                                   + (["--call-graph", "dwarf,32768"] if args.callgraph else []),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        elif not args.no_sizes:
            rec = subprocess.Popen(["perf", "record", "-q", "-o", str(rec_out), "-p", pid_list,
                                    "-m", "4M"] + rec_events,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)
        socks = _sockets(pids)
        # the load's connections exist only while it runs: look half-way
        sampler = threading.Timer(args.duration / 2, lambda: socks.update(_sockets(pids)))
        sampler.start()
        t0 = {p: _times(p) for p in pids}
        try:
            res = PC.run_wrk(url, args, args.duration, args.load_cpu)
        finally:
            sampler.cancel()
        t1 = {p: _times(p) for p in pids}
        for p in (stat, rec):
            if p is not None:
                os.kill(p.pid, signal.SIGINT)
        for p in (stat, rec):
            if p is not None:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        PC.verify(root, body, extra.get("cafile"))
    mib = res["requests"] * args.body_bytes_per_req / 1048576
    out: dict = {"target": name, "workload": workload, "requests": res["requests"],
                 "mib": round(mib, 2), "req_per_s": res["req_per_s"],
                 "non_2xx": res["non_2xx"], "socket_errors": res["socket_errors"]}
    user = sum(t1[p][0] - t0[p][0] for p in pids if p in t1 and p in t0)
    system = sum(t1[p][1] - t0[p][1] for p in pids if p in t1 and p in t0)
    out["user_ms_per_mib"] = user * 1000 / mib
    out["sys_ms_per_mib"] = system * 1000 / mib
    counts: dict[str, float] = {}
    for line in stat_out.read_text().splitlines():
        f = line.split(";")
        if len(f) < 3 or not f[0] or f[0].startswith("<"):
            continue
        try:
            v = float(f[0])
        except ValueError:
            continue
        ev = f[2].replace("syscalls:sys_enter_", "")
        if v:
            counts[ev] = v
    out["task_clock_ms_per_mib"] = counts.pop("task-clock", 0) / mib
    out["per_mib"] = {k: v / mib for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    out["syscalls_per_mib"] = sum(v for k, v in counts.items()
                                  if k not in ("context-switches", "cpu-migrations",
                                               "page-faults") and ":" not in k) / mib
    if rec is not None and args.pyspy:
        out["profile"] = _pyspy(workdir / "pyspy.txt")
    elif rec is not None and args.profile:
        out["profile"] = _profile(workdir / "perf-prof.data")
    elif rec is not None:
        out["sizes"] = _sizes(rec_out, socks, proxy_port, up_port, mib)
    return out


def _profile(data: Path) -> str:
    """The flat profile: shares by shared object, then the top symbols."""
    out = []
    for sort, n in (("dso", 12), ("dso,sym", 40)):
        r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", sort,
                            "--percent-limit", "0.5"],
                           capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stdout.splitlines() if x.strip() and not x.startswith("#")]
        out += lines[:n]
    return "\n".join(out)


def _pyspy(path: Path, n: int = 45) -> str:
    """py-spy's raw stacks: the functions by self share, then by total share."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    all_ = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        all_ += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    out = ["   self:"] + [f"   {v * 100 / all_:6.2f}%  {k}" for k, v in own.most_common(n)]
    out += ["   total:"] + [f"   {v * 100 / all_:6.2f}%  {k}" for k, v in total.most_common(n)]
    return "\n".join(out)


def _times(pid: int) -> tuple[float, float]:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return (0.0, 0.0)
    f = data[data.rfind(")") + 2:].split()
    return int(f[11]) / C.CLK_TCK, int(f[12]) / C.CLK_TCK


_LINE = re.compile(r"^\s*\S+\s+(\d+)(?:/(\d+))?\s.*?syscalls:sys_(enter|exit)_(\w+):\s*(.*)$")


def _sizes(data: Path, socks: dict, proxy_port: int, up_port: int, mib: float) -> dict:
    """Per (side, syscall): calls per MiB, bytes per call, size histogram;
    epoll waits per MiB and the events they returned."""
    r = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,event,trace"],
                       capture_output=True, text=True, timeout=300)
    pending: dict[int, tuple[str, int, int]] = {}
    calls: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for line in r.stdout.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid = int(m.group(1))
        tid = int(m.group(2) or m.group(1))
        kind, sc, rest = m.group(3), m.group(4), m.group(5)
        if kind == "enter":
            fm = re.search(r"fd: (0x[0-9a-f]+|\d+)", rest)
            fd = int(fm.group(1), 0) if fm else -1
            pending[tid] = (sc, fd if sc not in WAITS else -1, pid)
            continue
        got = pending.pop(tid, None)
        if got is None or got[0] != sc:
            continue
        rm = re.search(r"0x([0-9a-f]+)", rest)
        ret = int(rm.group(1), 16) if rm else 0
        if ret >= 1 << 63:
            ret -= 1 << 64
        if sc in WAITS:
            side = "epoll"
        else:
            side = _side(socks.get((got[2], got[1])), proxy_port, up_port)
        calls[(side, sc)].append(ret)
    out = {}
    for (side, sc), rets in sorted(calls.items()):
        good = [x for x in rets if x > 0]
        hist = collections.Counter(_bucket(x) for x in rets)
        out[f"{side}:{sc}"] = {
            "calls_per_mib": round(len(rets) / mib, 2),
            "failed_or_0_per_mib": round(sum(1 for x in rets if x <= 0) / mib, 2),
            "mean_bytes": round(sum(good) / len(good)) if good and sc not in WAITS else None,
            "mean_events": round(sum(good) / len(good), 2) if good and sc in WAITS else None,
            "hist_per_mib": {k: round(v / mib, 2) for k, v in sorted(hist.items())},
        }
    return out


def show(r: dict) -> None:
    print(f"\n== {r['target']}:{r['workload']}: {r['requests']} responses, {r['mib']} MiB, "
          f"{r['req_per_s']:.0f} req/s"
          + (f", {r['non_2xx']} non-2xx" if r["non_2xx"] else "")
          + (f", {r['socket_errors']} socket errors" if r["socket_errors"] else ""))
    print(f"   CPU ms/MiB: user {r['user_ms_per_mib']:.3f}  system {r['sys_ms_per_mib']:.3f}  "
          f"(task-clock {r['task_clock_ms_per_mib']:.3f}); system calls {r['syscalls_per_mib']:.2f}"
          " per MiB")
    print("   per MiB: " + ", ".join(f"{k} {v:.2f}" for k, v in r["per_mib"].items()
                                     if v >= 0.05))
    if "profile" in r:
        print(r["profile"])
    for key, s in r.get("sizes", {}).items():
        size = (f"mean {s['mean_bytes']} B" if s["mean_bytes"] is not None else
                f"mean {s['mean_events']} events" if s["mean_events"] is not None else "")
        print(f"   {key:22s} {s['calls_per_mib']:8.2f}/MiB ({s['failed_or_0_per_mib']:.2f} "
              f"<=0) {size}  {s['hist_per_mib']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    PC.add_run_args(ap, "get64k,get1m")
    ap.add_argument("--kernel-events", action="store_true",
                    help="also count packets, softirqs, data-ready calls and wake-ups")
    ap.add_argument("--no-sizes", action="store_true",
                    help="counts only (no perf record of each call)")
    ap.add_argument("--profile", action="store_true",
                    help="perf record (flat, 2 kHz) instead of the sizes")
    ap.add_argument("--pyspy", action="store_true",
                    help="py-spy the busiest process (raw stacks, 500 Hz)")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--callgraph", action="store_true",
                    help="with --profile: DWARF call graphs (perf.data kept with --keep-tmp)")
    args = ap.parse_args(argv)
    return PC.run_each(args, "mproxy-sys-", lambda t, w, tmp, upstream, port, body: show(
        measure(t, w, tmp, upstream, port, body, args)))


if __name__ == "__main__":
    sys.exit(main())
