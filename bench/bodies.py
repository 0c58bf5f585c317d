#!/usr/bin/env python3
"""1 GiB upload and 1 GiB download through mproxy: correctness and memory.

  client (this script) --HTTP--> proxy under test --HTTP--> bench/body_upstream.py

Bodies are generated on the fly (bench/_bodygen.py), never read from disk.
Download: the upstream streams N bytes, the client hashes what arrives and
compares with the expected sha256. Upload: the client streams N bytes and
hashes what it sends, the upstream hashes what it receives and reports it.

Memory: the proxy's RSS (summed over its process tree) just before the
transfer is the baseline; VmHWM is reset (/proc/PID/clear_refs) and RSS is
also sampled every 20 ms during the transfer; growth = peak - baseline.
Target: < 50 MiB growth each way (--limit-mib).

To make missing back-pressure visible, the reading side stalls for a while
mid-transfer (--stall seconds after 64 MiB): for the download the client
stops reading, for the upload the upstream stops reading. A proxy that keeps
reading from the fast side meanwhile has to hold the bytes in memory.

Usage: python3 bench/bodies.py [--proxy mproxy|nginx|direct] [--size 1GiB]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _bodygen import CHUNK, chunks, expected_sha256  # noqa: E402

MiB = 1 << 20


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    mult = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    unit = (m.group(2) or "").upper().replace("I", "").replace("B", "") or ""
    return int(float(m.group(1)) * mult[unit])


class RssSampler(threading.Thread):
    def __init__(self, pids: list[int], interval: float = 0.02):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak_kib = 0
        self.timeline: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self):
        last_rec = -1.0
        while not self._halt.is_set():
            kib = C.rss_kib(self.pids)
            self.peak_kib = max(self.peak_kib, kib)
            t = time.monotonic() - self._t0
            if t - last_rec >= 0.25:
                self.timeline.append((round(t, 2), kib))
                last_rec = t
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(5)


_TLS_CTX: ssl.SSLContext | None = None   # set by --tls


def connect(port: int, timeout: float) -> http.client.HTTPConnection:
    if _TLS_CTX is not None:
        return http.client.HTTPSConnection(C.TLS_HOST, port, timeout=timeout, context=_TLS_CTX)
    return http.client.HTTPConnection(C.HOST, port, timeout=timeout)


def download(port: int, n: int, stall: float, stall_after: int, timeout: float) -> dict:
    conn = connect(port, timeout)
    try:
        conn.request("GET", f"/download?bytes={n}")
        resp = conn.getresponse()
        if resp.status != 200:
            raise C.BenchError(f"download: HTTP {resp.status}: {resp.read(500)!r}")
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        got, stalled = 0, False
        while True:
            k = resp.readinto(buf)
            if not k:
                break
            h.update(mv[:k])
            got += k
            if stall > 0 and not stalled and got >= stall_after:
                stalled = True
                time.sleep(stall)
        return {"bytes": got, "sha256": h.hexdigest(),
                "content_length": resp.getheader("content-length")}
    finally:
        conn.close()


def upload(port: int, n: int, timeout: float, chunked: bool, seed: int) -> dict:
    conn = connect(port, timeout)
    try:
        conn.putrequest("POST", "/upload")
        conn.putheader("Content-Type", "application/octet-stream")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(n))
        conn.endheaders()
        h = hashlib.sha256()
        for c in chunks(n, seed):
            h.update(c)
            if chunked:
                conn.send(b"%x\r\n" % len(c) + c + b"\r\n")
            else:
                conn.send(c)
        if chunked:
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise C.BenchError(f"upload: HTTP {resp.status}: {body[:500]!r}")
        reply = json.loads(body)
        return {"bytes": reply["bytes"], "sha256": reply["sha256"], "sent_sha256": h.hexdigest()}
    finally:
        conn.close()


def run_one(direction: str, port: int, pids: list[int], args, expected: str) -> dict:
    # Let RSS settle after the warm-up, then take the baseline.
    time.sleep(0.5)
    baseline = C.rss_kib(pids)
    hwm_reset = C.reset_hwm(pids)
    sampler = RssSampler(pids)
    sampler.start()
    t0 = time.monotonic()
    error = None
    try:
        if direction == "download":
            r = download(port, args.size, args.stall, args.stall_after, args.timeout)
            ok = r["bytes"] == args.size and r["sha256"] == expected
        else:
            r = upload(port, args.size, args.timeout, args.chunked, args.seed)
            ok = (r["bytes"] == args.size and r["sha256"] == expected
                  and r["sent_sha256"] == expected)
    except (OSError, C.BenchError, http.client.HTTPException, ValueError) as e:
        r, ok, error = {}, False, f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - t0
    sampler.stop()
    hwm = C.rss_kib(pids, "VmHWM") if hwm_reset else 0
    peak = max(sampler.peak_kib, hwm)
    time.sleep(1.0)
    after = C.rss_kib(pids)
    growth_mib = (peak - baseline) / 1024
    res = {
        "direction": direction, "bytes_expected": args.size, **r, "expected_sha256": expected,
        "correct": ok, "error": error, "seconds": round(elapsed, 3),
        # throughput excluding the deliberate stall
        "mib_per_s": (round(args.size / MiB / (elapsed - args.stall), 1)
                      if elapsed > args.stall else None),
        "rss_baseline_mib": round(baseline / 1024, 1),
        "rss_peak_sampled_mib": round(sampler.peak_kib / 1024, 1),
        "vmhwm_mib": round(hwm / 1024, 1) if hwm_reset else None,
        "rss_peak_mib": round(peak / 1024, 1), "rss_growth_mib": round(growth_mib, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_limit_mib": args.limit_mib,
        "rss_ok": growth_mib < args.limit_mib,
        "rss_timeline_kib": sampler.timeline,
    }
    return res


def main(argv=None) -> int:
    global _TLS_CTX
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", choices=["mproxy", "nginx", "direct"], default="mproxy",
                    help="what sits between client and upstream (nginx/direct are for "
                         "checking the harness; for direct the upstream's RSS is measured)")
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="bytes each way (1GiB)")
    ap.add_argument("--directions", default="download,upload")
    ap.add_argument("--stall", type=float, default=2.0,
                    help="seconds the reading side pauses mid-transfer (0: never)")
    ap.add_argument("--stall-after", type=parse_size, default=64 * MiB)
    ap.add_argument("--chunked", action="store_true", help="upload with chunked encoding")
    ap.add_argument("--tls", action="store_true",
                    help="client -> proxy over HTTPS (self-signed cert for localhost; "
                         "mproxy deployed with --host localhost --tls); not with direct")
    ap.add_argument("--limit-mib", type=float, default=50.0, help="allowed RSS growth")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket inactivity timeout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (-1: no pin)")
    ap.add_argument("--load-cpu", type=int, default=1,
                    help="CPU for the client (this script) and upstream (-1: no pin)")
    ap.add_argument("--mproxy-cmd", help="command to run the mproxy CLI "
                    "(default: $MPROXY_CMD, else this checkout, else `mproxy` on PATH)")
    ap.add_argument("--upstream-push", action="store_true",
                    help="harness self-check: the upstream ignores back-pressure on downloads, "
                         "so `--proxy direct --upstream-push` must FAIL the RSS limit")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    C.install_signal_handlers()

    if C.cpu_count() < 2:
        args.proxy_cpu = args.load_cpu = -1
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    if args.tls and args.proxy == "direct":
        ap.error("--tls needs a proxy (mproxy or nginx)")
    mproxy_cmd = None
    if args.proxy == "mproxy":
        mproxy_cmd, mproxy_env = C.mproxy_command(args.mproxy_cmd)
        if mproxy_cmd is None:
            C.log("error: mproxy CLI not available (pip install -e . or --mproxy-cmd)")
            return 1

    C.log(f"computing expected sha256 of {args.size} generated bytes")
    expected = expected_sha256(args.size, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mproxy-bodies-"))
    results, rc = [], 0
    try:
        with C.Procs() as procs:
            (up_port,) = C.free_ports(1)
            upstream = procs.start(
                "upstream", C.pin_prefix(args.load_cpu) + [
                    sys.executable, str(C.BENCH_DIR / "body_upstream.py"), "--port", str(up_port),
                    "--upload-stall", str(args.stall), "--stall-after", str(args.stall_after),
                    "--seed", str(args.seed)] + (["--push"] if args.upstream_push else []), tmp)
            C.wait_port(up_port, 15, upstream)
            cert = None
            if args.tls:
                cert = C.make_cert(tmp / "cert")
                _TLS_CTX = ssl.create_default_context(cafile=str(cert[0]))
            if args.proxy == "direct":
                port, pid, server = up_port, upstream.pid, upstream
            elif args.proxy == "nginx":
                (port,) = C.free_ports(1)
                conf = C.nginx_proxy_config(tmp / "nginx", port, up_port, stream_bodies=True,
                                            tls=cert)
                p = procs.start("nginx", C.pin_prefix(args.proxy_cpu) + C.nginx_argv(conf), tmp)
                C.wait_port(port, 15, p)
                pid, server = p.pid, p
            else:
                mp = C.MProxy(procs, mproxy_cmd, mproxy_env, tmp / "mproxy", args.proxy_cpu)
                opts = []
                if cert:
                    opts = ["--host", C.TLS_HOST, "--tls", "--tls-certificate-path",
                            str(cert[0]), "--tls-private-key-path", str(cert[1])]
                mp.deploy(f"{C.HOST}:{up_port}", opts)
                port = mp.https_port if cert else mp.http_port
                pid, server = mp.pid, mp.proc
            if args.load_cpu >= 0:
                os.sched_setaffinity(0, {args.load_cpu})
            pids = C.tree_pids(pid)
            # Warm-up: small transfers both ways so first-use allocations
            # (imports, connection pools, buffers) are in the baseline.
            small = 4 * MiB
            download(port, small, 0, 0, args.timeout)
            upload(port, small, args.timeout, args.chunked, args.seed)
            for d in directions:
                C.log(f"{args.proxy}: {d} {args.size / MiB:.0f} MiB "
                      f"(reader stalls {args.stall:g}s after {args.stall_after / MiB:.0f} MiB)")
                r = run_one(d, port, pids, args, expected)
                results.append(r)
                C.log(f"{d}: {'OK' if r['correct'] else 'WRONG'} "
                      f"{r.get('bytes', '?')} bytes in {r['seconds']:.1f}s "
                      f"({r['mib_per_s']} MiB/s excl. stall), RSS {r['rss_baseline_mib']} -> peak "
                      f"{r['rss_peak_mib']} MiB (growth {r['rss_growth_mib']} MiB), after "
                      f"{r['rss_after_mib']} MiB" + (f"; {r['error']}" if r["error"] else ""))
                if not (r["correct"] and r["rss_ok"]):
                    rc = 1
                for p in (upstream, server):
                    if p.poll() is not None:
                        raise C.BenchError(f"{p.name} died during the transfer\n" + p.tail())
    except (C.BenchError, subprocess.SubprocessError, OSError) as e:
        C.log(f"FAILED: {type(e).__name__}: {e}")
        rc = 1
    except KeyboardInterrupt:
        C.log("interrupted; cleaning up")
        rc = 130
    finally:
        if args.keep_tmp:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if results:
        print()
        print(f"{args.size / MiB:.0f} MiB each way through {args.proxy}"
              f"{' over HTTPS' if args.tls else ''}; reader stall "
              f"{args.stall:g}s after {args.stall_after / MiB:.0f} MiB; "
              f"RSS growth limit {args.limit_mib:g} MiB")
        print(f"{'direction':<10} {'sha256':>7} {'seconds':>8} {'MiB/s*':>7} {'base MiB':>9} "
              f"{'peak MiB':>9} {'growth':>7} {'after':>7} {'verdict':>8}")
        for r in results:
            verdict = "PASS" if r["correct"] and r["rss_ok"] else "FAIL"
            print(f"{r['direction']:<10} {'ok' if r['correct'] else 'BAD':>7} "
                  f"{r['seconds']:>8.1f} {r['mib_per_s'] or 0:>7.1f} "
                  f"{r['rss_baseline_mib']:>9.1f} {r['rss_peak_mib']:>9.1f} "
                  f"{r['rss_growth_mib']:>7.1f} {r['rss_after_mib']:>7.1f} {verdict:>8}")
            if r["error"]:
                print(f"  error: {r['error']}")
        print("* throughput excluding the deliberate stall")
        if not args.no_json:
            path = C.write_results(f"bodies-{args.proxy}{'-tls' if args.tls else ''}", {
                "kind": "bodies", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": C.machine_info(), "proxy": args.proxy,
                "settings": vars(args), "mproxy_cmd": mproxy_cmd, "results": results})
            print(f"\nJSON: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
