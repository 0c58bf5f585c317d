"""
End to end: a real C{mproxy run --http3} with custom certificates, real
upstream servers and aioquic's HTTP/3 client (L{mproxy.testing.H3Client}).
"""

from __future__ import annotations

import os
import random
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.testing import H3Client, H3ConnectionLost
from mproxy.testing import MproxyProcess, listen_upstream
from mproxy.tls.testing import make_ca, make_certificate, pem_pair


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class HTTP3Tests(TestCase):
    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.ca = make_ca()
        self.ca_path = self.write("ca.pem", pem_pair(self.ca)[0])
        self.proxy = MproxyProcess(reactor, os.path.join(self.work, "mproxy"),
                                   extra_args=("--http3",))
        yield self.proxy.start()
        self.addCleanup(self.proxy.stop, signal.SIGKILL)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.work, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    @inlineCallbacks
    def deploy_tls(self, service: str, host: str, upstream: str, *extra: str) -> Any:
        if not hasattr(self, "certs"):
            self.certs: dict[str, Any] = {}
        certified = self.certs.get(host) or make_certificate([host], issuer=self.ca)
        self.certs[host] = certified
        chain, key = pem_pair(certified)
        cert = self.write(f"{service}-cert.pem", chain)
        keyfile = self.write(f"{service}-key.pem", key)
        r = yield self.proxy.command(
            "deploy", service, "--target", upstream, "--host", host, "--tls",
            "--tls-certificate-path", cert, "--tls-private-key-path", keyfile, *extra,
        )
        self.assertEqual(r.status, 0, r.err)
        return certified

    @inlineCallbacks
    def request_records(self, n: int) -> Any:
        """
        The server's C{Request} log records once there are C{n} (the line is
        written after the response, and read from the child's stdout).
        """
        for _ in range(100):
            logged = [rec for rec in self.proxy.records if rec.get("msg") == "Request"]
            if len(logged) >= n:
                return logged
            yield sleep(0.05)
        return logged

    def upstream(self, name: str) -> tuple[Any, str]:
        app, port = listen_upstream(reactor, name)
        self.addCleanup(port.stopListening)
        return app, f"127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def client(self, host: str) -> Any:
        c = H3Client(reactor, "127.0.0.1", self.proxy.https_port, server_name=host,
                     cafile=self.ca_path)
        self.addCleanup(c.close)
        yield c.connect()
        return c

    @inlineCallbacks
    def test_get_and_certificate_per_server_name(self) -> Any:
        """
        An HTTP/3 GET gets the target's answer, logged as HTTP/3.0; each
        server name gets its own service's custom certificate over QUIC; a
        name without a certificate is refused in the handshake.
        """
        _, one = self.upstream("one")
        _, two = self.upstream("two")
        cert_one = yield self.deploy_tls("one", "one.test", one)
        cert_two = yield self.deploy_tls("two", "two.test", two)
        for host, cert, body in (("one.test", cert_one, b"one"), ("two.test", cert_two, b"two")):
            c = yield self.client(host)
            self.assertEqual(c.peer_certificate.serial_number, cert.leaf.serial_number)
            r = yield c.request("GET", "/")
            self.assertEqual((r.status, r.body), (200, body))
            self.assertIsNone(r.header(b"alt-svc"))
        logged = yield self.request_records(2)
        self.assertEqual([(rec["proto"], rec["host"], rec["status"], rec["scheme"])
                          for rec in logged],
                         [("HTTP/3.0", "one.test", 200, "https"),
                          ("HTTP/3.0", "two.test", 200, "https")])
        c = H3Client(reactor, "127.0.0.1", self.proxy.https_port, server_name="none.test",
                     cafile=None)
        self.addCleanup(c.close)
        yield self.assertFailure(c.connect(), H3ConnectionLost)

    @inlineCallbacks
    def test_alt_svc_on_tcp_tls_responses(self) -> Any:
        """
        Responses on the HTTPS TCP listener advertise HTTP/3 on the HTTPS
        port; plain HTTP responses do not.
        """
        _, one = self.upstream("one")
        yield self.deploy_tls("one", "one.test", one, "--tls-redirect=false")
        status, head = yield deferToThread(
            https_get_headers, self.proxy.https_port, "one.test", self.ca_path)
        self.assertEqual(status, 200)
        self.assertIn(b'alt-svc: h3=":%d"; ma=2592000' % self.proxy.https_port, head.lower())
        status, head = yield deferToThread(http_get_head, self.proxy.http_port, "one.test")
        self.assertEqual(status, 200)
        self.assertNotIn(b"alt-svc", head.lower())

    @inlineCallbacks
    def test_deploy_under_load_and_in_flight(self) -> Any:
        """
        Deploys under HTTP/3 load (a few clients, each with requests in
        flight on one connection) fail no request; a slow HTTP/3 request on
        the old target completes before C{deploy} returns, on the old
        target.
        """
        _, first = self.upstream("first")
        _, second = self.upstream("second")
        yield self.deploy_tls("web", "web.test", first)
        clients = []
        for _ in range(3):
            c = yield self.client("web.test")
            clients.append(c)
        results: list[Any] = []
        stop = [False]

        @inlineCallbacks
        def load(c: H3Client) -> Any:
            while not stop[0]:
                try:
                    r = yield c.request("GET", "/")
                    results.append((r.status, r.body))
                except Exception as e:  # counted as a failure
                    results.append(("error", repr(e)))

        loops = [load(c) for c in clients for _ in range(2)]
        yield sleep(0.5)
        slow = clients[0].request("GET", "/slow?ms=1500")
        slow_done: list[bool] = []
        slow.addCallback(lambda r: (slow_done.append(True), r)[1])
        yield sleep(0.2)
        yield self.deploy_tls("web", "web.test", second)
        self.assertTrue(slow_done, "deploy returned before the in-flight request finished")
        for target in (first, second):
            yield self.deploy_tls("web", "web.test", target)
        stop[0] = True
        yield gatherResults(loops)
        r = yield slow
        self.assertEqual((r.status, r.body), (200, b"first"))
        failures = [x for x in results if x[0] != 200]
        self.assertEqual(failures, [])
        self.assertGreater(len(results), 50)
        self.assertEqual({body for _, body in results}, {b"first", b"second"})

    @inlineCallbacks
    def test_pause_holds_and_resume_releases(self) -> Any:
        """
        A paused service holds an HTTP/3 request; resume sends it on; after
        C{stop} it gets the 503 page.
        """
        _, up = self.upstream("web")
        yield self.deploy_tls("web", "web.test", up)
        c = yield self.client("web.test")
        r = yield self.proxy.command("pause", "web", "--max-pause", "20s")
        self.assertEqual(r.status, 0, r.err)
        held = c.request("GET", "/")
        yield sleep(0.7)
        self.assertNoResult(held)
        r = yield self.proxy.command("resume", "web")
        self.assertEqual(r.status, 0, r.err)
        r = yield held
        self.assertEqual((r.status, r.body), (200, b"web"))
        r = yield self.proxy.command("stop", "web")
        self.assertEqual(r.status, 0, r.err)
        r = yield c.request("GET", "/")
        self.assertEqual(r.status, 503)

    @inlineCallbacks
    def test_request_body_and_limits(self) -> Any:
        """
        A POST body reaches the target (streamed); with request buffering,
        a body over the limit is the 413 page.
        """
        _, up = self.upstream("echo")
        yield self.deploy_tls("web", "web.test", up)
        c = yield self.client("web.test")
        body = os.urandom(300_000)
        r = yield c.request("POST", "/echo", body=body,
                            headers=[(b"content-length", b"%d" % len(body))])
        self.assertEqual((r.status, r.body), (200, body))
        yield self.deploy_tls("limited", "limited.test", up, "--buffer-requests",
                              "--max-request-body", "1000")
        c = yield self.client("limited.test")
        r = yield c.request("POST", "/echo", body=b"x" * 5000,
                            headers=[(b"content-length", b"5000")])
        self.assertEqual(r.status, 413)
        r = yield c.request("POST", "/echo", body=b"small",
                            headers=[(b"content-length", b"5")])
        self.assertEqual((r.status, r.body), (200, b"small"))

    @inlineCallbacks
    def test_stop_lets_request_finish(self) -> Any:
        """
        SIGTERM with an HTTP/3 request in flight: it completes, then the
        server exits cleanly.
        """
        _, up = self.upstream("web")
        yield self.deploy_tls("web", "web.test", up)
        c = yield self.client("web.test")
        slow = c.request("GET", "/slow?ms=1000")
        yield sleep(0.3)
        self.proxy.send_signal(signal.SIGTERM)
        r = yield slow
        self.assertEqual((r.status, r.body), (200, b"web"))
        code = yield self.proxy.protocol.ended
        self.assertEqual(code, 0)

    @inlineCallbacks
    def test_fuzzed_datagrams(self) -> Any:
        """
        Random and mutated datagrams (bounded) do not crash the server or
        stop it serving; the connections they opened are gone after the idle
        timeout (here 2 s).
        """
        yield self.proxy.stop()
        self.proxy = MproxyProcess(reactor, os.path.join(self.work, "mproxy2"),
                                   extra_args=("--http3", "--http-idle-timeout", "2s"))
        yield self.proxy.start()
        self.addCleanup(self.proxy.stop, signal.SIGKILL)
        _, up = self.upstream("web")
        yield self.deploy_tls("web", "web.test", up)
        rng = random.Random(7)
        # a real client's first datagram, to mutate
        probe = H3Client(reactor, "127.0.0.1", 9, server_name="web.test")
        probe.quic.connect(probe.address, now=reactor.seconds())
        initial = probe.quic.datagrams_to_send(now=reactor.seconds())[0][0]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        for i in range(600):
            if i % 3 == 0:
                data = rng.randbytes(rng.randint(1, 1400))
            elif i % 3 == 1:
                data = bytearray(initial)
                for _ in range(rng.randint(1, 30)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            else:
                data = bytes([0xC0 | rng.getrandbits(6), 0, 0, 0, 1, 8]) + rng.randbytes(
                    rng.randint(0, 1300))
            s.sendto(data, ("127.0.0.1", self.proxy.https_port))
            if i % 50 == 0:
                yield sleep(0.01)
        c = yield self.client("web.test")
        r = yield c.request("GET", "/")
        self.assertEqual((r.status, r.body), (200, b"web"))
        c.close()
        yield sleep(3)
        c = yield self.client("web.test")
        r = yield c.request("GET", "/")
        self.assertEqual((r.status, r.body), (200, b"web"))
        errors = [rec for rec in self.proxy.records if rec.get("level") == "ERROR"]
        self.assertEqual(errors, [])


def https_get_headers(port: int, host: str, cafile: str) -> tuple[int, bytes]:
    """
    A blocking HTTPS/1.1 GET of C{/}: (status, response head).
    """
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    head = data.partition(b"\r\n\r\n")[0]
    return int(head.split(b" ", 2)[1]), head


def http_get_head(port: int, host: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.partition(b"\r\n\r\n")[0]
    return int(head.split(b" ", 2)[1]), head
