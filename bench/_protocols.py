"""
HTTP/2 and HTTP/3 load for proxy_cpu.py, beside wrk's HTTP/1.1.

A target's URL says which load generator drives it: C{h2+https://...} is
h2load (Debian's C{nghttp2-client}), C{h3+https://...} is bench/h3load.py
(aioquic), C{rate+http://...} bench/rateload.py (constant rate,
C{args.rate} requests a second), anything else wrk.  L{run_load} returns the dict wrk's parser
gives (requests, elapsed_s, req_per_s, non_2xx, socket_errors, latency_*).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _common as C

#: (suffix of a target name, URL prefix, what it needs)
PROTOCOL_SUFFIXES = {"-h2": "h2+", "-h3": "h3+"}

H3LOAD = Path(__file__).resolve().parent / "h3load.py"
RATELOAD = Path(__file__).resolve().parent / "rateload.py"


def split_url(url: str) -> tuple[str, str]:
    """
    (protocol, plain URL): protocol is "h2", "h3", "rate" (HTTP/1.1 at a
    constant rate) or "" (HTTP/1.1, wrk).
    """
    for proto in ("h2", "h3", "rate"):
        if url.startswith(proto + "+"):
            return proto, url[len(proto) + 1:]
    return "", url


def protocol_target(name: str) -> tuple[str, str]:
    """
    A target name with a protocol suffix (C{caddy-h2}, C{mproxy-h3@after})
    -> (the TLS target it runs as, URL prefix); others -> (name, "").
    """
    base, at, label = name.partition("@")
    for suffix, prefix in PROTOCOL_SUFFIXES.items():
        if base.endswith(suffix):
            return base[: -len(suffix)] + "-tls" + at + label, prefix
    return name, ""


def missing_tool(name: str) -> str | None:
    base = name.partition("@")[0]
    if base.endswith("-h2") and not shutil.which("h2load"):
        return "h2load not found (apt-get install nghttp2-client)"
    if base.endswith("-h3"):
        import importlib.util

        if importlib.util.find_spec("aioquic") is None:
            return "aioquic not installed (pip install aioquic)"
    return None


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]


def parse_h2load(out: str) -> dict:
    m = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", out)
    r = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not m or not r:
        raise C.BenchError("could not parse h2load output:\n" + out)
    res = {"requests": int(r.group(1)), "elapsed_s": _ms(m.group(1), m.group(2)) / 1000.0,
           "req_per_s": float(m.group(3))}
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    res["non_2xx"] = int(s.group(3)) + int(s.group(4)) if s else 0
    res["socket_errors"] = int(r.group(4)) + int(r.group(5))
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                  r"([\d.]+)(us|ms|s)", out)
    if t:
        res["latency_max_ms"] = _ms(t.group(3), t.group(4))
        res["latency_avg_ms"] = _ms(t.group(5), t.group(6))
    return res


def run_load(url: str, args, duration: float, cpu: int | None, run_wrk) -> dict:
    """
    Drive C{url} for C{duration} seconds with the generator its prefix
    names (C{run_wrk} for plain URLs), pinned to C{cpu}.
    """
    proto, plain = split_url(url)
    if proto == "":
        return run_wrk(url, args, duration, cpu)
    if proto == "h2":
        # -c connections, --h2-streams (default 10) requests in flight on each
        streams = getattr(args, "h2_streams", 10)
        argv = C.pin_prefix(cpu) + [
            "h2load", "-t1", f"-c{args.connections}", f"-m{streams}", f"-D{duration:g}", plain]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise C.BenchError(f"h2load failed ({r.returncode}): {r.stderr}\n{r.stdout}")
        return parse_h2load(r.stdout)
    if proto == "rate":
        rt = C.rt_prefix(args.realtime) if getattr(args, "rt", False) else []
        argv = C.pin_prefix(cpu) + rt + [
            sys.executable, str(RATELOAD), plain, "--rate", f"{args.rate:g}",
            "-c", str(args.connections), "-d", f"{duration:g}"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                           stdin=subprocess.DEVNULL)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise C.BenchError(f"rateload failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    # h3: one Python process; fewer connections, several streams each
    conns = max(1, min(args.connections, 10))
    streams = max(1, args.connections // conns)
    argv = C.pin_prefix(cpu) + [
        sys.executable, str(H3LOAD), plain, "-c", str(conns), "-m", str(streams),
        "-d", f"{duration:g}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                       stdin=subprocess.DEVNULL)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise C.BenchError(f"h3load failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    if "error" in res:
        raise C.BenchError(f"h3load failed: {res['error']}")
    return res
