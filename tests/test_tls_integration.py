"""
Automatic TLS end to end: the real C{mproxy run} in a child process, a real
upstream, and Debian's pebble ACME server validating challenges against
mproxy's own ports, all on 127.0.0.1.

Pebble resolves every name to 127.0.0.1 through L{LoopbackDNS}, dials
HTTP-01 on mproxy's HTTP port and TLS-ALPN-01 on its HTTPS port (or, to
block HTTP-01, a closed port).  Clients connect to 127.0.0.1 with the SNI of
the name they test and trust only pebble's root.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

import treq
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from mproxy.testing import MproxyProcess, listen_upstream
from mproxy.tls.testing import https_get_h2, make_ca, make_certificate, pem_pair
from tests.pebble import PEBBLE_SKIP, LoopbackDNS, Pebble, free_port


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def https_get(
    port: int, sni: str | None, cafile: str | None, path: str = "/", alpn: str = "http/1.1"
) -> tuple[int, bytes, int, str]:
    """
    Blocking HTTPS GET over a new connection to 127.0.0.1:C{port} with SNI
    C{sni} (None: no SNI), verifying the certificate for C{sni} against
    C{cafile} (no verification when None).  Returns (status, body, leaf
    serial, ALPN).
    """
    if cafile is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {sni or '127.0.0.1'}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            leaf = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
            alpn_used = s.selected_alpn_protocol() or ""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body, leaf.serial_number, alpn_used


def wait_for_https(
    port: int, sni: str, cafile: str, timeout: float = 10.0
) -> tuple[float, tuple[int, bytes, int, str]]:
    """
    Blocking: retry L{https_get} until a handshake verifies (the certificate
    was issued) or C{timeout} passes.  Returns (seconds waited, result).
    """
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            return time.monotonic() - started, https_get(port, sni, cafile)
        except (ssl.SSLError, OSError) as e:
            last = e
            time.sleep(0.1)
    raise AssertionError(f"no valid certificate for {sni} within {timeout}s: {last!r}")


def handshake_refused(port: int, sni: str) -> bool:
    """
    Blocking: True when a TLS handshake for C{sni} fails (no certificate).
    """
    try:
        https_get(port, sni, None)
    except (ssl.SSLError, OSError):
        return True
    return False


class TLSIntegration(TestCase):
    """
    Per test: an upstream, a loopback DNS server and pebble, set up for
    mproxy on two fixed free ports (so that a restart keeps them).
    """

    skip = PEBBLE_SKIP
    timeout = 60
    validity: int | None = None
    http01 = True  # may pebble reach mproxy's HTTP port for HTTP-01?

    def setUp(self) -> None:
        self.http_port = free_port()
        self.https_port = free_port()
        dns = LoopbackDNS(reactor)
        self.addCleanup(dns.stop)
        work = os.path.abspath(self.mktemp())
        self.pebble = Pebble(
            os.path.join(work, "pebble"),
            http_port=self.http_port if self.http01 else free_port(),
            tls_port=self.https_port,
            dns_port=dns.port,
            validity=self.validity,
        )
        self.pebble.start()
        self.addCleanup(self.pebble.stop)
        self.root = os.path.join(work, "root.pem")
        with open(self.root, "wb") as f:
            f.write(self.pebble.root_pem())
        self.app, port = listen_upstream(reactor, "app1")
        self.addCleanup(port.stopListening)
        self.upstream = f"127.0.0.1:{port.getHost().port}"
        self.proxy_dir = os.path.join(work, "mproxy")

    @inlineCallbacks
    def proxy(self) -> Any:
        p = MproxyProcess(
            reactor,
            self.proxy_dir,
            http_port=self.http_port,
            https_port=self.https_port,
            extra_args=(
                "--acme-directory", self.pebble.directory_url,
                "--acme-ca-bundle", self.pebble.ca_bundle,
            ),
        )
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        return p

    def orders(self) -> int:
        """
        How many orders pebble has received so far.
        """
        with open(self.pebble.log_path, "rb") as f:
            return f.read().count(b"Added order")

    @inlineCallbacks
    def deploy_app1(self, p: MproxyProcess) -> Any:
        r = yield p.command("deploy", self.upstream, "--host", "app1.test", "--ssl")
        self.assertEqual(r.status, 0, r.err)

    def log_messages(self, p: MproxyProcess) -> str:
        return "\n".join(str(r) for r in p.records)


class ACMEHTTP01Tests(TLSIntegration):
    @inlineCallbacks
    def test_deploy_ssl_issues_and_serves(self) -> Any:
        """
        After C{deploy --host app1.test --ssl} a certificate chaining to
        pebble's root serves app1.test within 10 s over HTTP/1.1 and HTTP/2;
        plain HTTP is redirected to HTTPS with the non-default port kept;
        C{list} shows the certificate; a handshake for a name that was never
        deployed gets no certificate and places no order.
        """
        p = yield self.proxy()
        yield self.deploy_app1(p)
        waited, (status, body, serial, alpn) = yield deferToThread(
            wait_for_https, self.https_port, "app1.test", self.root
        )
        self.assertLess(waited, 10)
        self.assertEqual((status, body, alpn), (200, b"app1", "http/1.1"))
        self.assertEqual(self.app.last_headers[b"x-forwarded-proto"], [b"https"])
        # a client without SNI gets the default TLS host's certificate
        _, _, no_sni_serial, _ = yield deferToThread(https_get, self.https_port, None, None)
        self.assertEqual(no_sni_serial, serial)
        alpn, status, body = yield deferToThread(
            https_get_h2, self.https_port, "app1.test", self.root
        )
        self.assertEqual((alpn, status, body), ("h2", 200, b"app1"))
        self.assertIn("(http-01)", self.log_messages(p))

        pool = HTTPConnectionPool(reactor, persistent=False)
        r = yield treq.get(
            f"http://127.0.0.1:{self.http_port}/some/path?q=1",
            headers={"Host": "app1.test"}, allow_redirects=False, pool=pool,
        )
        yield r.content()
        self.assertEqual(r.code, 301)
        self.assertEqual(
            r.headers.getRawHeaders("location"),
            [f"https://app1.test:{self.https_port}/some/path?q=1"],
        )

        r = yield p.command("list")
        self.assertEqual(r.status, 0, r.err)
        self.assertIn("app1.test", r.out)
        self.assertIn("valid until", r.out)
        r = yield p.command("list", "--json")
        self.assertIn('"app1.test": "valid until', r.out)

        self.assertEqual(self.orders(), 1)
        refused = yield deferToThread(handshake_refused, self.https_port, "never.test")
        self.assertTrue(refused)
        refused = yield deferToThread(handshake_refused, self.https_port, "app2.test")
        self.assertTrue(refused)
        yield sleep(0.5)
        self.assertEqual(self.orders(), 1)

    @inlineCallbacks
    def test_restart_reuses_stored_certificate(self) -> Any:
        """
        A restarted mproxy serves the certificate it stored at once, and
        pebble sees no new order.
        """
        p = yield self.proxy()
        yield self.deploy_app1(p)
        _, (_, _, serial, _) = yield deferToThread(
            wait_for_https, self.https_port, "app1.test", self.root
        )
        self.assertEqual(self.orders(), 1)
        yield p.stop()
        yield p.start()
        status, body, serial2, _ = yield deferToThread(
            https_get, self.https_port, "app1.test", self.root
        )
        self.assertEqual((status, body, serial2), (200, b"app1", serial))
        yield sleep(0.5)
        self.assertEqual(self.orders(), 1)


class ACMETLSALPN01Tests(TLSIntegration):
    http01 = False

    @inlineCallbacks
    def test_issues_with_http01_blocked(self) -> Any:
        """
        With pebble unable to reach mproxy's HTTP port, the certificate is
        still issued promptly, through TLS-ALPN-01 on the HTTPS port.
        """
        p = yield self.proxy()
        yield self.deploy_app1(p)
        waited, (status, body, _, _) = yield deferToThread(
            wait_for_https, self.https_port, "app1.test", self.root
        )
        self.assertLess(waited, 10)
        self.assertEqual((status, body), (200, b"app1"))
        self.assertIn("(tls-alpn-01)", self.log_messages(p))


class RenewalTests(TLSIntegration):
    validity = 6

    @inlineCallbacks
    def test_renewed_in_place_under_load(self) -> Any:
        """
        With 6 s certificates, mproxy renews in place (a new serial is served
        by the same process) while a client making HTTPS requests over new
        connections sees no failure, not even an expired certificate.
        """
        p = yield self.proxy()
        yield self.deploy_app1(p)
        _, (_, _, first, _) = yield deferToThread(
            wait_for_https, self.https_port, "app1.test", self.root
        )
        serials = [first]
        failures: list[str] = []
        stop = threading.Event()

        def client() -> int:
            n = 0
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    status, _, serial, _ = https_get(self.https_port, "app1.test", self.root)
                except Exception as e:  # noqa: BLE001 - every error is a failure
                    failures.append(repr(e))
                    continue
                n += 1
                if status != 200:
                    failures.append(f"status {status}")
                if serial != serials[-1]:
                    serials.append(serial)
                if len(serials) >= 3:
                    break
                time.sleep(0.02)
            return n

        requests = yield deferToThread(client)
        self.assertEqual(failures, [])
        self.assertGreaterEqual(len(serials), 3, f"{requests} requests, serials {serials}")
        self.assertEqual(p.protocol.ended.called, False)


class CustomCertificateTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_custom_certificate(self) -> Any:
        """
        A custom certificate serves its host; one whose key does not match
        is refused at deploy with C{Error: unable to load certificate...}
        and exit 1, and the old routing and certificate stay.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        ca_path = os.path.join(work, "ca.pem")
        with open(ca_path, "wb") as f:
            f.write(pem_pair(ca)[0])

        def write(name: str, data: bytes) -> str:
            path = os.path.join(work, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        good_chain, good_key = pem_pair(make_certificate(["custom.test"], issuer=ca))
        other_chain, other_key = pem_pair(make_certificate(["custom.test"], issuer=ca))
        cert_path = write("cert.pem", good_chain)
        key_path = write("key.pem", good_key)
        wrong_key = write("wrong-key.pem", other_key)
        other_cert = write("other-cert.pem", other_chain)

        _, port = listen_upstream(reactor, "custom")
        self.addCleanup(port.stopListening)
        upstream = f"127.0.0.1:{port.getHost().port}"
        p = MproxyProcess(reactor, os.path.join(work, "mproxy"))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command(
            "deploy", upstream, "--host", "custom.test", "--ssl",
            "--tls-certificate-path", cert_path, "--tls-private-key-path", key_path,
        )
        self.assertEqual(r.status, 0, r.err)
        status, body, serial, _ = yield deferToThread(
            https_get, p.https_port, "custom.test", ca_path
        )
        self.assertEqual((status, body), (200, b"custom"))

        for cert, key in ((cert_path, wrong_key), (other_cert, key_path)):
            r = yield p.command(
                "deploy", upstream, "--host", "custom.test", "--ssl",
                "--tls-certificate-path", cert, "--tls-private-key-path", key,
            )
            self.assertEqual(r.status, 1)
            self.assertTrue(r.err.startswith("Error: unable to load certificate"), r.err)
            self.assertNotIn("Traceback", r.err)
            status, body, serial2, _ = yield deferToThread(
                https_get, p.https_port, "custom.test", ca_path
            )
            self.assertEqual((status, body, serial2), (200, b"custom", serial))

        r = yield p.command("list")
        self.assertIn("custom.test", r.out)
        self.assertIn("valid until", r.out)

        # replaced files are served after SIGHUP
        new = make_certificate(["custom.test"], issuer=ca)
        new_chain, new_key = pem_pair(new)
        write("key.pem", new_key)
        write("cert.pem", new_chain)
        p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            status, body, serial3, _ = yield deferToThread(
                https_get, p.https_port, "custom.test", ca_path
            )
            self.assertEqual((status, body), (200, b"custom"))
            if serial3 == new.leaf.serial_number or time.monotonic() > deadline:
                break
            yield sleep(0.1)
        self.assertEqual(serial3, new.leaf.serial_number)
        self.assertEqual(p.protocol.ended.called, False)


class ACMEErrorsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_unreachable_ca_and_wildcards(self) -> Any:
        """
        An ACME server that cannot be reached does not fail the deploy;
        C{list} shows the host pending with the reason.  A wildcard host with
        automatic TLS is refused at deploy.
        """
        work = os.path.abspath(self.mktemp())
        _, port = listen_upstream(reactor, "app")
        self.addCleanup(port.stopListening)
        upstream = f"127.0.0.1:{port.getHost().port}"
        p = MproxyProcess(
            reactor, os.path.join(work, "mproxy"),
            extra_args=("--acme-directory", f"https://127.0.0.1:{free_port()}/dir"),
        )
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command("deploy", upstream, "--host", "app1.test", "--ssl")
        self.assertEqual(r.status, 0, r.err)
        deadline = time.monotonic() + 10
        while True:
            r = yield p.command("list", "--json")
            if "pending (" in r.out or time.monotonic() > deadline:
                break
            yield sleep(0.2)
        self.assertIn('"app1.test": "pending (cannot reach the ACME server', r.out)
        self.assertIn("cannot reach the ACME server", self.log_text(p))

        r = yield p.command("deploy", upstream, "--host", "*.example.com", "--ssl")
        self.assertEqual(r.status, 1)
        self.assertEqual(r.err.strip(), "Error: automatic TLS does not support wildcards")

    def log_text(self, p: MproxyProcess) -> str:
        return "\n".join(str(r) for r in p.records)


class HostPolicy(Resource):
    """
    An app with an on-demand policy endpoint: C{/allow?host=H} answers 200
    for C{allowed} hosts and 403 otherwise; every policy request is recorded.
    """

    isLeaf = True

    def __init__(self, allowed: set[str]) -> None:
        super().__init__()
        self.allowed = allowed
        self.checks: list[tuple[str, str, str]] = []

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/allow":
            host = request.args.get(b"host", [b""])[0].decode()
            self.checks.append(
                (
                    host,
                    (request.getHeader("host") or ""),
                    (request.getHeader("x-forwarded-proto") or ""),
                )
            )
            if host in self.allowed:
                return b"ok"
            request.setResponseCode(403)
            return b"Access denied"
        return b"on-demand app"


class OnDemandLocalPolicyTests(TLSIntegration):
    @inlineCallbacks
    def test_local_path_policy(self) -> Any:
        """
        C{--tls-on-demand-url /allow}: the policy request goes through the
        service itself (Host = the checked name, not redirected although TLS
        redirect is on, not logged); an allowed name gets a certificate on
        its first handshakes, a denied one gets none and causes no order.
        """
        policy = HostPolicy({"allowed.test"})
        port = reactor.listenTCP(0, Site(policy), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        p = yield self.proxy()
        r = yield p.command(
            "deploy", "ondemand", "--target", f"127.0.0.1:{port.getHost().port}",
            "--tls", "--tls-on-demand-url", "/allow", "--health-check-path", "/",
        )
        self.assertEqual(r.status, 0, r.err)
        waited, (status, body, _, _) = yield deferToThread(
            wait_for_https, self.https_port, "allowed.test", self.root
        )
        self.assertLess(waited, 10)
        self.assertEqual((status, body), (200, b"on-demand app"))
        self.assertEqual(policy.checks[0], ("allowed.test", "allowed.test", "http"))
        self.assertEqual(self.orders(), 1)

        refused = yield deferToThread(handshake_refused, self.https_port, "denied.test")
        self.assertTrue(refused)
        yield sleep(0.5)
        refused = yield deferToThread(handshake_refused, self.https_port, "denied.test")
        self.assertTrue(refused)
        self.assertIn(("denied.test", "denied.test", "http"), policy.checks)
        self.assertEqual(self.orders(), 1)
        logged = [x.get("path") for x in p.records if x.get("msg") == "Request"]
        self.assertNotIn("/allow", logged)
        self.assertIn("denied.test is not allowed", self.log_messages(p))


class TwistedLogForwardingTests(TestCase):
    """
    L{mproxy.server.forward_twisted_events}: how the certificate service's
    messages reach C{mproxy run}'s JSON log.
    """

    def test_forwarded_events(self) -> None:
        """
        C{mproxy.tls} events at every level and anyone's warnings and errors
        are forwarded with their keys and failure; Twisted's informational
        messages are not, even under an C{mproxy} namespace.
        """
        from twisted.logger import Logger, globalLogPublisher

        from mproxy.logging import ListLogger
        from mproxy.server import forward_twisted_events

        logger = ListLogger(level="INFO")
        observer = forward_twisted_events(logger)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        tls = Logger(namespace="mproxy.tls.service")
        tls.info("Requesting a certificate for {host} ({challenge})", host="a.test", challenge="http-01")
        tls.debug("quiet at INFO")
        Logger(namespace="mproxy.http.server.ProxySite").info("Starting factory {factory!r}", factory=1)
        Logger(namespace="twisted.web").warn("something odd")
        try:
            1 / 0
        except ZeroDivisionError:
            tls.failure("Certificate order for {host} crashed", host="a.test")
        self.flushLoggedErrors(ZeroDivisionError)
        self.assertEqual(
            [(r["level"], r["msg"]) for r in logger.records],
            [
                ("INFO", "Requesting a certificate for a.test (http-01)"),
                ("WARN", "something odd"),
                ("ERROR", "Certificate order for a.test crashed"),
            ],
        )
        self.assertEqual(
            (logger.records[0]["host"], logger.records[0]["challenge"]), ("a.test", "http-01")
        )
        self.assertIn("division by zero", logger.records[2]["error"])
        self.assertIn("ZeroDivisionError", logger.records[2]["traceback"])
