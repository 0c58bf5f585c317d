"""
Integration tests of worker processes: the real C{mproxy run --workers 2}
(a supervisor and two workers), real upstreams, 20 concurrent keep-alive
clients that check an idle connection before reusing it (as urllib3 does).
Each test prints its figures as a C{workers figures:} JSON line.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess, listen_upstream


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def figures(**values: Any) -> None:
    print("workers figures:", json.dumps(values))


class KeepAliveLoad:
    """
    C{clients} threads, each GETting C{path} over its own keep-alive
    connection; a connection found readable or closed while idle is
    replaced before the next request (urllib3's check).  Failures are kept
    with the client port of the connection they happened on.
    """

    def __init__(self, port: int, clients: int = 20, path: str = "/") -> None:
        self.port = port
        self.path = path
        self.clients = clients
        self.ok = 0
        self.failures: list[tuple[int | None, str]] = []
        self.ports_seen: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> Deferred[None]:
        self._stop.set()

        def join() -> None:
            for t in self._threads:
                t.join(30)

        return deferToThread(join)

    @staticmethod
    def _dropped(conn: http.client.HTTPConnection) -> bool:
        sock = conn.sock
        if sock is None:
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is not None and self._dropped(conn):
                conn.close()
                conn = None
            local = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
                    conn.connect()
                local = conn.sock.getsockname()[1]
                with self._lock:
                    self.ports_seen.add(local)
                conn.request("GET", self.path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
                with self._lock:
                    self.ok += 1
            except Exception as e:
                with self._lock:
                    self.failures.append((local, f"{type(e).__name__}: {e}"))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def client_ports_of(pid: int, server_port: int) -> set[int]:
    """
    The client ports of the connections process C{pid} accepted on
    C{server_port} (from /proc).
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(local.rsplit(":", 1)[1], 16) == server_port:
                    ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


def open_with_requests(port: int, n: int, host: bytes = b"burst.test") -> list[Any]:
    """
    C{n} connections to C{port}, each with a GET sent.
    """
    import socket

    request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    clients = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(request)
        clients.append(client)
    return clients


def read_heads(clients: list[Any]) -> list[bytes]:
    """
    The status line each of C{clients} got (C{b""}: none).
    """
    heads = []
    for client in clients:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
        heads.append(data.split(b"\r\n", 1)[0])
    return heads


class WorkersTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def serving(self, *names: str) -> Any:
        apps = []
        for name in names:
            app, port = listen_upstream(reactor, name)
            self.addCleanup(port.stopListening)
            apps.append((app, f"127.0.0.1:{port.getHost().port}"))
        p = MproxyProcess(reactor, self.mktemp(), extra_args=("--workers", "2"))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command("deploy", apps[0][1])
        self.assertEqual(r.status, 0, r.err)
        return p, apps

    def worker_pids(self, p: MproxyProcess) -> list[int]:
        started = [r for r in p.records if r.get("msg") == "Workers started"]
        return list(started[-1]["pids"])

    @inlineCallbacks
    def test_kill_9_of_one_worker_under_load(self) -> Any:
        """
        A worker killed under load: only the connections it held fail; a
        replacement serves within a second; the supervisor logs it.
        """
        p, _ = yield self.serving("one")
        load = KeepAliveLoad(p.http_port)
        load.start()
        yield sleep(2.0)
        victim, survivor = self.worker_pids(p)
        held = yield deferToThread(client_ports_of, victim, p.http_port)
        before = load.ok
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        yield sleep(3.0)
        yield load.stop()
        replaced = [r for r in p.records if r.get("msg") == "Worker replaced"]
        self.assertTrue(replaced, [r.get("msg") for r in p.records])
        self.assertEqual(replaced[0]["was"], victim)
        exited = [r for r in p.records if r.get("msg", "").startswith("Worker exited")]
        self.assertEqual(exited[0]["level"], "ERROR")
        others = [f for f in load.failures if f[0] not in held]
        self.assertEqual(others, [])
        self.assertGreater(load.ok, before)
        self.assertLess(replaced[0]["seconds"], 1.0)
        # the replacement serves: new connections (spread over both) get 200
        def fresh() -> list[int]:
            statuses = []
            for _ in range(10):
                conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=10)
                conn.request("GET", "/")
                statuses.append(conn.getresponse().status)
                conn.close()
            return statuses

        self.assertEqual((yield deferToThread(fresh)), [200] * 10)
        figures(test="kill -9 of one worker", requests=load.ok + len(load.failures),
                failed=len(load.failures), failed_elsewhere=len(others),
                connections_of_the_dead_worker=len(held),
                replacement_serving_s=replaced[0]["seconds"],
                since_kill_s=round(time.monotonic() - killed, 2))

    @inlineCallbacks
    def test_a_burst_of_connections_is_shared_by_the_workers(self) -> Any:
        """
        40 connections that arrive together, each with a request (a load
        generator starting up): both workers take a share of them (the
        kernel spreads them over the workers' sockets), instead of the
        first worker to wake taking the whole accept queue.
        """
        p, _ = yield self.serving("one")
        workers = self.worker_pids(p)

        def burst() -> list[Any]:
            # queued in the kernel while the workers are stopped, so that
            # both find the whole burst waiting when they resume
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            try:
                clients = open_with_requests(p.http_port, 40)
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            heads = read_heads(clients)
            ours = {client.getsockname()[1] for client in clients}
            held = [len(client_ports_of(pid, p.http_port) & ours) for pid in workers]
            for client in clients:
                client.close()
            return [heads, held]

        heads, held = yield deferToThread(burst)
        self.assertEqual(heads, [b"HTTP/1.1 200 OK"] * 40)
        self.assertEqual(sum(held), 40)
        self.assertGreaterEqual(min(held), 8, held)
        figures(test="burst of 40 connections", per_worker=held)

    @inlineCallbacks
    def test_connections_queued_on_a_killed_workers_socket_are_served(self) -> Any:
        """
        Both workers stopped, 20 connections queue on their sockets; one
        worker is killed: its replacement serves every one of them, those
        on its own socket and those on the other (still stopped) worker's
        too.  The supervisor held the dead worker's socket open: nothing
        queued there was reset.
        """
        p, _ = yield self.serving("one")
        dead, stuck = self.worker_pids(p)
        for pid in (dead, stuck):
            os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(stuck, signal.SIGCONT))
        clients = yield deferToThread(open_with_requests, p.http_port, 20)
        os.kill(dead, signal.SIGKILL)
        for _ in range(200):
            replaced = [r for r in p.records if r.get("msg") == "Worker replaced"]
            if replaced:
                break
            yield sleep(0.05)
        self.assertEqual(replaced[0]["was"], dead)
        replacement = replaced[0]["pid"]
        heads = yield deferToThread(read_heads, clients)
        ours = {client.getsockname()[1] for client in clients}
        held = yield deferToThread(client_ports_of, replacement, p.http_port)
        os.kill(stuck, signal.SIGCONT)
        for client in clients:
            client.close()
        self.assertEqual(heads, [b"HTTP/1.1 200 OK"] * 20)
        self.assertEqual(len(held & ours), 20)
        figures(test="connections queued on a killed worker", served_by_replacement=20)

    @inlineCallbacks
    def test_bursts_over_ipv6_http_and_https(self) -> Any:
        """
        Bound to C{::1}: bursts of new connections to the HTTP and the
        HTTPS port (each port and address a socket per worker) are all
        answered, and spread over both workers.
        """
        import socket
        import ssl

        from mproxy.tls.testing import make_ca, make_certificate, pem_pair

        if not socket.has_ipv6:
            raise self.skipTest("no IPv6")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        chain, key = pem_pair(make_certificate(["secure.test"], issuer=ca))
        paths = {}
        for name, data in (("ca.pem", pem_pair(ca)[0]), ("cert.pem", chain), ("key.pem", key)):
            paths[name] = os.path.join(work, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        app, upstream = listen_upstream(reactor, "one")
        self.addCleanup(upstream.stopListening)
        p = MproxyProcess(reactor, os.path.join(work, "mproxy"),
                          extra_args=("--workers", "2", "--bind", "::1"))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        target = f"127.0.0.1:{upstream.getHost().port}"
        for args in (("secure", "--target", target, "--host", "secure.test", "--tls",
                      "--tls-certificate-path", paths["cert.pem"],
                      "--tls-private-key-path", paths["key.pem"]),
                     ("plain", "--target", target, "--host", "plain.test")):
            r = yield p.command("deploy", *args)
            self.assertEqual(r.status, 0, r.err)
        workers = self.worker_pids(p)
        context = ssl.create_default_context(cafile=paths["ca.pem"])

        def burst(port: int, tls: bool) -> list[Any]:
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            raw = []
            try:
                for _ in range(30):
                    raw.append(socket.create_connection(("::1", port), timeout=30))
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            clients = [context.wrap_socket(c, server_hostname="secure.test") if tls else c
                       for c in raw]
            host = b"secure.test" if tls else b"plain.test"
            for c in clients:
                c.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            heads = read_heads(clients)
            ours = {c.getsockname()[1] for c in clients}
            held = [len(client_ports_of(pid, port) & ours) for pid in workers]
            for c in clients:
                c.close()
            return [heads, held]

        for port, tls in ((p.https_port, True), (p.http_port, False)):
            heads, held = yield deferToThread(burst, port, tls)
            self.assertEqual(heads, [b"HTTP/1.1 200 OK"] * 30)
            self.assertEqual(sum(held), 30, (tls, held))
            self.assertGreaterEqual(min(held), 5, (tls, held))
            figures(test=f"burst of 30 over IPv6, {'HTTPS' if tls else 'HTTP'}", per_worker=held)

    @inlineCallbacks
    def test_50_deploys_under_load(self) -> Any:
        """
        50 back-to-back deploys alternating two targets under 20 keep-alive
        clients: zero failed requests.
        """
        p, apps = yield self.serving("one", "two")
        load = KeepAliveLoad(p.http_port)
        load.start()
        yield sleep(1.0)
        started = time.monotonic()
        for i in range(50):
            r = yield p.command("deploy", apps[(i + 1) % 2][1])
            self.assertEqual(r.status, 0, r.err)
        took = time.monotonic() - started
        yield sleep(0.5)
        yield load.stop()
        self.assertEqual(load.failures, [])
        self.assertGreater(load.ok, 100)
        figures(test="50 deploys under load", requests=load.ok, failed=len(load.failures),
                deploys_s=round(took, 2))

    @inlineCallbacks
    def test_slow_requests_on_both_workers_finish_before_deploy_returns(self) -> Any:
        """
        Slow requests over many connections (so both workers hold some):
        the deploy returns only after all of them completed with 200, and
        its answer counts them.
        """
        p, apps = yield self.serving("one", "two")
        finished: list[float] = []

        def slow() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=30)
            conn.request("GET", "/slow?ms=6000")
            status = conn.getresponse().status
            finished.append(time.monotonic())
            conn.close()
            return status

        requests = [deferToThread(slow) for _ in range(8)]
        # all eight at the old target before the deploy starts (on a loaded
        # machine the threads' requests can take longer than a fixed wait),
        # and slow enough to outlast the deploy command's own start-up
        waited = time.monotonic()
        while apps[0][0].requests < 8:
            self.assertLess(time.monotonic() - waited, 10.0, apps[0][0].requests)
            yield sleep(0.05)
        holding = []
        for pid in self.worker_pids(p):
            holding.append(len((yield deferToThread(client_ports_of, pid, p.http_port))))
        r = yield p.command("deploy", apps[1][1])
        returned = time.monotonic()
        self.assertEqual(r.status, 0, r.err)
        statuses = []
        for d in requests:
            statuses.append((yield d))
        self.assertEqual(statuses, [200] * 8)
        self.assertTrue(all(t <= returned for t in finished), (finished, returned))
        deployed = [x for x in p.records if x.get("msg") == "Deployed"][-1]
        self.assertEqual(deployed["drained"], 8)
        figures(test="slow requests on both workers", per_worker=holding,
                drained=deployed["drained"])

    @inlineCallbacks
    def test_list_and_metrics_sum_workers(self) -> Any:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        p = MproxyProcess(reactor, self.mktemp(),
                          extra_args=("--workers", "2", "--metrics-port", str(metrics_port)))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        app, port = listen_upstream(reactor, "one")
        self.addCleanup(port.stopListening)
        r = yield p.command("deploy", f"127.0.0.1:{port.getHost().port}")
        self.assertEqual(r.status, 0, r.err)

        def get_many() -> None:
            for _ in range(20):
                conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=10)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()

        yield deferToThread(get_many)

        def scrape() -> str:
            conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()

        text = yield deferToThread(scrape)
        line = [x for x in text.splitlines()
                if x.startswith("mproxy_http_requests_total{") and 'status="200"' in x]
        self.assertEqual(len(line), 1, line)
        self.assertEqual(float(line[0].rsplit(" ", 1)[1]), 20.0)
        self.assertIn('mproxy_deploys_total{outcome="success",service="default"} 1.0', text)
        def slow() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=10)
            conn.request("GET", "/slow?ms=3000")
            return conn.getresponse().status

        waiting = deferToThread(slow)
        yield sleep(0.7)
        r = yield p.command("list", "--json")
        self.assertEqual(json.loads(r.out)[0]["inflight"], 1)
        self.assertEqual((yield waiting), 200)
