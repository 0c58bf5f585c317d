"""
End-to-end tests of the hitless upgrade: the real C{mproxy run} (and
C{twistd -n mproxy}) upgraded with C{mproxy upgrade} and SIGUSR2, with real
clients on 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import sys
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mproxy.testing import (
    LoadClient,
    MproxyProcess,
    ServerProtocol,
    child_env,
    listen_upstream,
)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class Connector:
    """
    Connects to a port again and again in a thread (blocking sockets), and
    records every refused connection.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.refused = 0
        self.connected = 0
        self.other: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = socket.socket()
            s.settimeout(30)
            try:
                s.connect(("127.0.0.1", self.port))
                self.connected += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as e:
                self.other.append(f"{errno.errorcode.get(e.errno or 0, e)}")
            finally:
                s.close()
            self._stop.wait(0.005)

    def stop(self) -> Deferred[None]:
        from twisted.internet.threads import deferToThread

        self._stop.set()
        return deferToThread(self._thread.join)


def state_and_certificates(state_dir: str) -> dict[str, str]:
    """
    Digest of every file under the state directory.
    """
    found = {}
    for root, _dirs, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, state_dir)] = hashlib.sha256(f.read()).hexdigest()
    return found


def records(proxy: MproxyProcess, msg: str) -> list[dict[str, Any]]:
    return [r for r in proxy.records if r.get("msg") == msg]


class UpgradeTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def start(self, *args: str) -> Any:
        app, port = listen_upstream(reactor, "web-1")
        self.addCleanup(port.stopListening)
        self.app = app
        proxy = MproxyProcess(reactor, self.mktemp(), extra_args=args)
        yield proxy.start()
        self.addCleanup(proxy.stop)
        result = yield proxy.command(
            "deploy", "app", "--target", f"127.0.0.1:{port.getHost().port}",
            "--host", "example.com",
        )
        self.assertEqual(result.status, 0, result.err)
        return proxy

    @inlineCallbacks
    def wait_for(self, proxy: MproxyProcess, msg: str, count: int) -> Any:
        for _ in range(600):
            if len(records(proxy, msg)) >= count:
                return
            yield sleep(0.05)
        self.fail(f"no {count} {msg!r} records: {proxy.records[-5:]}")

    @inlineCallbacks
    def test_upgrade_keeps_pid_sockets_and_state(self) -> Any:
        """
        C{mproxy upgrade} re-executes the server in its process: the PID is
        the same, a client connecting all along is never refused, requests
        under load all succeed, and the state is the same afterwards.
        """
        proxy = yield self.start("--metrics-port", "0")
        pid = proxy.process.pid
        before = state_and_certificates(proxy.state_dir)
        connector = Connector(proxy.http_port)
        load = LoadClient(reactor, proxy.http_port, clients=5, interval=0.01)
        load.start()
        yield load.until(20)
        result = yield proxy.command("upgrade")
        self.assertEqual(result.status, 0, result.err)
        self.assertIn(f"(pid {pid})", result.out)
        self.assertIn("Checking the new code", result.out)
        ok = load.report().ok
        yield load.until(ok + 20)
        report = yield load.stop()
        yield connector.stop()
        self.assertEqual(report.failures, ())
        self.assertEqual(connector.refused, 0)
        self.assertEqual(connector.other, [])
        self.assertGreater(connector.connected, 0)
        self.assertEqual(len(records(proxy, "Server started")), 2)
        self.assertEqual(records(proxy, "Upgrade done")[0]["pid"], pid)
        self.assertEqual(state_and_certificates(proxy.state_dir), before)
        listed = yield proxy.command("list", "--json")
        self.assertIn("example.com", listed.out)
        # the old workers (and the spare) were retired, and reaped: no zombies
        [adopted] = records(proxy, "Upgrade: adopted the old workers")
        self.assertTrue(adopted["pids"])
        for _ in range(40):
            left = [p for p in adopted["pids"] if os.path.exists(f"/proc/{p}")]
            if not left:
                break
            yield sleep(0.1)
        self.assertEqual(left, [], "the old workers are gone, not zombies")
        # the same PID still serves, and still stops gracefully
        self.assertEqual(proxy.process.pid, pid)
        status = yield proxy.stop()
        self.assertEqual(status, 0)
        self.assertFalse(os.path.exists(proxy.socket), "the control socket file is removed")

    @inlineCallbacks
    def test_slow_request_completes(self) -> Any:
        """
        A request in flight when the upgrade starts completes (the old
        image drains before it re-executes).
        """
        proxy = yield self.start()
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        agent = Agent(reactor)
        slow = agent.request(b"GET", proxy.url("/slow?ms=1500").encode(),
                             Headers({b"Host": [b"example.com"]}))
        yield sleep(0.3)
        result = yield proxy.command("upgrade", "--drain-timeout", "5s")
        self.assertEqual(result.status, 0, result.err)
        response = yield slow
        self.assertEqual(response.code, 200)
        self.assertEqual((yield readBody(response)), b"web-1")

    @inlineCallbacks
    def test_sigusr2_upgrades(self) -> Any:
        proxy = yield self.start()
        pid = proxy.process.pid
        proxy.send_signal(signal.SIGUSR2)
        yield self.wait_for(proxy, "Upgrade done", 1)
        self.assertEqual(len(records(proxy, "Server started")), 2)
        proxy.send_signal(signal.SIGUSR2)
        yield self.wait_for(proxy, "Upgrade done", 2)
        self.assertEqual(proxy.process.pid, pid)
        listed = yield proxy.command("list", "--json")
        self.assertIn("example.com", listed.out)

    @inlineCallbacks
    def test_failing_check_leaves_the_old_server(self) -> Any:
        """
        New code that cannot start (here: a state file it cannot read)
        fails the upgrade with the reason; the old server serves on.
        """
        proxy = yield self.start()
        state = os.path.join(proxy.state_dir, "mproxy.state")
        with open(state, "rb") as f:
            good = f.read()
        with open(state, "wb") as f:
            f.write(b"{not json")
        result = yield proxy.command("upgrade")
        with open(state, "wb") as f:
            f.write(good)
        self.assertEqual(result.status, 1)
        self.assertIn("Error: the new code cannot start:", result.err)
        self.assertIn("state", result.err)
        self.assertNotIn("Traceback", result.err)
        self.assertEqual(len(records(proxy, "Server started")), 1)
        load = LoadClient(reactor, proxy.http_port, clients=2)
        load.start()
        yield load.until(10)
        report = yield load.stop()
        self.assertEqual(report.failures, ())
        # and a later upgrade works
        result = yield proxy.command("upgrade")
        self.assertEqual(result.status, 0, result.err)


class TwistdUpgradeTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_twistd_upgrade_keeps_pidfile(self) -> Any:
        """
        C{twistd -n mproxy} upgrades in place; its pidfile names the same
        process afterwards.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        sock = os.path.join(directory, "m.sock")
        if len(sock) > 100:
            import tempfile

            sock = os.path.join(tempfile.mkdtemp(), "m.sock")
        pidfile = os.path.join(directory, "twistd.pid")
        protocol = ServerProtocol()
        twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        argv = [sys.executable, "-c", twistd, "-n", "--pidfile", pidfile, "mproxy",
                "--http-port", "0", "--https-port", "0", "--bind", "127.0.0.1",
                "--socket", sock, "--state-dir", os.path.join(directory, "state")]
        process = reactor.spawnProcess(protocol, sys.executable, argv, env=child_env(),
                                       path=directory)

        def stop() -> Any:
            if not protocol.ended.called and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
            return protocol.ended

        self.addCleanup(stop)
        record = yield protocol.started
        from mproxy.testing import run_mproxy

        result = yield run_mproxy(reactor, "upgrade", "--socket", sock)
        self.assertEqual(result.status, 0, result.err + protocol.stderr.decode())
        with open(pidfile) as f:
            self.assertEqual(int(f.read().strip()), process.pid)
        started = [r for r in protocol.records if r.get("msg") == "Server started"]
        self.assertEqual(len(started), 2)
        self.assertEqual(started[1]["http"], record["http"])
        status = yield stop()
        self.assertEqual(status, -signal.SIGTERM)  # twistd re-raises the stop signal
        self.assertFalse(os.path.exists(pidfile))


def https_serial(port: int, name: str, cafile: str) -> tuple[int, int]:
    """
    (status, serial of the certificate served) of a GET / to C{name}.
    """
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            serial = x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number
    return int(data.split(b" ", 2)[1]), serial


def workers_supported() -> bool:
    from mproxy.config import SERVER_OPTIONS

    return any(option.name == "workers" for option in SERVER_OPTIONS)


#: Upgrades in a row in the suite; MPROXY_TEST_UPGRADES=20 for the full run.
UPGRADES = int(os.environ.get("MPROXY_TEST_UPGRADES", "2"))


class UpgradeUnderLoadMixin:
    """
    Upgrades in a row under 20 keep-alive clients (that check an idle
    connection before reuse), each with a 3 s request and a WebSocket open
    as it starts.
    """

    server_args: tuple[str, ...] = ()
    #: whether an open WebSocket stays (on the old workers) until the drain
    #: timeout; a server without workers drains before the exec
    websocket_outlives_the_switch = False
    drain = 5.0

    @inlineCallbacks
    def test_upgrades_under_load(self) -> Any:
        from twisted.internet.threads import deferToThread
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        from mproxy.testing import listen_websocket_upstream, open_websocket
        from mproxy.tls.testing import make_ca, make_certificate, pem_pair

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        ca_path = os.path.join(work, "ca.pem")
        chain, key = pem_pair(make_certificate(["secure.test"], issuer=ca))
        for name, data in (("ca.pem", pem_pair(ca)[0]), ("cert.pem", chain), ("key.pem", key)):
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)
        app, port = listen_upstream(reactor, "web-1")
        self.addCleanup(port.stopListening)
        ws_app, ws_port = listen_websocket_upstream(reactor, "ws-1")
        self.addCleanup(ws_port.stopListening)
        proxy = MproxyProcess(reactor, os.path.join(work, "mproxy"), extra_args=self.server_args)
        yield proxy.start()
        self.addCleanup(proxy.stop)
        for args in (
            ("app", "--target", f"127.0.0.1:{port.getHost().port}", "--host", "example.com"),
            ("ws", "--target", f"127.0.0.1:{ws_port.getHost().port}", "--host", "ws.test"),
            ("secure", "--target", f"127.0.0.1:{port.getHost().port}", "--host", "secure.test",
             "--tls", "--tls-certificate-path", os.path.join(work, "cert.pem"),
             "--tls-private-key-path", os.path.join(work, "key.pem")),
        ):
            result = yield proxy.command("deploy", *args)
            self.assertEqual(result.status, 0, result.err)
        pid = proxy.process.pid
        before = state_and_certificates(proxy.state_dir)
        status, serial = yield deferToThread(https_serial, proxy.https_port, "secure.test",
                                             ca_path)
        self.assertEqual(status, 200)

        load = LoadClient(reactor, proxy.http_port, clients=20)
        load.start()
        yield load.until(50)
        agent = Agent(reactor)
        for n in range(UPGRADES):
            slow = agent.request(b"GET", proxy.url("/slow?ms=3000").encode(),
                                 Headers({b"Host": [b"example.com"]}))
            ws = yield open_websocket(reactor, proxy.http_port, b"/chat", b"ws.test")
            self.assertEqual((yield ws.echo(b"before")), b"ws-1:before")
            echoes: list[float] = []
            stop_echoing = False

            @inlineCallbacks
            def keep_echoing(ws: Any = ws) -> Any:
                import time

                i = 0
                while not stop_echoing and not ws.closed.called:
                    i += 1
                    try:
                        answer = yield ws.echo(b"%d" % i)
                    except ConnectionError:
                        return
                    self.assertEqual(answer, b"ws-1:%d" % i)
                    echoes.append(time.monotonic())
                    yield sleep(0.1)

            echoing = keep_echoing()
            yield sleep(0.3)
            import time

            started = time.monotonic()
            result = yield proxy.command("upgrade", "--drain-timeout", f"{self.drain:g}s")
            self.assertEqual(result.status, 0, f"upgrade {n}: {result.out} {result.err}")
            self.assertIn(f"(pid {pid})", result.out)
            response = yield slow
            self.assertEqual(response.code, 200, f"upgrade {n}")
            self.assertEqual((yield readBody(response)), b"web-1")
            code = yield ws.closed
            stop_echoing = True
            yield echoing
            self.assertEqual(code, 1001, f"upgrade {n}")
            if self.websocket_outlives_the_switch:
                done = [r for r in records(proxy, "Upgrade: retiring the old workers")]
                self.assertTrue(done)
                self.assertTrue(
                    [t for t in echoes if t > started + 1.0],
                    f"upgrade {n}: the WebSocket echoed after the new workers served",
                )
            report = load.report()
            self.assertEqual(report.failures, (), f"upgrade {n}")
            print(f"MEASURED upgrade {n}: {time.monotonic() - started:.1f}s, "
                  f"{report.ok} requests ok so far, {len(echoes)} echoes")
        report = yield load.stop()
        self.assertEqual(report.failures, ())
        self.assertEqual(proxy.process.pid, pid)
        self.assertEqual(len(records(proxy, "Upgrade done")), UPGRADES)
        self.assertEqual(state_and_certificates(proxy.state_dir), before)
        after = yield deferToThread(https_serial, proxy.https_port, "secure.test", ca_path)
        self.assertEqual(after, (200, serial))
        print(f"MEASURED {UPGRADES} upgrades under load: {report.ok} requests, "
              f"{len(report.failures)} failed, {report.connections} connections, "
              f"{report.discarded} idle connections discarded before reuse")


class WorkersUpgradeUnderLoadTests(UpgradeUnderLoadMixin, TestCase):
    timeout = 60 + 40 * UPGRADES
    server_args = ("--workers", "2")
    websocket_outlives_the_switch = True
    if not workers_supported():
        skip = "no --workers yet"


class ActivatedUpgradeTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_socket_activated_server_upgrades(self) -> Any:
        """
        A server given its sockets by systemd (LISTEN_FDS) hands them over
        at an upgrade too (its ports are held by other sockets, so binding
        them again would fail).
        """
        from tests.test_process_integration import ActivatedProcess, get, listening

        sockets = []
        for name in ("http", "https"):
            s = listening()
            self.addCleanup(s.close)
            sockets.append((name, s))
        occupied = []
        for _ in range(2):
            s = listening()
            self.addCleanup(s.close)
            occupied.append(s.getsockname()[1])
        app, port = listen_upstream(reactor, "web-1")
        self.addCleanup(port.stopListening)
        proxy = ActivatedProcess(reactor, self.mktemp(), sockets, (occupied[0], occupied[1]))
        yield proxy.start()
        self.addCleanup(proxy.stop)
        http_port = sockets[0][1].getsockname()[1]
        self.assertEqual(proxy.http_port, http_port)
        result = yield proxy.command("deploy", f"127.0.0.1:{port.getHost().port}")
        self.assertEqual(result.status, 0, result.err)
        for s in sockets:
            s[1].close()  # only mproxy holds them now
        result = yield proxy.command("upgrade")
        self.assertEqual(result.status, 0, result.err)
        from twisted.internet.threads import deferToThread

        answer = yield deferToThread(get, http_port)
        self.assertIn(b"web-1", answer)
        self.assertEqual(len(records(proxy, "Server started")), 2)


class Bursts:
    """
    Bursts of C{size} new connections at once, each with a GET, one burst
    after another in a thread until stopped; records every connection that
    did not get a 200 (refused, reset, or another answer).
    """

    def __init__(self, port: int, size: int = 20) -> None:
        self.port = port
        self.size = size
        self.bursts = 0
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tests.test_workers_integration import read_heads

        request = b"GET / HTTP/1.1\r\nHost: burst.test\r\nConnection: close\r\n\r\n"
        while not self._stop.is_set():
            clients = []
            try:
                for _ in range(self.size):
                    try:
                        clients.append(socket.create_connection(("127.0.0.1", self.port),
                                                                timeout=30))
                        clients[-1].sendall(request)
                    except OSError as e:
                        self.failures.append(f"connect: {errno.errorcode.get(e.errno or 0, e)}")
                try:
                    heads = read_heads(clients)
                except OSError as e:
                    self.failures.append(f"read: {errno.errorcode.get(e.errno or 0, e)}")
                    heads = []
                for head in heads:
                    if head == b"HTTP/1.1 200 OK":
                        self.served += 1
                    else:
                        self.failures.append(head.decode("latin-1") or "closed")
            finally:
                for c in clients:
                    c.close()
            self.bursts += 1
            self._stop.wait(0.02)

    def stop(self) -> Deferred[None]:
        from twisted.internet.threads import deferToThread

        self._stop.set()
        return deferToThread(self._thread.join)


def listening_sockets_on(port: int) -> int:
    """
    How many listening TCP sockets there are on C{port} (from /proc).
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return len(inodes)


class WorkerCountUpgradeTests(TestCase):
    """
    Upgrades that change how many workers serve (C{--workers auto} after
    the supervisor's CPUs changed), under bursts of new connections.
    """

    timeout = 180
    if not workers_supported():
        skip = "no --workers yet"
    elif len(os.sched_getaffinity(0)) < 2:
        skip = "needs two CPUs"

    @inlineCallbacks
    def test_bursts_through_upgrades_from_one_worker_to_two_and_back(self) -> Any:
        """
        One worker, upgraded to two (its sockets' groups grow), to two
        again, then back to one (which then serves both sockets of each
        group): bursts of
        20 new connections all along are all answered, none refused or
        reset; with two workers a burst is spread over both.
        """
        from tests.test_workers_integration import client_ports_of, open_with_requests

        app, port = listen_upstream(reactor, "web-1")
        self.addCleanup(port.stopListening)
        cpus = os.sched_getaffinity(0)
        one = {min(cpus)}
        proxy = MproxyProcess(reactor, self.mktemp(), extra_args=("--workers", "auto"))
        # started on one CPU: one worker
        os.sched_setaffinity(0, one)
        try:
            started = proxy.start()
        finally:
            os.sched_setaffinity(0, cpus)
        yield started
        self.addCleanup(proxy.stop)
        result = yield proxy.command("deploy", f"127.0.0.1:{port.getHost().port}")
        self.assertEqual(result.status, 0, result.err)
        pid = proxy.process.pid

        def workers() -> list[int]:
            return list(records(proxy, "Workers started")[-1]["pids"])

        self.assertEqual(len(workers()), 1)
        self.assertEqual(listening_sockets_on(proxy.http_port), 1)
        counts = []
        for n, affinity, expected in ((1, cpus, 2), (2, cpus, 2), (3, one, 1)):
            os.sched_setaffinity(pid, affinity)
            bursts = Bursts(proxy.http_port)
            yield sleep(0.3)
            result = yield proxy.command("upgrade", "--drain-timeout", "2s")
            self.assertEqual(result.status, 0, f"upgrade {n}: {result.out} {result.err}")
            yield self.wait_done(proxy, n)
            yield sleep(0.3)
            yield bursts.stop()
            self.assertEqual(bursts.failures, [], f"upgrade {n}")
            self.assertGreater(bursts.bursts, 2)
            now = workers()
            self.assertEqual(len(now), expected, f"upgrade {n}")
            # a socket per worker bound into the group; kept when fewer serve
            self.assertEqual(listening_sockets_on(proxy.http_port), 2, f"upgrade {n}")

            def burst(now: list[int] = now) -> list[int]:
                for w in now:
                    os.kill(w, signal.SIGSTOP)
                try:
                    clients = open_with_requests(proxy.http_port, 40)
                finally:
                    for w in now:
                        os.kill(w, signal.SIGCONT)
                from tests.test_workers_integration import read_heads

                heads = read_heads(clients)
                ours = {c.getsockname()[1] for c in clients}
                held = [len(client_ports_of(w, proxy.http_port) & ours) for w in now]
                for c in clients:
                    c.close()
                self.assertEqual(heads, [b"HTTP/1.1 200 OK"] * 40)
                return held

            from twisted.internet.threads import deferToThread

            held = yield deferToThread(burst)
            self.assertEqual(sum(held), 40, f"upgrade {n}")
            if expected == 2:
                self.assertGreaterEqual(min(held), 8, held)
            counts.append((expected, held, bursts.bursts, bursts.served))
        print(f"MEASURED worker-count upgrades (workers, burst per worker, bursts during, "
              f"connections served during): {counts}")

    @inlineCallbacks
    def wait_done(self, proxy: MproxyProcess, n: int) -> Any:
        for _ in range(400):
            if len(records(proxy, "Upgrade done")) >= n:
                return
            yield sleep(0.05)
        self.fail(f"upgrade {n} not done: {proxy.records[-5:]}")
