"""
The HTTPS listener on real loopback sockets without an ACME server: custom
certificates and (fake-issued) ACME certificates side by side, SNI, no-SNI
default, HTTP/1.1 and HTTP/2, and reloading a custom certificate without
dropping an open connection.
"""

from __future__ import annotations

import os
import socket
import ssl

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mproxy.spec import ServiceOptions
from mproxy.logging import ListLogger
from mproxy.tls.orders import OrderRunner
from mproxy.tls.service import CertificateService, Directories
from mproxy.tls.sni import ServerTLS, https_factory
from mproxy.tls.store import CertificateStore
from mproxy.tls.testing import (
    FakeIssuer,
    https_get_h2,
    https_get_http11,
    make_ca,
    make_certificate,
    pem_pair,
    synchronous_runner,
)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        secure = b"secure" if request.isSecure() else b"plain"
        return b"hello " + secure + b" " + request.clientproto


def two_requests(port: int, host: str, cafile: str, between) -> tuple[bytes, bytes, bytes]:
    """
    Two keep-alive requests on one connection, calling between() in the
    middle; returns both responses and the peer certificate DER.
    """
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)

            def one() -> bytes:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                data = b""
                while not data.endswith(b"HTTP/1.1"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data

            first = one()
            between()
            second = one()
            return first, second, der


class HTTPSListenerTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = make_ca()
        self.cafile = os.path.join(self.dir, "ca.pem")
        with open(self.cafile, "wb") as f:
            f.write(self.ca.leaf.public_bytes(serialization.Encoding.PEM))
        self.issuer = FakeIssuer(reactor)
        self.issuer_ca = self.ca

        def issue(host, challenge):
            c = make_certificate([host], issuer=self.ca)
            chain, key = pem_pair(c)
            return key, chain

        self.issuer.issue = issue
        store = CertificateStore(self.dir)
        self.certs = CertificateService(
            reactor,
            store,
            OrderRunner(store, lambda url: self.issuer, synchronous_runner()),
            ListLogger(),
            directories=Directories("https://ca.invalid/dir"),
        )
        self.certs.startService()
        self.addCleanup(self.certs.stopService)
        self.cert_path = os.path.join(self.dir, "static.crt")
        self.key_path = os.path.join(self.dir, "static.key")
        self.static = self.write_static()
        self.certs.update_service(
            "b-static",
            ServiceOptions(
                hosts=["*.static.test"],
                tls_enabled=True,
                tls_certificate_path=self.cert_path,
                tls_private_key_path=self.key_path,
            ),
        )
        self.certs.update_service("a-acme", ServiceOptions(hosts=["app1.test"], tls_enabled=True))
        self.certs.update_service("c-plain", ServiceOptions(hosts=["plain.test"]))
        port = reactor.listenTCP(
            0,
            https_factory(ServerTLS(self.certs.select, self.certs.challenges), Site(Hello())),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def write_static(self):
        certified = make_certificate(["*.static.test"], issuer=self.ca)
        chain, key = pem_pair(certified)
        with open(self.cert_path, "wb") as f:
            f.write(chain)
        with open(self.key_path, "wb") as f:
            f.write(key)
        return certified

    @inlineCallbacks
    def wait_issued(self):
        from twisted.internet.task import deferLater

        for _ in range(100):
            if self.certs.select("app1.test") is not None:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("not issued")

    @inlineCallbacks
    def test_acmeAndStaticBySNI(self):
        """
        SNI picks the ACME certificate for app1.test and the custom wildcard
        certificate for x.static.test; both verify against the CA.
        """
        yield self.wait_issued()
        alpn, raw, san = yield deferToThread(https_get_http11, self.port, "app1.test", self.cafile)
        self.assertEqual(alpn, "http/1.1")
        self.assertTrue(raw.endswith(b"hello secure HTTP/1.1"), raw)
        self.assertIn("'app1.test'", san)
        alpn, raw, san = yield deferToThread(https_get_http11, self.port, "x.static.test", self.cafile)
        self.assertIn("'*.static.test'", san)

    @inlineCallbacks
    def test_http2(self):
        """
        ALPN h2 gets HTTP/2.
        """
        yield self.wait_issued()
        result = yield deferToThread(https_get_h2, self.port, "x.static.test", self.cafile)
        self.assertEqual(result, ("h2", 200, b"hello secure HTTP/2"))

    @inlineCallbacks
    def test_noSNIDefault(self):
        """
        A client without SNI gets the first TLS service's (a-acme) first host
        certificate.
        """
        yield self.wait_issued()
        alpn, raw, san = yield deferToThread(https_get_http11, self.port, None, self.cafile)
        self.assertIn("'app1.test'", san)

    @inlineCallbacks
    def test_unknownAndPlainRefused(self):
        """
        Unknown names and names of services without TLS fail the handshake.
        """
        yield self.wait_issued()
        for name in ["unknown.test", "plain.test"]:
            with self.assertRaises(ssl.SSLError):
                yield deferToThread(https_get_http11, self.port, name, self.cafile)

    @inlineCallbacks
    def test_reloadKeepsConnections(self):
        """
        Replacing the custom certificate files and reloading (as SIGHUP does)
        leaves an open connection working; new connections get the new
        certificate.
        """
        replaced = []

        def between():
            replaced.append(self.write_static())
            reactor.callFromThread(self.certs.reload_static)

        first, second, der = yield deferToThread(two_requests, self.port, "a.static.test", self.cafile, between)
        self.assertTrue(first.startswith(b"HTTP/1.1 200"), first)
        self.assertTrue(second.startswith(b"HTTP/1.1 200"), second)
        self.assertEqual(der, self.static.leaf.public_bytes(serialization.Encoding.DER))
        from twisted.internet.task import deferLater

        yield deferLater(reactor, 0.05, lambda: None)
        ctx = ssl.create_default_context(cafile=self.cafile)

        def fresh():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="a.static.test") as s:
                    return s.getpeercert(binary_form=True)

        der = yield deferToThread(fresh)
        self.assertEqual(der, replaced[0].leaf.public_bytes(serialization.Encoding.DER))


class Constant(Resource):
    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"9")
        return b"proxysite"


class ProxySiteBehindTLSTests(TestCase):
    """
    The data plane's L{mproxy.http.server.ProxySite} (secure=True) works
    behind L{https_factory} for HTTP/1.1 and HTTP/2.
    """

    timeout = 30

    def setUp(self) -> None:
        try:
            from mproxy.http.server import ProxySite
        except ImportError as e:  # pragma: no cover - the data plane moved
            raise self.skipTest(f"mproxy.http.server.ProxySite unavailable: {e}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = make_ca()
        self.cafile = os.path.join(self.dir, "ca.pem")
        with open(self.cafile, "wb") as f:
            f.write(ca.leaf.public_bytes(serialization.Encoding.PEM))
        cert = make_certificate(["app1.test"], issuer=ca)
        site = ProxySite(Constant(), reactor, secure=True)
        port = reactor.listenTCP(
            0, https_factory(ServerTLS(lambda name: cert), site), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    @inlineCallbacks
    def test_http11(self):
        """
        HTTP/1.1 through the fast channel.
        """
        alpn, raw, san = yield deferToThread(https_get_http11, self.port, "app1.test", self.cafile)
        self.assertEqual(alpn, "http/1.1")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        self.assertTrue(raw.endswith(b"proxysite"), raw)

    @inlineCallbacks
    def test_h2(self):
        """
        HTTP/2 through Twisted's H2 stack.
        """
        result = yield deferToThread(https_get_h2, self.port, "app1.test", self.cafile)
        self.assertEqual(result, ("h2", 200, b"proxysite"))
