"""
Tests for L{mproxy.http.localget}: the in-memory on-demand TLS policy request
through the real proxy resource, with a fake service and an in-memory
upstream connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.http.interfaces import IClaim, IProxiedService, IProxiedTarget, IRouteMatch, IRouter
from mproxy.http.upstream import UpstreamPool
from mproxy.logging import ListLogger
from mproxy.service import Refusal
from mproxy.spec import ServiceOptions, TargetOptions
from mproxy.http.localget import BODY_LIMIT, _OneService, local_getter


@implementer(IClaim, IProxiedTarget)
class FakeClaim:
    def __init__(self, pool: UpstreamPool) -> None:
        self.target = self
        self.address = "10.0.0.2:3000"
        self.pool = pool
        self.releases = 0
        self.set_cookie: bytes | None = None

    def set_canceller(self, fn: Any) -> None:
        pass

    def mark_upgraded(self) -> None:
        pass

    def release(self) -> None:
        self.releases += 1

    def eject(self, error: str) -> bool:
        return False


@implementer(IProxiedService)
class FakeService:
    def __init__(self, reactor: Any) -> None:
        self.name = "ondemand"
        self.options = ServiceOptions(
            tls_enabled=True, tls_redirect=True, tls_on_demand_url="/allow"
        )
        self.target_options = TargetOptions()
        self.pool = UpstreamPool(reactor, "10.0.0.2", 3000)
        self.result: Any = None
        self.claims: list[FakeClaim] = []

    def retry(self, failed: Any, tried: Any, wait: float) -> Any:
        return Refusal(503, unavailable=True)

    def select(self, method: bytes, path: str, cookie: Any, websocket: bool) -> Any:
        if self.result is not None:
            return self.result
        claim = FakeClaim(self.pool)
        self.claims.append(claim)
        return claim


class FakeRouter:
    def __init__(self, *services: FakeService) -> None:
        self.services = {s.name: s for s in services}


class ContractTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        The fakes provide what they stand in for; the one-service router,
        its match and its view of the service provide what the proxy uses.
        """
        service = FakeService(MemoryReactorClock())
        claim = FakeClaim(service.pool)
        self.assertTrue(verifyObject(IProxiedService, service))
        self.assertTrue(verifyObject(IClaim, claim))
        self.assertTrue(verifyObject(IProxiedTarget, claim))
        router = _OneService(FakeRouter(service), "ondemand")
        self.assertTrue(verifyObject(IRouter, router))
        match = router.match("any", "/x")
        self.assertTrue(verifyObject(IRouteMatch, match))
        self.assertTrue(verifyObject(IProxiedService, match.service))
        self.assertFalse(match.service.options.tls_redirect)
        self.assertIsNone(_OneService(FakeRouter(), "ondemand").match("any", "/"))


class LocalGetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = FakeService(self.reactor)
        self.logger = ListLogger()
        self.get = local_getter(
            self.reactor, FakeRouter(self.service), self.logger, http_port=8080, https_port=8443
        )

    def upstream(self) -> tuple[Any, StringTransport]:
        factory = self.reactor.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_request_through_the_service(self) -> None:
        """
        The target gets C{GET <path>?host=H} with C{Host: H} and
        C{X-Forwarded-Proto: http} (no redirect although TLS redirect is
        on); its answer is the result; no request is logged.
        """
        d = self.get("ondemand", "/allow?host=a.test", "a.test")
        proto, transport = self.upstream()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"GET /allow?host=a.test HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: a.test\r\n", sent)
        self.assertIn(b"\r\nX-Forwarded-Proto: http\r\n", sent)
        proto.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 13\r\n\r\nAccess denied")
        self.assertEqual(self.successResultOf(d), (403, b"Access denied"))
        self.assertEqual(self.service.claims[0].releases, 1)
        self.assertNotIn("Request", [r["msg"] for r in self.logger.records])
        self.assertTrue(self.service.options.tls_redirect)

    def test_chunked_response_and_body_limit(self) -> None:
        """
        A chunked answer is collected without framing, capped at
        C{BODY_LIMIT} bytes.
        """
        d = self.get("ondemand", "/allow?host=a.test", "a.test")
        proto, _ = self.upstream()
        big = b"x" * (BODY_LIMIT + 100)
        proto.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(self.successResultOf(d), (200, b"x" * BODY_LIMIT))

    def test_service_refusal(self) -> None:
        """
        A stopped service answers 503 itself.
        """
        self.service.result = Refusal(503, "down for maintenance")
        status, body = self.successResultOf(self.get("ondemand", "/allow?host=a.test", "a.test"))
        self.assertEqual(status, 503)
        self.assertIn(b"down for maintenance", body)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unknown_service(self) -> None:
        """
        A service that is gone: 404.
        """
        status, _ = self.successResultOf(self.get("other", "/allow?host=a.test", "a.test"))
        self.assertEqual(status, 404)

    def test_cancel_abandons_the_exchange(self) -> None:
        """
        Cancelling (the caller's timeout) fails the Deferred, drops the
        upstream connection and releases the claim.
        """
        d = self.get("ondemand", "/allow?host=a.test", "a.test")
        _, transport = self.upstream()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.service.claims[0].releases, 1)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertNotIn("Request", [r["msg"] for r in self.logger.records])
