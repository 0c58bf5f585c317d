#!/usr/bin/env python3
"""Start-up latency of `mproxy run`, and of a client command.

For each run, the server is (re)started on the same ports and state
directory, with one service restored from the state file (the first start
deploys it), and this script times from just before the exec:

  accept    the HTTP port accepts a TCP connection (the kernel's backlog:
            the supervisor has bound it);
  early     a request sent on that first connection is answered (it must
            be a 200 from the restored service: never refused, never 404);
  control   the control socket answers `Hello` + `List`;
  started   the "Server started" log line;
  first200  the first 200 of fresh connections polled every 5 ms;
  cpu       the CPU seconds the server's processes had used at "started"
            (less sensitive than the times to what else the machine runs).

Then the server is stopped (`--stop kill` = SIGKILL, as after a crash, or
`term`) and the next run starts.  `--load N` runs N busy-loop processes
during the whole measurement (2 cores: N=2 roughly doubles the run queue).

`--client` times `mproxy list` (and `mproxy --version`) against the running
server instead.

    python3 bench/startup.py --runs 10
    python3 bench/startup.py --runs 10 --load 2
    python3 bench/startup.py --runs 10 --workers 0     # one process, no workers
    python3 bench/startup.py --client --runs 20
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVICE_HOST = "app.startup.test"


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"upstream"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def amp_box(**kw: str) -> bytes:
    out = b""
    for k, v in kw.items():
        kb, vb = k.encode(), v.encode()
        out += struct.pack("!H", len(kb)) + kb + struct.pack("!H", len(vb)) + vb
    return out + b"\0\0"


def amp_read(sock: socket.socket) -> dict:
    data = b""
    box: dict = {}
    while True:
        while len(data) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        n = struct.unpack("!H", data[:2])[0]
        if n == 0:
            return box
        need = 2 + n + 2
        while len(data) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        key = data[2:2 + n]
        vn = struct.unpack("!H", data[2 + n:need])[0]
        while len(data) < need + vn:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        box[key.decode()] = data[need:need + vn]
        data = data[need + vn:]


def control_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(amp_box(_command="Hello", _ask="1", version="1"))
        if "_answer" not in amp_read(s):
            return False
        s.sendall(amp_box(_command="List", _ask="2"))
        return "_answer" in amp_read(s)
    except OSError:
        return False
    finally:
        s.close()


def http_get(sock: socket.socket) -> int:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nConnection: close\r\n\r\n"
                 .encode())
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


class Run:
    """One start: the probes run in threads, times are from t0."""

    def __init__(self, t0: float, http_port: int, control: str, proc: subprocess.Popen):
        self.t0 = t0
        self.http_port = http_port
        self.control = control
        self.proc = proc
        self.times: dict[str, float] = {}
        self.notes: list[str] = []
        self.done = threading.Event()

    def mark(self, what: str) -> None:
        self.times.setdefault(what, time.monotonic() - self.t0)

    def probe_accept_and_early(self) -> None:
        while not self.done.is_set():
            s = socket.socket()
            s.settimeout(30)
            try:
                s.connect((HOST, self.http_port))
            except OSError:
                s.close()
                time.sleep(0.005)
                continue
            self.mark("accept")
            try:
                code = http_get(s)
                self.mark("early")
                if code != 200:
                    self.notes.append(f"early request answered {code}")
            except OSError as e:
                self.notes.append(f"early request failed: {e!r}")
            finally:
                s.close()
            return

    def probe_first200(self) -> None:
        while not self.done.is_set():
            s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect((HOST, self.http_port))
                if http_get(s) == 200:
                    self.mark("first200")
                    return
            except OSError:
                pass
            finally:
                s.close()
            time.sleep(0.01)

    def probe_control(self) -> None:
        while not self.done.is_set():
            if os.path.exists(self.control) and control_answers(self.control):
                self.mark("control")
                return
            time.sleep(0.01)

    def read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "Server started":
                self.mark("started")
                self.times.setdefault("cpu", group_cpu(self.proc.pid))


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of a group."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ...
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_group_gone(pgid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.killpg(pgid, signal.SIGKILL)


class Server:
    """One source tree's server: its ports, state directory and argv."""

    def __init__(self, name: str, tree: str, args: argparse.Namespace, upstream: int) -> None:
        self.name = name
        self.tmp = Path(tempfile.mkdtemp(prefix="mproxy-startup-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MPROXY_")}
        self.env["PYTHONPATH"] = tree
        self.http_port, https_port = free_port(), free_port()
        self.control = str(self.tmp / "mproxy.sock")
        self.stop_signal = signal.SIGKILL if args.stop == "kill" else signal.SIGTERM
        self.argv = [sys.executable, "-m", "mproxy", "run", "--http-port", str(self.http_port),
                     "--https-port", str(https_port), "--bind", HOST, "--socket", self.control,
                     "--state-dir", str(self.tmp / "state")]
        if args.workers != "0":
            self.argv += ["--workers", args.workers]
        self.upstream = upstream
        self.results: list[dict[str, float]] = []
        self.notes: list[str] = []

    def start(self) -> Run:
        t0 = time.monotonic()
        proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=str(self.tmp))
        return Run(t0, self.http_port, self.control, proc)

    def stop(self, run: Run, sig: int | None = None) -> None:
        run.done.set()
        run.proc.send_signal(sig or self.stop_signal)
        run.proc.wait(30)
        wait_group_gone(run.proc.pid)

    def first_start(self) -> Run:
        """Start, and deploy the service the later starts restore."""
        run = self.start()
        threading.Thread(target=run.read_log, daemon=True).start()
        deadline = time.monotonic() + 30
        while "started" not in run.times:
            if time.monotonic() > deadline or run.proc.poll() is not None:
                raise SystemExit(f"{self.name}: mproxy did not start")
            time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, "-m", "mproxy", "deploy", "app", "--target",
             f"{HOST}:{self.upstream}", "--host", SERVICE_HOST,
             "--socket", self.control], env=self.env, capture_output=True, text=True,
            cwd=str(self.tmp))
        if out.returncode:
            raise SystemExit(f"{self.name}: deploy failed: {out.stderr}")
        return run

    def measure(self, i: int) -> None:
        run = self.start()
        probes = [run.read_log, run.probe_accept_and_early, run.probe_first200,
                  run.probe_control]
        for p in probes:
            threading.Thread(target=p, daemon=True).start()
        deadline = time.monotonic() + 30
        while len(run.times) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop(run)
        self.results.append(run.times)
        self.notes += [f"{self.name} run {i + 1}: {n}" for n in run.notes]
        print(f"{self.name} run {i + 1}: " + "  ".join(
            f"{k} {v:.3f}" for k, v in sorted(run.times.items(), key=lambda kv: kv[1])),
            file=sys.stderr)

    def summary(self) -> dict:
        out = {}
        for key in ("accept", "control", "early", "first200", "started", "cpu"):
            values = sorted(r[key] for r in self.results if key in r)
            if values:
                out[key] = {"median": statistics.median(values), "min": values[0],
                            "max": values[-1], "n": len(values)}
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[],
                    help="NAME=PATH of an mproxy source tree (repeatable: runs alternate); "
                         "default: this checkout")
    ap.add_argument("--workers", default="auto", help="0: one process, no workers")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes meanwhile")
    ap.add_argument("--stop", choices=("kill", "term"), default="kill")
    ap.add_argument("--client", action="store_true", help="time `mproxy list` instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    trees = [t.split("=", 1) if "=" in t else (t, t) for t in args.tree] or [
        ("this", str(REPO_ROOT))]
    upstream = http.server.ThreadingHTTPServer((HOST, 0), Upstream)
    upstream.handle_error = lambda request, address: None  # a probe that went away
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    servers = [Server(name, tree, args, upstream.server_address[1]) for name, tree in trees]
    load: list[subprocess.Popen] = []
    try:
        for server in servers:
            run = server.first_start()
            if args.client:
                load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(args.load)]
                try:
                    client_times(args, server)
                finally:
                    for p in load:
                        p.kill()
                server.stop(run, signal.SIGTERM)
            else:
                server.stop(run)
        if args.client:
            return 0
        load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.load)]
        for i in range(args.runs):
            for server in servers:
                server.measure(i)
                time.sleep(0.3)
    finally:
        for p in load:
            p.kill()
        upstream.shutdown()
        for server in servers:
            shutil.rmtree(server.tmp, ignore_errors=True)
    notes = []
    report = {}
    for server in servers:
        report[server.name] = summary = server.summary()
        print(f"{server.name} (workers {args.workers}, load {args.load}, stop {args.stop}):")
        for key, s in summary.items():
            print(f"  {key:9} median {s['median']:.3f}  min {s['min']:.3f}  "
                  f"max {s['max']:.3f}  (n={s['n']})")
        notes += server.notes
    for n in notes:
        print(n)
    if args.json:
        print(json.dumps({"summary": report, "runs": {s.name: s.results for s in servers},
                          "notes": notes}))
    return 1 if notes else 0


def client_times(args: argparse.Namespace, server: Server) -> None:
    for name, cmd in (("--version", ["--version"]),
                      ("list", ["list", "--socket", server.control])):
        values = []
        for _ in range(args.runs):
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "mproxy", *cmd], env=server.env,
                                 capture_output=True, text=True, cwd=str(server.tmp))
            values.append(time.monotonic() - t0)
            if out.returncode:
                raise SystemExit(f"mproxy {name} failed: {out.stderr}")
        values.sort()
        print(f"{server.name}: mproxy {name:10} median {statistics.median(values):.3f}  "
              f"min {values[0]:.3f}  max {values[-1]:.3f}  (n={len(values)}, load {args.load})")


if __name__ == "__main__":
    sys.exit(main())
