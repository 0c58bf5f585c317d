"""Shared helpers for the mproxy benchmark scripts (not part of the product).

Everything here is about starting and stopping local processes safely:
random free ports on 127.0.0.1, temporary directories, process groups that
are always torn down (also on Ctrl-C / SIGTERM), and /proc accounting.
Linux only (uses /proc and taskset).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# signals: turn SIGINT/SIGTERM/SIGHUP into an exception so `finally` blocks run


def install_signal_handlers() -> None:
    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise)


# --------------------------------------------------------------------------
# ports


def free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports on 127.0.0.1 (held open until all
    are chosen, so they differ from each other)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.poll()} before listening "
                             f"on {port}; see {proc.stderr_path} / {proc.stdout_path}\n"
                             + proc.tail())
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"nothing listening on {HOST}:{port} after {timeout}s") from None
            time.sleep(0.05)


def wait_path(path: Path, timeout: float, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.poll()}\n" + proc.tail())
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None,
             cafile: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------
# CPU pinning


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def pin_prefix(cpu: int | None) -> list[str]:
    """`taskset -c N` prefix, or nothing when pinning is disabled/impossible."""
    if cpu is None or cpu < 0:
        return []
    if cpu not in os.sched_getaffinity(0) or not shutil.which("taskset"):
        log(f"warning: cannot pin to CPU {cpu}; running unpinned")
        return []
    return ["taskset", "-c", str(cpu)]


# --------------------------------------------------------------------------
# processes


class Proc:
    """A child process in its own process group, output sent to files.

    stop() terminates the whole group (SIGTERM, then SIGKILL) – only ever
    processes this script started."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        log(f"start {name}: {shlex.join(argv)}")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=full_env, cwd=str(cwd) if cwd else None, start_new_session=True)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    def tail(self, n: int = 20) -> str:
        out = []
        for p in (self.stderr_path, self.stdout_path):
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            if lines:
                out.append(f"--- {p.name} (last {len(lines)} lines)")
                out.extend(lines)
        return "\n".join(out)

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Leftovers in the group (e.g. nginx workers) are killed too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)


class Procs(contextlib.ExitStack):
    """ExitStack that also remembers processes, stopping them in reverse order."""

    def start(self, *args, **kw) -> Proc:
        p = Proc(*args, **kw)
        self.callback(p.stop)
        return p


class Awake(contextlib.AbstractContextManager):
    """Keep CPUs from idling while the block runs: one busy loop per CPU,
    pinned there, at SCHED_IDLE (below every normal and real-time process,
    which preempt it as soon as they wake up).  On a VM an idle vCPU halts,
    and waking it again can take milliseconds: a latency measured across
    halted vCPUs is mostly the hypervisor's.  `cpu_seconds()` is the CPU
    time the loops took, per CPU, to subtract from busy figures."""

    LOOP = "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass\n"

    def __init__(self, cpus: list[int]) -> None:
        self.cpus = sorted({c for c in cpus if c is not None and c >= 0})
        self.popens: dict[int, subprocess.Popen] = {}

    def __enter__(self) -> "Awake":
        for cpu in self.cpus:
            self.popens[cpu] = subprocess.Popen(
                pin_prefix(cpu) + [sys.executable, "-c", self.LOOP],
                stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def cpu_seconds(self) -> dict[int, float]:
        return {cpu: cpu_seconds([p.pid]) for cpu, p in self.popens.items()}

    def __exit__(self, *exc) -> None:
        for p in self.popens.values():
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.popens.clear()


# --------------------------------------------------------------------------
# /proc accounting


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """Sum of utime+stime (seconds) of the given live processes (all threads)."""
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(")") + 2:].split()
        # fields[0] is field 3 (state); utime/stime are fields 14/15.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def set_realtime(pids: list[int], priority: int) -> None:
    """SCHED_FIFO at `priority` for the given processes (all their threads),
    or back to the normal policy with 0."""
    policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
    for p in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(int(tid), policy, os.sched_param(priority))


def rt_prefix(priority: int) -> list[str]:
    """`chrt -f PRIORITY` prefix, or nothing for 0."""
    return ["chrt", "-f", str(priority)] if priority and shutil.which("chrt") else []


def cpu_seconds_by_pid(pids: list[int]) -> dict[int, float]:
    """utime+stime (seconds) of each live process in `pids`."""
    return {p: cpu_seconds([p]) for p in pids}


def established_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local `port` each process in
    `pids` holds (from /proc/net/tcp{,6} and the processes' descriptors):
    which worker accepted how many of the clients' connections."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    out = {}
    for p in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{p}/fd/{fd}") in inodes:
                        n += 1
        out[p] = n
    return out


def listen_overflows() -> int | None:
    """System-wide TcpExt ListenOverflows (SYNs dropped because an accept
    queue was full). Not per process: other load on the machine counts too."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(d["ListenOverflows"]) if "ListenOverflows" in d else None
    return None


def cpu_times() -> dict[int, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                out[int(name[3:])] = [int(v) for v in vals[:8]]
    return out


def cpu_busy(before: dict, after: dict, cpu: int) -> dict:
    """Share of wall time CPU `cpu` was busy / idle+iowait / stolen between two
    cpu_times() snapshots."""
    if cpu not in before or cpu not in after:
        return {}
    d = [a - b for a, b in zip(after[cpu], before[cpu], strict=True)]
    total = sum(d) or 1
    idle = d[3] + d[4]
    return {"busy": round((total - idle - d[7]) / total, 3), "idle": round(idle / total, 3),
            "steal": round(d[7] / total, 3)}


def wait_quiet(cpus: list[int], max_wait: float, threshold: float = 0.10,
               window: float = 1.0) -> bool:
    """Wait (up to max_wait s) until each CPU in `cpus` was busy less than
    `threshold` over a `window`-second sample, i.e. nobody else is loading the
    machine. Returns False if it never got quiet."""
    cpus = [c for c in cpus if c is not None and c >= 0] or sorted(os.sched_getaffinity(0))
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        a = cpu_times()
        time.sleep(window)
        b = cpu_times()
        busy = {c: cpu_busy(a, b, c).get("busy", 0.0) for c in cpus}
        if all(v < threshold for v in busy.values()):
            return True
        if time.monotonic() >= deadline:
            log(f"warning: CPUs still busy ({busy}) after {max_wait:g}s; measuring anyway")
            return False
        if not said:
            log(f"waiting for other load to stop (CPU busy: {busy}; up to {max_wait:g}s)")
            said = True


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pids: list[int], key: str = "VmRSS") -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            total += proc_status_kib(p, key)
    return total


def reset_hwm(pids: list[int]) -> bool:
    """Reset VmHWM (peak RSS) via /proc/PID/clear_refs (needs same uid/root)."""
    ok = True
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


# --------------------------------------------------------------------------
# TLS


TLS_HOST = "localhost"


def make_cert(d: Path, host: str = TLS_HOST) -> tuple[Path, Path]:
    """Self-signed ECDSA P-256 certificate for `host` (what ACME would issue by
    default), valid 2 days. Returns (cert, key) PEM paths."""
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=DNS:{host},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key


# --------------------------------------------------------------------------
# nginx


def _nginx_common(d: Path) -> str:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / f"tmp_{sub}").mkdir(exist_ok=True)
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
"""


def _nginx_http_tmp(d: Path) -> str:
    return f"""
  client_body_temp_path {d}/tmp_client_body;
  proxy_temp_path {d}/tmp_proxy;
  fastcgi_temp_path {d}/tmp_fastcgi;
  uwsgi_temp_path {d}/tmp_uwsgi;
  scgi_temp_path {d}/tmp_scgi;
"""


#: the upstream's larger responses: /files/<name> (see nginx_upstream_config)
BODY_FILES = {"64k": 65536, "1m": 1048576}


def nginx_upstream_config(d: Path, port: int, body: bytes, sendfile: bool = False) -> Path:
    """A fast upstream: fixed body on / (and on POST /upload, after reading
    the whole request body), 200 on /up, /files/64k and /files/1m
    (BODY_FILES bytes each), keepalive, no logging.

    /upload reads the body before it answers: nginx's `return` answers at
    once and discards the body in the background, so a proxy saw the
    response while still sending the body and (mproxy) closed both
    connections, or (Caddy) went on sending it. Its proxy module reads the
    whole body first (into memory: client_body_buffer_size), then asks
    /sink on this server for the response without the body.

    `sendfile`: the files go out with sendfile() (no read into nginx and
    copy out of it: about half of nginx's CPU per MiB) instead of nginx's
    default pread + writev of 32 KiB buffers."""
    d.mkdir(parents=True, exist_ok=True)
    files = d / "files"
    files.mkdir(exist_ok=True)
    block = bytes(range(256)) * 4096
    for name, size in BODY_FILES.items():
        (files / name).write_bytes(block[:size])
    text = body.decode("ascii")
    assert '"' not in text and "\\" not in text
    conf = d / "nginx.conf"
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_tmp(d)}
  access_log off;
  sendfile {"on" if sendfile else "off"};
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type text/plain;
  upstream sink {{ server {HOST}:{port}; keepalive 256; }}
  server {{
    listen {HOST}:{port} backlog=4096;
    location = /up {{ return 200 "OK\\n"; }}
    location = /__upstream_status {{ stub_status; }}
    location /files/ {{ root {d}; default_type application/octet-stream; }}
    location = /upload {{
      client_max_body_size 64m;
      client_body_buffer_size 2m;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://sink/sink;
    }}
    location = /sink {{ return 200 "{text}"; }}
    location / {{ return 200 "{text}"; }}
  }}
}}
""")
    return conf


def nginx_accepts(port: int) -> int | None:
    """Connections the upstream nginx has accepted so far (stub_status)."""
    try:
        status, body = http_get(f"http://{HOST}:{port}/__upstream_status", timeout=5)
    except OSError:
        return None
    lines = body.decode(errors="replace").splitlines()
    if status != 200 or len(lines) < 3:
        return None
    return int(lines[2].split()[0])


def nginx_proxy_config(d: Path, port: int, upstream_port: int, access_log: bool = True,
                       stream_bodies: bool = False,
                       tls: tuple[Path, Path] | None = None) -> Path:
    """nginx as a peer reverse proxy: keepalive upstream pool, JSON access log
    to a file (mproxy logs one JSON line per request too), X-Forwarded-* and a
    request id like mproxy."""
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    logline = (f"access_log {d}/access.log json;" if access_log else "access_log off;")
    listen = f"listen {HOST}:{port} backlog=4096;"
    if tls:
        listen = f"""listen {HOST}:{port} ssl http2 backlog=4096;
    ssl_certificate {tls[0]};
    ssl_certificate_key {tls[1]};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;"""
    streaming = """
      client_max_body_size 0;
      proxy_request_buffering off;
      proxy_buffering off;
""" if stream_bodies else ""
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_tmp(d)}
  log_format json escape=json '{{"time":"$time_iso8601","msg":"Request","host":"$http_host",'
    '"path":"$uri","request_id":"$request_id","status":$status,"target":"$upstream_addr",'
    '"duration":"$request_time","method":"$request_method",'
    '"req_content_length":"$content_length","resp_content_length":$body_bytes_sent,'
    '"client_addr":"$remote_addr","client_port":"$remote_port","user_agent":"$http_user_agent",'
    '"proto":"$server_protocol","scheme":"$scheme","query":"$query_string"}}';
  {logline}
  client_max_body_size 64m;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream app {{
    server {HOST}:{upstream_port};
    keepalive 128;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }}
  server {{
    {listen}
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-ID $request_id;
{streaming}
    }}
  }}
}}
""")
    return conf


#: the small response the benches' upstream serves on / (128 bytes)
SMALL_BODY = (b"Hello from the upstream! " * 6)[:127] + b"\n"


def start_upstream(procs: "Procs", d: Path, cpu: int | None, body: bytes = SMALL_BODY,
                   sendfile: bool = False) -> "tuple[Proc, int]":
    """The nginx upstream of nginx_upstream_config serving `body`, started
    in `procs` from directory `d`, pinned to `cpu`, and listening: the
    process and its port."""
    (port,) = free_ports(1)
    conf = nginx_upstream_config(d, port, body, sendfile=sendfile)
    proc = procs.start("upstream", pin_prefix(cpu) + nginx_argv(conf), d)
    wait_port(port, 15, proc)
    return proc, port


def nginx_argv(conf: Path) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")]


# --------------------------------------------------------------------------
# caddy


def caddy_available() -> bool:
    return shutil.which("caddy") is not None


def caddy_config(d: Path, port: int, upstream_port: int,
                 tls: tuple[Path, Path] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "Caddyfile"
    site = f"https://{TLS_HOST}:{port}" if tls else f":{port}"
    tls_line = f"\ttls {tls[0]} {tls[1]}\n" if tls else ""
    conf.write_text(f"""{{
	admin off
	auto_https off
	storage file_system {d}/data
}}

{site} {{
	bind {HOST}
{tls_line}	reverse_proxy {HOST}:{upstream_port} {{
		transport http {{
			keepalive 300s
			keepalive_idle_conns 256
			keepalive_idle_conns_per_host 128
		}}
	}}
	log {{
		output file {d}/access.log
		format json
	}}
}}
""")
    return conf


def caddy_argv_env(conf: Path) -> tuple[list[str], dict]:
    d = conf.parent
    env = {"HOME": str(d), "XDG_DATA_HOME": str(d / "xdg-data"),
           "XDG_CONFIG_HOME": str(d / "xdg-config")}
    return [shutil.which("caddy") or "caddy", "run", "--config", str(conf),
            "--adapter", "caddyfile"], env


# --------------------------------------------------------------------------
# mproxy


def mproxy_command(explicit: str | None = None) -> tuple[list[str] | None, dict]:
    """How to invoke the mproxy CLI: --mproxy-cmd / $MPROXY_CMD, else the entry
    point of this checkout (`mproxy.cli.main:run` with PYTHONPATH=repo root, so
    the code being benchmarked is the code next to this script, not whatever
    copy happens to be installed), else an installed `mproxy` console script.
    None if none of these work."""
    explicit = explicit or os.environ.get("MPROXY_CMD")
    if explicit:
        return shlex.split(explicit), {}
    candidates = []
    if (REPO_ROOT / "mproxy" / "cli" / "main.py").exists():
        old = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
        env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + old)}
        # (the checkout goes ahead of the current directory `python -c` puts first)
        candidates.append(([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
                            "sys.argv[0] = 'mproxy'; "
                            "from mproxy.cli.main import run; sys.exit(run())"], env))
    if shutil.which("mproxy"):
        candidates.append(([shutil.which("mproxy")], {}))
    for argv, env in candidates:
        probe = subprocess.run(argv + ["--version"], capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=30)
        if probe.returncode == 0:
            return argv, env
        log(f"mproxy CLI not usable via {argv[-1][:60]!r}: "
            + ((probe.stderr.strip().splitlines() or ["(no output)"])[-1]))
    return None, {}


class MProxy:
    """`mproxy run` in the foreground (pinned), plus deploy via the control socket."""

    def __init__(self, procs: Procs, cmd: list[str], env: dict, workdir: Path,
                 cpu: int | None, extra_args: list[str] | None = None,
                 wrapper: list[str] | None = None, start_timeout: float = 30):
        self.cmd, self.env, self.dir = cmd, env, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "mproxy.sock"
        self.state_dir = workdir / "state"
        self.http_port, self.https_port = free_ports(2)
        argv = pin_prefix(cpu) + (wrapper or []) + cmd + [
            "run", "--http-port", str(self.http_port), "--https-port", str(self.https_port),
            "--socket", str(self.socket), "--state-dir", str(self.state_dir),
            "--bind", HOST] + (extra_args or [])
        self.proc = procs.start("mproxy", argv, workdir, env=env)
        wait_port(self.http_port, start_timeout, self.proc)
        wait_path(self.socket, start_timeout, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def deploy(self, target: str, extra: list[str] | None = None, timeout: float = 60) -> None:
        argv = self.cmd + ["deploy", target, "--socket", str(self.socket)] + (extra or [])
        log(f"run: {shlex.join(argv)}")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise BenchError(f"mproxy deploy failed ({r.returncode}): {r.stderr.strip()}\n"
                             + self.proc.tail())

    def request_log_lines(self) -> int:
        n = 0
        with contextlib.suppress(OSError), open(self.proc.stdout_path, "rb") as f:
            for line in f:
                if b'"Request"' in line:
                    n += 1
        return n


# --------------------------------------------------------------------------
# misc


def tcp_congestion_control() -> str:
    """
    The kernel's default TCP congestion control (every socket of every
    target gets it).  With one that paces (bbr) and no pacing qdisc, the
    kernel arms a timer whenever a socket sends faster than its pacing
    rate, which a proxy writing 256 KiB at a time on loopback does far more
    often than one writing 16 KiB: the large-body rows depend on it.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "kernel": os.uname().release, "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    info["tcp_congestion_control"] = tcp_congestion_control()
    for name, argv in (("nginx", ["nginx", "-v"]), ("caddy", ["caddy", "version"]),
                       ("wrk", ["wrk", "--version"])):
        if shutil.which(argv[0]):
            with contextlib.suppress(Exception):
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                info[name] = (r.stdout + r.stderr).strip().splitlines()[0]
    with contextlib.suppress(Exception):
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        info["git_commit"] = r.stdout.strip()
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "mproxy"],
                           capture_output=True, text=True, timeout=10)
        info["git_mproxy_dirty"] = bool(r.stdout.strip())
    return info


def write_results(prefix: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
