#!/usr/bin/env python3
"""Zero-downtime check: redeploy back and forth under load, killing the old
instance as soon as `mproxy deploy` returns.

  wrk (keepalive, N connections) -> mproxy -> upstream A | upstream B

Two nginx upstreams (A and B, bodies "A"/"B", /up -> 200) and mproxy are
started; A is deployed. wrk runs for --duration seconds. Meanwhile, every
duration/(deploys+1) seconds the idle upstream is (re)started, deployed with
`mproxy deploy`, and, as soon as that command returns, the previous upstream
is stopped hard (nginx SIGTERM = fast shutdown, open connections dropped):
the seed README says that is safe. Afterwards wrk must report no socket
errors and no non-2xx responses, and mproxy's request log must show only
status 200.

Usage: python3 bench/deploy_under_load.py [--duration 30] [--deploys 5]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from proxy_cpu import parse_wrk  # noqa: E402


def log_time(value: str) -> float:
    """Epoch seconds from an RFC 3339 log time (up to nanoseconds)."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", value)
    if not m:
        return 0.0
    frac = (m.group(2) or ".0")[:7]
    zone = m.group(3).replace("Z", "+00:00") or "+00:00"
    return datetime.fromisoformat(m.group(1) + frac + zone).timestamp()


def start_upstream(procs: C.Procs, tmp: Path, name: str, port: int, cpu: int,
                   slow: bool = False) -> C.Proc:
    """nginx (fast) or, with slow=True, bench/body_upstream.py (serves /slow)."""
    (tmp / name).mkdir(parents=True, exist_ok=True)
    if slow:
        argv = [sys.executable, str(C.BENCH_DIR / "body_upstream.py"), "--port", str(port),
                "--name", name]
    else:
        argv = C.nginx_argv(C.nginx_upstream_config(tmp / name, port, f"{name}\n".encode()))
    p = procs.start(f"upstream-{name}-{int(time.monotonic() * 1000)}",
                    C.pin_prefix(cpu) + argv, tmp / name)
    C.wait_port(port, 15, p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30, help="seconds of load")
    ap.add_argument("--deploys", type=int, default=5, help="deploys during the load")
    ap.add_argument("--connections", "-c", type=int, default=50)
    ap.add_argument("--slow-ms", type=int, default=0,
                    help="every request takes this long at the upstream (Twisted upstreams "
                         "serving /slow?ms=N instead of nginx), so each deploy has to drain "
                         "in-flight requests before returning")
    ap.add_argument("--keep-old", action="store_true",
                    help="do not stop the old upstream after each deploy")
    ap.add_argument("--deploy-args", default="",
                    help="extra arguments for `mproxy deploy`, e.g. '--drain-timeout 5s'")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--mproxy-cmd", help="command to run the mproxy CLI "
                    "(default: $MPROXY_CMD, else this checkout, else `mproxy` on PATH)")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    C.install_signal_handlers()
    if C.cpu_count() < 2:
        args.proxy_cpu = args.load_cpu = -1
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            C.log(f"error: {tool} not found")
            return 1
    cmd, env = C.mproxy_command(args.mproxy_cmd)
    if cmd is None:
        C.log("error: mproxy CLI not available (pip install -e . or --mproxy-cmd)")
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="mproxy-deploy-load-"))
    rc = 0
    deploys = []
    result: dict = {}
    try:
        with C.Procs() as procs:
            ports = dict(zip("AB", C.free_ports(2), strict=True))
            slow = args.slow_ms > 0
            running = {"A": start_upstream(procs, tmp, "A", ports["A"], args.load_cpu, slow)}
            mp = C.MProxy(procs, cmd, env, tmp / "mproxy", args.proxy_cpu)
            extra = args.deploy_args.split() if args.deploy_args else []
            mp.deploy(f"{C.HOST}:{ports['A']}", extra)
            current = "A"
            url = f"http://{C.HOST}:{mp.http_port}/"
            if slow:
                url += f"slow?ms={args.slow_ms}"
            status, body = C.http_get(url)
            if status != 200 or body != b"A\n":
                raise C.BenchError(f"GET {url} -> {status} {body[:100]!r}, expected A")

            wrk_argv = C.pin_prefix(args.load_cpu) + [
                "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration:g}s",
                "--timeout", "10s", "--latency", url]
            C.log(f"load: {' '.join(wrk_argv)}")
            wrk_out = tmp / "wrk.out"
            with open(wrk_out, "w") as out:
                wrk = subprocess.Popen(wrk_argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            procs.callback(lambda: wrk.poll() is None and wrk.kill())
            t0 = time.monotonic()
            wall0 = time.time()
            step = args.duration / (args.deploys + 1)
            for i in range(args.deploys):
                time.sleep(max(0.0, t0 + step * (i + 1) - time.monotonic()))
                new = "B" if current == "A" else "A"
                if new not in running:
                    running[new] = start_upstream(procs, tmp, new, ports[new], args.load_cpu,
                                                  slow)
                d0 = time.monotonic()
                try:
                    mp.deploy(f"{C.HOST}:{ports[new]}", extra)
                    ok, err = True, None
                except (C.BenchError, subprocess.SubprocessError) as e:
                    ok, err = False, str(e).splitlines()[0]
                    rc = 1
                took = time.monotonic() - d0
                stopped = False
                if ok and not args.keep_old:
                    running.pop(current).stop()
                    stopped = True
                deploys.append({"at_s": round(d0 - t0, 2), "from": current, "to": new,
                                "ok": ok, "error": err, "deploy_seconds": round(took, 3),
                                "old_stopped": stopped})
                C.log(f"deploy {i + 1}/{args.deploys}: {current} -> {new} "
                      f"{'ok' if ok else 'FAILED: ' + str(err)} in {took:.2f}s"
                      + ("; old upstream stopped" if stopped else ""))
                if ok:
                    current = new
            try:
                wrk.wait(timeout=args.duration + 60)
            except subprocess.TimeoutExpired:
                raise C.BenchError("wrk did not finish") from None
            w = parse_wrk(wrk_out.read_text())
            statuses: collections.Counter = collections.Counter()
            targets: collections.Counter = collections.Counter()
            # wrk closes its connections when the time is up; requests then in
            # flight are logged 499 (client gone). Those are not deploy failures.
            wrk_stop = wall0 + args.duration - 0.5
            at_stop = 0
            with open(mp.proc.stdout_path, "rb") as f:
                for line in f:
                    if b'"Request"' not in line:
                        continue
                    rec = json.loads(line)
                    if rec.get("status") == 499 and log_time(rec.get("time", "")) >= wrk_stop:
                        at_stop += 1
                        continue
                    statuses[rec.get("status")] += 1
                    targets[rec.get("target")] += 1
            bad_status = {k: v for k, v in statuses.items() if k != 200}
            result = {"wrk": w, "deploys": deploys, "log_statuses": dict(statuses),
                      "log_targets": dict(targets), "log_499_at_wrk_stop": at_stop}
            print()
            print(f"{args.duration:g}s of wrk -c{args.connections} through mproxy"
                  f"{f' to {args.slow_ms} ms requests' if slow else ''}, "
                  f"{len(deploys)} deploys, old upstream "
                  f"{'kept' if args.keep_old else 'stopped right after each deploy'}")
            print(f"  requests: {w['requests']} ({w['req_per_s']:.0f}/s), "
                  f"non-2xx: {w['non_2xx']}, socket errors: {w['socket_errors']}, "
                  f"p99 {w.get('latency_p99_ms', 0):.1f} ms, "
                  f"max {w.get('latency_max_ms', 0):.0f} ms")
            print("  deploy command took: "
                  + ", ".join(f"{d['deploy_seconds']:.2f}s" for d in deploys))
            print(f"  mproxy log statuses: {dict(statuses)} (+{at_stop} x 499 cut off by "
                  "wrk stopping, not counted)")
            verdict = (w["non_2xx"] == 0 and w["socket_errors"] == 0 and not bad_status
                       and all(d["ok"] for d in deploys))
            print(f"  verdict: {'PASS (no failed request)' if verdict else 'FAIL'}")
            result["pass"] = verdict
            if not verdict:
                rc = 1
    except C.BenchError as e:
        C.log(f"FAILED: {e}")
        rc = 1
    except KeyboardInterrupt:
        C.log("interrupted; cleaning up")
        rc = 130
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if result and not args.no_json:
        path = C.write_results("deploy_under_load", {
            "kind": "deploy_under_load",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": C.machine_info(), "settings": vars(args), "mproxy_cmd": cmd, **result})
        print(f"\nJSON: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
