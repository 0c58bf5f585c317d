"""
Integration tests: the real C{mproxy} command in a child process, real
upstream servers and real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from mproxy.testing import MproxyProcess, listen_upstream, run_mproxy

ALLOWED = ("use host:port (a host name or IPv4 address, or an IPv6 address in "
           "brackets; port 1-65535; no scheme or path)")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class Load:
    """
    C{clients} concurrent keep-alive clients GETting a URL in a loop until
    stopped; every non-200 answer or error is a failure.
    """

    def __init__(self, url: str, clients: int = 20, path: str = "/") -> None:
        self.url = url
        self.clients = clients
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = clients
        self.running = False
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: dict[bytes, int] = {}
        self._loops: list[Deferred[None]] = []

    def start(self) -> None:
        self.running = True
        self._loops = [self._loop() for _ in range(self.clients)]

    @inlineCallbacks
    def _loop(self) -> Any:
        while self.running:
            try:
                r = yield treq.get(self.url, pool=self.pool, timeout=30)
                body = yield r.content()
            except Exception as e:  # noqa: BLE001 - every error is a failure here
                self.failures.append(repr(e))
                continue
            if r.code != 200:
                self.failures.append(f"{r.code} {body[:80]!r}")
            else:
                self.ok += 1
                self.bodies[body] = self.bodies.get(body, 0) + 1

    @inlineCallbacks
    def stop(self) -> Any:
        self.running = False
        yield DeferredList(self._loops)
        yield self.pool.closeCachedConnections()


class IntegrationMixin:
    timeout = 120

    def upstream(self, name: str) -> Any:
        app, port = listen_upstream(reactor, name)
        self.addCleanup(port.stopListening)
        return app, f"127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def proxy(self, *extra: str) -> Any:
        p = MproxyProcess(reactor, self.mktemp(), extra_args=extra)
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        return p

    @inlineCallbacks
    def serving(self, name: str, *deploy_args: str) -> Any:
        """
        An upstream called C{name}, a running proxy, and the upstream deployed
        to it (with C{deploy_args}); returns (app, address, proxy).
        """
        app, addr = self.upstream(name)
        p = yield self.proxy()
        r = yield p.command("deploy", addr, *deploy_args)
        self.assertEqual(r.status, 0, r.err)
        return app, addr, p

    @inlineCallbacks
    def get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        r = yield treq.get(url, headers=headers, pool=pool, timeout=20)
        body = yield r.content()
        return r.code, body, r


class DeployTests(IntegrationMixin, TestCase):
    @inlineCallbacks
    def test_deploy_routes_traffic(self) -> Any:
        """
        C{mproxy deploy HOST:PORT} routes traffic there; the target sees the
        forwarding headers; C{list} shows the service.
        """
        app, addr = self.upstream("one")
        p = yield self.proxy()
        code, body, _ = yield self.get(p.url())
        self.assertEqual(code, 404)
        r = yield p.command("deploy", addr)
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url("/hello?a=1"))
        self.assertEqual((code, body), (200, b"one"))
        self.assertEqual(app.last_headers[b"x-forwarded-for"], [b"127.0.0.1"])
        self.assertEqual(app.last_headers[b"x-mproxy-target"], [addr.encode()])
        self.assertIn(b"x-request-id", app.last_headers)
        r = yield p.command("list")
        self.assertEqual(r.status, 0, r.err)
        self.assertIn("default", r.out)
        self.assertIn(addr, r.out)
        self.assertIn("running", r.out)
        r = yield p.command("list", "--json")
        self.assertIn('"service": "default"', r.out)
        requests = [x for x in p.records if x.get("msg") == "Request"]
        self.assertTrue(any(x["status"] == 200 and x["service"] == "default" for x in requests))

    @inlineCallbacks
    def test_zero_downtime_switch_with_slow_request(self) -> Any:
        """
        Under 20 concurrent keep-alive clients, a deploy of a second target
        loses no request; a slow request started on the first target before the
        deploy completes with 200, and deploy returns only after it did.
        """
        one, addr1 = self.upstream("one")
        two, addr2 = self.upstream("two")
        p = yield self.proxy()
        r = yield p.command("deploy", addr1)
        self.assertEqual(r.status, 0, r.err)
        load = Load(p.url())
        load.start()
        slow = self.get(p.url("/slow?ms=2500"))
        yield sleep(0.5)
        started = time.monotonic()
        deploy = p.command("deploy", addr2)
        slow_done: list[float] = []
        slow.addCallback(lambda res: (slow_done.append(time.monotonic()), res)[1])
        r = yield deploy
        deploy_done = time.monotonic()
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield slow
        self.assertEqual((code, body), (200, b"one"))
        self.assertTrue(slow_done and slow_done[0] <= deploy_done + 0.05,
                        "deploy returned before the slow request finished")
        self.assertGreater(deploy_done - started, 1.5)
        yield sleep(0.3)
        yield load.stop()
        self.assertEqual(load.failures, [])
        self.assertGreater(load.bodies.get(b"two", 0), 0)
        # After the switch, everything goes to the new target.
        code, body, _ = yield self.get(p.url())
        self.assertEqual(body, b"two")

    @inlineCallbacks
    def test_back_to_back_deploys_under_load(self) -> Any:
        """
        50 deploys alternating two targets under 20 concurrent clients: zero
        failed requests.
        """
        one, addr1 = self.upstream("one")
        two, addr2 = self.upstream("two")
        p = yield self.proxy()
        r = yield p.command("deploy", addr1)
        self.assertEqual(r.status, 0, r.err)
        load = Load(p.url())
        load.start()
        for i in range(50):
            r = yield p.command("deploy", addr2 if i % 2 == 0 else addr1,
                                "--health-check-interval", "100ms")
            self.assertEqual(r.status, 0, r.err)
        yield load.stop()
        self.assertEqual(load.failures, [])
        self.assertGreater(load.ok, 100)
        self.assertGreater(load.bodies.get(b"one", 0), 0)
        self.assertGreater(load.bodies.get(b"two", 0), 0)

    @inlineCallbacks
    def test_unhealthy_target_fails_deploy_and_keeps_old(self) -> Any:
        """
        A target that never becomes healthy: exit 1 within the deploy timeout
        plus 1 s, naming the timeout and the last error; the old target still
        serves.
        """
        one, addr1 = self.upstream("one")
        bad, addr_bad = self.upstream("bad")
        bad.healthy = False
        p = yield self.proxy()
        r = yield p.command("deploy", addr1)
        self.assertEqual(r.status, 0, r.err)
        started = time.monotonic()
        r = yield p.command("deploy", addr_bad, "--deploy-timeout", "2s")
        elapsed = time.monotonic() - started
        self.assertEqual(r.status, 1)
        self.assertIn("Error: target failed to become healthy within configured timeout (2s)",
                      r.err)
        self.assertIn("unexpected status (503)", r.err)
        self.assertNotIn("Traceback", r.err)
        # Process start-up of the CLI is part of the measured time.
        self.assertLess(elapsed, 2 + 1 + 1.5)
        code, body, _ = yield self.get(p.url())
        self.assertEqual((code, body), (200, b"one"))
        # Nothing listening at all: the error names the connection failure.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        r = yield p.command("deploy", f"127.0.0.1:{dead}", "--deploy-timeout", "1s")
        self.assertEqual(r.status, 1)
        self.assertIn("(1s)", r.err)
        self.assertIn("refused", r.err.lower())

    @inlineCallbacks
    def test_host_routing_and_conflict(self) -> Any:
        """
        Two services on two hosts route by Host header (case-insensitive, port
        ignored); a third claiming a taken host is refused and nothing changes.
        """
        a, addr_a = self.upstream("a")
        b, addr_b = self.upstream("b")
        c, addr_c = self.upstream("c")
        p = yield self.proxy()
        r = yield p.command("deploy", addr_a, "--host", "app1.example.com")
        self.assertEqual(r.status, 0, r.err)
        r = yield p.command("deploy", "other", "--target", addr_b, "--host", "app2.example.com")
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url(), {"Host": "App1.Example.com:8080"})
        self.assertEqual((code, body), (200, b"a"))
        code, body, _ = yield self.get(p.url(), {"Host": "app2.example.com"})
        self.assertEqual((code, body), (200, b"b"))
        code, body, _ = yield self.get(p.url(), {"Host": "nothing.example.com"})
        self.assertEqual(code, 404)
        self.assertIn(b"404", body)
        r = yield p.command("deploy", "third", "--target", addr_c, "--host", "app2.example.com")
        self.assertEqual(r.status, 1)
        self.assertEqual(
            r.err.strip(),
            "Error: host settings conflict with another service: host app2.example.com "
            "is served by service other",
        )
        code, body, _ = yield self.get(p.url(), {"Host": "app2.example.com"})
        self.assertEqual((code, body), (200, b"b"))
        r = yield p.command("list", "--json")
        self.assertNotIn('"third"', r.out)

    @inlineCallbacks
    def test_remove_pause_resume_stop(self) -> Any:
        one, addr, p = yield self.serving("one")
        r = yield p.command("stop", "default", "--message", "Back <soon>")
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url())
        self.assertEqual(code, 503)
        self.assertIn(b"Back &lt;soon&gt;", body)
        code, body, _ = yield self.get(p.url("/up"))
        self.assertEqual(code, 200)
        r = yield p.command("pause", "default", "--max-pause", "5s")
        self.assertEqual(r.status, 0, r.err)
        held = self.get(p.url())
        yield sleep(0.5)
        self.assertFalse(held.called)
        r = yield p.command("resume", "default")
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield held
        self.assertEqual((code, body), (200, b"one"))
        r = yield p.command("rm", "default")
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url())
        self.assertEqual(code, 404)
        r = yield p.command("remove", "default")
        self.assertEqual((r.status, r.err.strip()), (1, "Error: service not found: default"))


class StateAndLifecycleTests(IntegrationMixin, TestCase):
    @inlineCallbacks
    def test_kill_9_then_restart_restores_routes(self) -> Any:
        one, addr, p = yield self.serving("one", "--host", "app.example.com")
        state_file = os.path.join(p.state_dir, "mproxy.state")
        self.assertEqual(stat.S_IMODE(os.stat(state_file).st_mode), 0o600)
        yield p.stop(signal.SIGKILL)
        started = time.monotonic()
        yield p.start()
        code, body, _ = yield self.get(p.url(), {"Host": "app.example.com"})
        self.assertEqual((code, body), (200, b"one"))
        self.assertLess(time.monotonic() - started, 1.0 + 1.5)  # interpreter start-up included
        self.assertTrue(any(x.get("msg") == "Restored saved state" for x in p.records))

    @inlineCallbacks
    def test_corrupt_state_file_stops_startup(self) -> Any:
        d = self.mktemp()
        p = MproxyProcess(reactor, d)
        os.makedirs(p.state_dir)
        path = os.path.join(p.state_dir, "mproxy.state")
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertRaises(RuntimeError) as e:
            yield p.start()
        self.assertIn("Error: state file " + path, str(e.exception))
        with open(path) as f:
            self.assertEqual(f.read(), "{not json")

    @inlineCallbacks
    def test_sigterm_lets_inflight_finish(self) -> Any:
        one, addr, p = yield self.serving("one")
        slow = self.get(p.url("/slow?ms=1500"))
        yield sleep(0.4)
        status = yield p.stop(signal.SIGTERM)
        code, body, _ = yield slow
        self.assertEqual((code, body), (200, b"one"))
        self.assertEqual(status, 0)
        self.assertTrue(any(x.get("msg") == "Server stopped" for x in p.records))

    @inlineCallbacks
    def test_control_socket_mode_and_live_socket_not_stolen(self) -> Any:
        p = yield self.proxy()
        self.assertEqual(stat.S_IMODE(os.stat(p.socket).st_mode), 0o600)
        second = MproxyProcess(reactor, p.directory)
        second.socket = p.socket
        second.http_port = 0
        with self.assertRaises(RuntimeError) as e:
            yield second.start()
        self.assertIn("already running", str(e.exception))
        r = yield p.command("list")
        self.assertEqual(r.status, 0, r.err)


class BadInputTests(IntegrationMixin, TestCase):
    @inlineCallbacks
    def test_cli_errors(self) -> Any:
        p = yield self.proxy()
        r = yield p.command("deploy", "web-1:3000", "--no-such-flag")
        self.assertEqual(r.status, 1)
        self.assertTrue(r.err.startswith("Error: "), r.err)
        r = yield p.command("deploy", "bad target!")
        self.assertEqual((r.status, r.err.strip()),
                         (1, "Error: invalid target 'bad target!': " + ALLOWED))
        r = yield p.command("deploy", "web-1:3000", "--deploy-timeout", "soon")
        self.assertEqual(r.status, 1)
        self.assertIn("invalid duration", r.err)
        missing = os.path.join(self.mktemp(), "none.sock")
        r = yield run_mproxy(reactor, "list", "--socket", missing)
        self.assertEqual(r.status, 1)
        self.assertIn(f"Error: cannot connect to mproxy at {missing}", r.err)
        self.assertNotIn("Traceback", r.err)

    @inlineCallbacks
    def test_garbage_and_oversized_headers_get_4xx(self) -> Any:
        one, addr, p = yield self.serving("one")

        def raw(data: bytes) -> bytes:
            s = socket.create_connection(("127.0.0.1", p.http_port), timeout=5)
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                out = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
                return out
            finally:
                s.close()

        from twisted.internet.threads import deferToThread

        out = yield deferToThread(raw, b"\x00\x01garbage\r\n\r\n")
        self.assertRegex(out[:12].decode("latin-1"), r"^HTTP/1\.[01] 4\d\d")
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
        out = yield deferToThread(raw, big)
        self.assertRegex(out[:12].decode("latin-1"), r"^HTTP/1\.[01] 4\d\d")
        smuggle = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        before = one.requests
        out = yield deferToThread(raw, smuggle)
        self.assertRegex(out[:12].decode("latin-1"), r"^HTTP/1\.[01] 400")
        self.assertEqual(one.requests, before)
        # The server is still fine.
        code, body, _ = yield self.get(p.url())
        self.assertEqual((code, body), (200, b"one"))

    @inlineCallbacks
    def test_undecodable_path_is_logged(self) -> Any:
        """
        A request whose path has an escape that is not UTF-8 (C{/%ff}) is
        proxied and gets its request log line like any other, the escape
        kept as a lone surrogate's JSON escape.
        """
        _one, _addr, p = yield self.serving("one")
        code, body, _ = yield self.get(p.url("/a%ff?q=%fe"))
        self.assertEqual((code, body), (200, b"one"))
        code, _, _ = yield self.get(p.url("/after"))
        self.assertEqual(code, 200)
        waited = time.monotonic()
        while not any(x.get("path") == "/after" for x in p.records):
            self.assertLess(time.monotonic() - waited, 10.0, "no log line for /after")
            yield sleep(0.05)
        paths = [x.get("path") for x in p.records if x.get("msg") == "Request"]
        self.assertEqual(paths, ["/a\udcff", "/after"])

    @inlineCallbacks
    def test_malformed_amp_message(self) -> Any:
        p = yield self.proxy()

        def send() -> bytes:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(p.socket)
            s.sendall(b"\xff\xff\xff garbage that is not AMP\x00\x00")
            try:
                return s.recv(4096)
            except OSError:
                return b""
            finally:
                s.close()

        from twisted.internet.threads import deferToThread

        yield deferToThread(send)
        r = yield p.command("list")
        self.assertEqual(r.status, 0, r.err)
