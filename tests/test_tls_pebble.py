"""
End-to-end tests of automatic TLS against Debian's pebble on loopback: the
real L{CertificateService} (worker thread, L{AcmeIssuer}), the HTTP-01
resource on a plain listener, and L{ServerTLS} on an HTTPS listener serving a
trivial site over HTTP/1.1 and HTTP/2.

These run on the real reactor with 127.0.0.1 sockets only.
"""

from __future__ import annotations

import os
import ssl
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mproxy.spec import ServiceOptions
from mproxy.logging import ListLogger
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.challenges import ACMEChallengeResource, ChallengeStore
from mproxy.tls.sni import ServerTLS, https_factory
from mproxy.tls.testing import https_get_h2, https_get_http11
from mproxy.tls.wiring import certificate_service
from tests.pebble import PEBBLE_SKIP, LoopbackDNS, Pebble


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello over " + request.clientproto


class PebbleFixture(TestCase):
    """
    Listeners (plain HTTP with the HTTP-01 resource, HTTPS with L{ServerTLS}),
    a loopback DNS server and pebble; C{start()} starts a L{CertificateService}.
    """

    skip = PEBBLE_SKIP
    timeout = 60
    validity: int | None = None

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        dns = LoopbackDNS(reactor)
        self.addCleanup(dns.stop)
        self.challenges = ChallengeStore()
        site = Site(Hello())
        http = reactor.listenTCP(0, Site(ACMEChallengeResource(self.challenges, Hello())), interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        self.tls = ServerTLS(lambda name: self.certs.select(name), self.challenges)
        https = reactor.listenTCP(0, https_factory(self.tls, site), interface="127.0.0.1")
        self.addCleanup(https.stopListening)
        self.https_port = https.getHost().port
        self.pebble = Pebble(
            os.path.join(self.state, "pebble"),
            http_port=http.getHost().port,
            tls_port=self.https_port,
            dns_port=dns.port,
            validity=self.validity,
        )
        self.pebble.start()
        self.addCleanup(self.pebble.stop)
        self.root = os.path.join(self.state, "root.pem")

    def start(self, *challenge_types):
        """
        A started service ordering from pebble with C{challenge_types}.
        """
        self.logger = ListLogger()
        self.certs = certificate_service(
            reactor,
            self.state,
            self.logger,
            directory_url=self.pebble.directory_url,
            policy=RetryPolicy(initial=0.5, challenge_types=challenge_types),
            issuer_factory=self._issuer,
        )
        # answer challenges through the listeners of this test
        self.certs.challenges = self.challenges
        self.certs.startService()
        self.addCleanup(self.certs.stopService)
        return self.certs

    def _issuer(self, url, store, challenges):
        from mproxy.tls.acme import AcmeIssuer

        return AcmeIssuer(url, store, self.challenges, ca_bundle=self.pebble.ca_bundle, poll_interval=0.05)

    @inlineCallbacks
    def wait_valid(self, host, limit=30.0):
        start = time.monotonic()
        while time.monotonic() - start < limit:
            rows = {r.host: r for r in self.certs.host_status()}
            row = rows.get(host)
            if row is not None and row.state == "valid":
                return row
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no certificate for {host}: {self.certs.host_status()} / {self.pebble.log()}")

    @inlineCallbacks
    def issue_and_fetch(self, challenge):
        self.start(challenge)
        started = time.monotonic()
        self.certs.update_service("app", ServiceOptions(hosts=["app1.test"], tls_enabled=True))
        row = yield self.wait_valid("app1.test")
        elapsed = time.monotonic() - started
        self.assertIsNone(row.error)
        root = yield deferToThread(self.pebble.root_pem)
        with open(self.root, "wb") as f:
            f.write(root)
        alpn, raw, san = yield deferToThread(https_get_http11, self.https_port, "app1.test", self.root)
        self.assertEqual(alpn, "http/1.1")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw[:100])
        self.assertTrue(raw.endswith(b"hello over HTTP/1.1"), raw[-100:])
        self.assertIn("app1.test", san)
        alpn, status, body = yield deferToThread(https_get_h2, self.https_port, "app1.test", self.root)
        self.assertEqual((alpn, status, body), ("h2", 200, b"hello over HTTP/2"))
        stored = self.certs.store.for_directory(self.pebble.directory_url)
        self.assertEqual(stored.hosts(), ["app1.test"])
        return elapsed



class PebbleEndToEndTests(PebbleFixture):
    def test_tlsAlpn01(self):
        """
        A certificate for app1.test is obtained with TLS-ALPN-01 answered by
        the HTTPS listener, and then served for SNI app1.test over HTTP/1.1
        and HTTP/2, verifying against pebble's root.
        """
        return self.issue_and_fetch("tls-alpn-01")

    def test_http01(self):
        """
        The same with HTTP-01 answered on the plain HTTP listener.
        """
        return self.issue_and_fetch("http-01")

    @inlineCallbacks
    def test_unknownNameRefused(self):
        """
        A handshake for a name no service lists is refused, while the
        issued name works.
        """
        yield self.issue_and_fetch("tls-alpn-01")
        with self.assertRaises(ssl.SSLError):
            yield deferToThread(https_get_http11, self.https_port, "other.test", self.root)

    @inlineCallbacks
    def test_failureThenRetry(self):
        """
        An order whose validation fails (the HTTP-01 token is not served) is
        reported as pending with the CA's reason and succeeds when retried
        with TLS-ALPN-01.
        """
        self.challenges.add_http01 = lambda token, ka: None
        self.start("http-01", "tls-alpn-01")
        self.certs.update_service("app", ServiceOptions(hosts=["app1.test"], tls_enabled=True))
        for _ in range(200):
            rows = self.certs.host_status()
            if rows and rows[0].error:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(rows[0].state, "pending")
        self.assertIn("validation failed", rows[0].error)
        yield self.wait_valid("app1.test")


class Policy(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.asked = []

    def render_GET(self, request):
        host = request.args.get(b"host", [b""])[0].decode()
        self.asked.append(host)
        if host == "app1.test":
            return b"ok"
        request.setResponseCode(403)
        return b"Access denied"


class PebbleOnDemandTests(PebbleFixture):
    """
    On-demand TLS against pebble, with the policy answered by a loopback
    HTTP endpoint.
    """

    @inlineCallbacks
    def test_onDemand(self):
        """
        The first handshake for an approved name is refused while the
        certificate is obtained, later ones succeed; a denied name never
        gets an order.
        """
        policy = Policy()
        port = reactor.listenTCP(0, Site(policy), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/allow?token=t"
        self.start("tls-alpn-01")
        self.certs.update_service("od", ServiceOptions(tls_enabled=True, tls_on_demand_url=url))
        root = yield deferToThread(self.pebble.root_pem)
        with open(self.root, "wb") as f:
            f.write(root)
        with self.assertRaises(ssl.SSLError):
            yield deferToThread(https_get_http11, self.https_port, "app1.test", self.root)
        with self.assertRaises(ssl.SSLError):
            yield deferToThread(https_get_http11, self.https_port, "denied.test", self.root)
        yield self.wait_valid("app1.test")
        alpn, raw, san = yield deferToThread(https_get_http11, self.https_port, "app1.test", self.root)
        self.assertTrue(raw.endswith(b"hello over HTTP/1.1"))
        with self.assertRaises(ssl.SSLError):
            yield deferToThread(https_get_http11, self.https_port, "denied.test", self.root)
        self.assertEqual(sorted(set(policy.asked)), ["app1.test", "denied.test"])
        self.assertEqual(policy.asked.count("denied.test"), 1)  # denial cached
        self.assertEqual([r.host for r in self.certs.host_status()], ["app1.test"])


class PebbleRenewalTests(PebbleFixture):
    """
    Short-lived certificates from pebble are renewed when a third of their
    lifetime is left, and the account is reused after a restart.
    """

    validity = 6

    @inlineCallbacks
    def test_renewal(self):
        """
        A 6-second certificate is replaced after about 4 seconds.
        """
        self.start("tls-alpn-01")
        self.certs.update_service("app", ServiceOptions(hosts=["app1.test"], tls_enabled=True))
        yield self.wait_valid("app1.test")
        first = self.certs.select("app1.test")
        lifetime = first.not_after - first.not_before
        self.assertLess(lifetime, 10)
        start = time.monotonic()
        while self.certs.select("app1.test") is first:
            self.assertLess(time.monotonic() - start, 15, "not renewed")
            yield deferLater(reactor, 0.1, lambda: None)
        second = self.certs.select("app1.test")
        self.assertGreater(second.not_after, first.not_after)

    @inlineCallbacks
    def test_accountReusedAfterRestart(self):
        """
        A new service on the same state directory uses the stored account.
        """
        self.start("http-01")
        self.certs.update_service("app", ServiceOptions(hosts=["app1.test"], tls_enabled=True))
        yield self.wait_valid("app1.test")
        stored = self.certs.store.for_directory(self.pebble.directory_url)
        account = stored.load_account()
        yield self.certs.stopService()
        again = self.start("http-01")
        again.update_service("app", ServiceOptions(hosts=["app1.test", "app2.test"], tls_enabled=True))
        yield self.wait_valid("app2.test")
        self.assertEqual(stored.load_account(), account)
        self.assertIn("There are now 1 accounts", self.pebble.log())
        self.assertNotIn("There are now 2 accounts", self.pebble.log())
