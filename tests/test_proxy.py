"""
Tests for L{mproxy.http.proxy}, L{mproxy.http.pages} and
L{mproxy.http.reqlog}, with fake routers, services and claims.
"""

from __future__ import annotations

import gc
import io
import json
import re
import weakref
from io import BytesIO
from types import SimpleNamespace
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.http.forwarding import new_request_id
from mproxy.http.generic import GenericExchange
from mproxy.http.interfaces import (
    IClaim,
    IExchange,
    IProxiedService,
    IProxiedTarget,
    IRefusal,
    IRequestMetrics,
    IRouteMatch,
    IRouter,
    IUpstreamReceiver,
)
from mproxy.http.pages import render_page
from mproxy.http.proxy import ProxyResource, build_http_factory
from mproxy.http.upstream import UpstreamPool
from mproxy.http import reqlog
from mproxy.logging import JSONLogger, ListLogger
from mproxy.spec import ServiceOptions, TargetOptions


@implementer(IProxiedTarget)
class FakeTarget:
    def __init__(self, reactor: Any, address: str = "10.0.0.2:3000") -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.pool = UpstreamPool(reactor, host, int(port))
        self.healthy = True
        self.ejections: list[str] = []

    def eject(self, error: str) -> bool:
        self.ejections.append(error)
        was, self.healthy = self.healthy, False
        return was


@implementer(IClaim)
class FakeClaim:
    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.canceller: Any = None
        self.releases = 0
        self.upgraded = False
        self.set_cookie: bytes | None = None

    def set_canceller(self, fn: Any) -> None:
        self.canceller = fn

    def mark_upgraded(self) -> None:
        self.upgraded = True

    def release(self) -> None:
        self.releases += 1


@implementer(IRefusal)
class Refusal:
    def __init__(self, status: int, message: str = "", unavailable: bool = False) -> None:
        self.status = status
        self.message = message
        self.unavailable = unavailable


@implementer(IProxiedService)
class FakeService:
    def __init__(self, reactor: Any, name: str = "web", **target_options: Any) -> None:
        self.name = name
        self.options = ServiceOptions()
        self.target_options = TargetOptions(**target_options)
        self.target = FakeTarget(reactor)
        self.claims: list[FakeClaim] = []
        self.result: Any = None
        self.selects: list[tuple[Any, ...]] = []
        self.set_cookie: bytes | None = None
        #: what retry() gives, in turn: a target (claimed), a refusal or a
        #: Deferred; an empty list is a 503 "no healthy targets"
        self.retry_results: list[Any] = []
        self.retries: list[tuple[str, list[str], float]] = []

    def retry(self, failed: Any, tried: Any, wait: float) -> Any:
        self.retries.append((failed.target.address, list(tried), wait))
        if not self.retry_results:
            return Refusal(503, unavailable=True)
        r = self.retry_results.pop(0)
        if isinstance(r, FakeTarget):
            c = FakeClaim(r)
            self.claims.append(c)
            return c
        return r

    def select(self, method: bytes, path: str, cookie: Any, websocket: bool) -> Any:
        self.selects.append((method, path, cookie(b"mproxy-rollout"), websocket))
        if self.result is not None:
            return self.result
        c = FakeClaim(self.target)
        c.set_cookie = self.set_cookie
        self.claims.append(c)
        return c


@implementer(IRouteMatch)
class FakeMatch:
    def __init__(self, service: FakeService, prefix: str) -> None:
        self.service = service
        self.prefix = prefix

    def target_path(self, path: str) -> str:
        if self.prefix == "/" or not self.service.options.strip_prefix:
            return path
        rest = path[len(self.prefix):]
        return rest if rest.startswith("/") else "/" + rest


@implementer(IRouter)
class FakeRouter:
    def __init__(self) -> None:
        self.routes: dict[str, tuple[FakeService, str]] = {}
        self.calls: list[tuple[str, str]] = []

    def match(self, host: str, path: str) -> FakeMatch | None:
        self.calls.append((host, path))
        h = host.split(":")[0].lower()
        found = self.routes.get(h)
        if found is None:
            return None
        service, prefix = found
        if prefix != "/" and not (path == prefix or path.startswith(prefix + "/")):
            return None
        return FakeMatch(service, prefix)


@implementer(IRequestMetrics)
class FakeMetrics:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def enter(self, service: str) -> None:
        self.events.append(("enter", service))

    def leave(self, service: str) -> None:
        self.events.append(("leave", service))

    def observe(self, service: str, method: str, status: int, seconds: float) -> None:
        self.events.append(("observe", service, method, status))

    def retried(self, service: str) -> None:
        self.events.append(("retried", service))

    def ejected(self, service: str, target: str) -> None:
        self.events.append(("ejected", service, target))

    def unavailable(self, service: str) -> None:
        self.events.append(("unavailable", service))


class Harness:
    def __init__(self, prefix: str = "/", secure: bool = False, **target_options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.router = FakeRouter()
        self.logger = ListLogger()
        self.service = FakeService(self.reactor, **target_options)
        self.router.routes["example.com"] = (self.service, prefix)
        self.metrics = FakeMetrics()
        self.site = build_http_factory(
            self.reactor, self.router, self.logger, http_port=80, https_port=443,
            metrics=self.metrics,
        )
        self.client = self.site.buildProtocol(None)
        self.ct = StringTransport()
        self.client.makeConnection(self.ct)
        self.connected = 0

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def get(self, path: bytes = b"/x", headers: bytes = b"", method: bytes = b"GET") -> None:
        self.send(method + b" " + path + b" HTTP/1.1\r\nHost: example.com\r\n" + headers + b"\r\n")

    def upstream(self) -> tuple[Any, StringTransport]:
        host, port, factory, timeout, bind = self.reactor.tcpClients[self.connected]
        self.connected += 1
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t

    def output(self) -> bytes:
        return self.ct.value()

    def requests_logged(self) -> list[dict[str, Any]]:
        return [r for r in self.logger.records if r["msg"] == "Request"]


def upstream_headers(raw: bytes) -> list[tuple[bytes, bytes]]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")[1:]
    return [tuple(line.split(b": ", 1)) for line in lines]  # type: ignore[misc]


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


class FakeContractTests(SynchronousTestCase):
    def test_fakes_provide_interfaces(self) -> None:
        """
        The fakes these tests use provide the interfaces the proxy relies on.
        """
        reactor = MemoryReactorClock()
        service = FakeService(reactor)
        self.assertTrue(verifyObject(IProxiedService, service))
        self.assertTrue(verifyObject(IProxiedTarget, service.target))
        self.assertTrue(verifyObject(IClaim, FakeClaim(service.target)))
        self.assertTrue(verifyObject(IRefusal, Refusal(503)))
        self.assertTrue(verifyObject(IRouteMatch, FakeMatch(service, "/")))
        self.assertTrue(verifyObject(IRouter, FakeRouter()))
        self.assertTrue(verifyObject(IRequestMetrics, FakeMetrics()))

    def test_relay_and_generic_exchange(self) -> None:
        """
        The relay is the upstream receiver (and the client's producer); the
        exchange over a standard Twisted request is an L{IExchange}.
        """
        h = Harness()
        h.get()
        relay = h.reactor.tcpClients[0][2].exchange.receiver
        self.assertTrue(verifyObject(IUpstreamReceiver, relay))
        self.assertTrue(verifyObject(IPushProducer, relay))
        request = Request(DummyChannel())
        request.method, request.uri, request.clientproto = b"GET", b"/x?y", b"HTTP/1.1"
        request.content = BytesIO(b"")
        self.assertTrue(verifyObject(IExchange, GenericExchange(request)))


class RoutingTests(SynchronousTestCase):
    def test_unrouted_404(self) -> None:
        """
        A request no service matches gets the 404 page and is logged with
        an empty service.
        """
        h = Harness()
        h.send(b"GET /x HTTP/1.1\r\nHost: other.com\r\n\r\n")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertIn(b"Content-Type: text/html; charset=utf-8\r\n", out)
        self.assertIn("404 — Not Found".encode(), out)
        log = h.requests_logged()[0]
        self.assertEqual((log["status"], log["service"], log["target"]), (404, "", ""))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_router_gets_host_and_decoded_path(self) -> None:
        """
        The router is asked with the Host header and the decoded path.
        """
        h = Harness()
        h.send(b"GET /a%20b?q=1 HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n")
        self.assertEqual(h.router.calls, [("Example.com:8080", "/a b")])

    def test_prefix_stripped(self) -> None:
        """
        With a matched prefix the target sees the rest of the path, the
        query untouched; the log keeps the original path.
        """
        h = Harness(prefix="/app")
        h.get(b"/app/show?a=b;c")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /show?a=b;c HTTP/1.1\r\n"))
        self.assertEqual(h.service.selects[0][1], "/show")
        proto.dataReceived(OK)
        self.assertEqual(h.requests_logged()[0]["path"], "/app/show")

    def test_prefix_only_becomes_root(self) -> None:
        """
        The bare prefix becomes C{/}.
        """
        h = Harness(prefix="/app")
        h.get(b"/app")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET / HTTP/1.1\r\n"))

    def test_prefix_not_stripped(self) -> None:
        """
        With strip-prefix off the original path goes to the target.
        """
        h = Harness(prefix="/app")
        h.service.options = ServiceOptions(strip_prefix=False)
        h.get(b"/app/show")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /app/show HTTP/1.1\r\n"))


class RequestHeaderTests(SynchronousTestCase):
    def forwarded(self, h: Harness, path: bytes = b"/x", headers: bytes = b"") -> list[tuple[bytes, bytes]]:
        h.get(path, headers)
        proto, t = h.upstream()
        return upstream_headers(t.value())

    def test_added_headers(self) -> None:
        """
        Host is preserved; X-Forwarded-*, X-Request-ID (a UUID v4),
        X-Request-Start and X-Mproxy-Target are added.
        """
        h = Harness()
        hs = self.forwarded(h, headers=b"User-Agent: ua\r\n")
        self.assertEqual(header(hs, b"host"), [b"example.com"])
        self.assertEqual(header(hs, b"user-agent"), [b"ua"])
        self.assertEqual(header(hs, b"x-forwarded-for"), [b"192.168.1.1"])
        self.assertEqual(header(hs, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(header(hs, b"x-forwarded-host"), [b"example.com"])
        self.assertEqual(header(hs, b"x-mproxy-target"), [b"10.0.0.2:3000"])
        rid = header(hs, b"x-request-id")[0]
        self.assertRegex(rid.decode(), r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        self.assertRegex(header(hs, b"x-request-start")[0].decode(), r"^t=\d{13}$")

    def test_existing_ids_kept(self) -> None:
        """
        Incoming X-Request-ID and X-Request-Start are kept.
        """
        hs = self.forwarded(Harness(), headers=b"X-Request-ID: 1234\r\nX-Request-Start: t=99\r\n")
        self.assertEqual(header(hs, b"x-request-id"), [b"1234"])
        self.assertEqual(header(hs, b"x-request-start"), [b"t=99"])

    def test_hop_by_hop_removed(self) -> None:
        """
        Hop-by-hop headers, headers named in Connection and Forwarded are
        not forwarded; other headers are.
        """
        hs = self.forwarded(Harness(), headers=(
            b"Connection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nX-Secret: s\r\n"
            b"Proxy-Authorization: p\r\nProxy-Connection: x\r\nTE: gzip\r\n"
            b"Trailer: x\r\nForwarded: for=1.2.3.4\r\nX-Custom: yes\r\nCookie: a=b\r\n"))
        names = {n.lower() for n, v in hs}
        for gone in (b"connection", b"keep-alive", b"x-secret", b"proxy-authorization",
                     b"proxy-connection", b"te", b"trailer", b"forwarded"):
            self.assertNotIn(gone, names)
        self.assertEqual(header(hs, b"x-custom"), [b"yes"])
        self.assertEqual(header(hs, b"cookie"), [b"a=b"])

    def test_te_trailers_kept(self) -> None:
        """
        C{TE: trailers} survives as such.
        """
        hs = self.forwarded(Harness(), headers=b"TE: trailers, deflate\r\n")
        self.assertEqual(header(hs, b"te"), [b"trailers"])

    def test_raw_query(self) -> None:
        """
        The query string reaches the target byte for byte.
        """
        h = Harness()
        h.get(b"/x?p1=a;b;c&p2=%x&p3=ok")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /x?p1=a;b;c&p2=%x&p3=ok HTTP/1.1\r\n"))

    def test_forward_headers_on(self) -> None:
        """
        With forward-headers on, incoming X-Forwarded-* values are kept
        (the client address appended to X-Forwarded-For).
        """
        hs = self.forwarded(Harness(forward_headers=True), headers=(
            b"X-Forwarded-For: 10.10.10.10\r\nX-Forwarded-For: 10.0.0.9\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: untrusted.example.com\r\n"))
        self.assertEqual(header(hs, b"x-forwarded-for"), [b"10.10.10.10, 10.0.0.9, 192.168.1.1"])
        self.assertEqual(header(hs, b"x-forwarded-proto"), [b"https"])
        self.assertEqual(header(hs, b"x-forwarded-host"), [b"untrusted.example.com"])

    def test_forward_headers_off(self) -> None:
        """
        With forward-headers off, client-sent X-Forwarded-* are replaced.
        """
        hs = self.forwarded(Harness(forward_headers=False), headers=(
            b"X-Forwarded-For: 10.10.10.10\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: untrusted.example.com\r\n"))
        self.assertEqual(header(hs, b"x-forwarded-for"), [b"192.168.1.1"])
        self.assertEqual(header(hs, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(header(hs, b"x-forwarded-host"), [b"example.com"])

    def test_client_ip_header(self) -> None:
        """
        The client-IP header replaces X-Forwarded-For (and is forwarded
        itself); the log's remote_addr shows its value.
        """
        h = Harness(forward_headers=True)
        h.service.options = ServiceOptions(client_ip_header="True-Client-IP")
        hs = self.forwarded(h, headers=b"X-Forwarded-For: 6.6.6.6\r\nTrue-Client-IP: 203.0.113.9\r\n")
        self.assertEqual(header(hs, b"x-forwarded-for"), [b"203.0.113.9, 192.168.1.1"])
        self.assertEqual(header(hs, b"true-client-ip"), [b"203.0.113.9"])

    def test_target_header_appended(self) -> None:
        """
        With forward-headers on an incoming X-Mproxy-Target is extended.
        """
        hs = self.forwarded(Harness(forward_headers=True), headers=b"X-Mproxy-Target: lb:1\r\n")
        self.assertEqual(header(hs, b"x-mproxy-target"), [b"lb:1, 10.0.0.2:3000"])
        hs = self.forwarded(Harness(forward_headers=False), headers=b"X-Mproxy-Target: lb:1\r\n")
        self.assertEqual(header(hs, b"x-mproxy-target"), [b"10.0.0.2:3000"])

    def test_cookie_given_to_select(self) -> None:
        """
        The service can read request cookies.
        """
        h = Harness()
        h.get(headers=b"Cookie: a=1; mproxy-rollout=42\r\n")
        self.assertEqual(h.service.selects[0][2], b"42")

    def test_expect_continue(self) -> None:
        """
        The proxy answers 100-continue itself when it starts forwarding and
        does not forward Expect.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n"
               b"Expect: 100-continue\r\n\r\n")
        self.assertEqual(h.output(), b"HTTP/1.1 100 Continue\r\n\r\n")
        proto, t = h.upstream()
        self.assertEqual(header(upstream_headers(t.value()), b"expect"), [])


class GarbageTests(SynchronousTestCase):
    def test_completed_request_freed_without_the_cyclic_collector(self) -> None:
        """
        A request that completed leaves no reference cycle behind: its
        objects are freed as soon as the connection lets go of them, not
        by the garbage collector (whose collections, every few dozen
        requests otherwise, hold up the requests that arrive meanwhile).
        """
        import gc

        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        h = Harness()
        h.get()
        proto, _t = h.upstream()
        proto.dataReceived(response)  # the first one warms up what is made once
        gc.collect()
        self.addCleanup(gc.set_debug, 0)
        self.addCleanup(gc.garbage.clear)
        gc.set_debug(gc.DEBUG_SAVEALL)
        h.get(b"/y")
        proto.dataReceived(response)
        h.get(b"/z")  # the connection now holds the next request, not /y's
        self.assertEqual(len(h.requests_logged()), 2)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
        self.assertEqual(kinds & {"ProxyCall", "Relay", "FastRequest", "UpstreamExchange"},
                         set())

    def generic_exchange(self) -> tuple[Request, GenericExchange]:
        request = Request(DummyChannel())
        request.method, request.uri, request.clientproto = b"GET", b"/x", b"HTTP/1.1"
        request.content = BytesIO(b"")
        return request, GenericExchange(request)

    def test_lost_handler_cleared_on_a_generic_exchange(self) -> None:
        request, ex = self.generic_exchange()
        called: list[str] = []
        ex.set_lost_handler(lambda: called.append("first"))
        ex.set_lost_handler(None)
        request.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(called, [])

    def test_lost_handler_of_a_generic_exchange_called(self) -> None:
        request, ex = self.generic_exchange()
        called: list[str] = []
        ex.set_lost_handler(lambda: called.append("first"))
        ex.set_lost_handler(lambda: called.append("second"))
        request.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(called, ["second"])


class ResponseTests(SynchronousTestCase):
    def test_response_relayed(self) -> None:
        """
        Status, headers and body are relayed; hop-by-hop response headers
        dropped; the claim is released once; one log line.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n"
                           b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: a\r\n\r\nok")
        out = h.output()
        self.assertEqual(out, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-App: a\r\n\r\nok")
        self.assertEqual(h.service.claims[0].releases, 1)
        self.assertEqual(len(h.requests_logged()), 1)

    def test_log_line(self) -> None:
        """
        The request log line has the reference keys in order.
        """
        h = Harness()
        h.send(b"POST /somepath?q=ok HTTP/1.1\r\nHost: example.com\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 5\r\nUser-Agent: agent\r\nX-Forwarded-For: 192.168.1.9\r\n\r\nhello")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 8\r\n\r\n12345678")
        log = h.requests_logged()[0]
        keys = [k for k in log if k not in ("level", "msg")]
        self.assertEqual(keys, [
            "host", "port", "path", "request_id", "status", "service", "target", "duration",
            "method", "req_content_length", "req_content_type", "resp_content_length",
            "resp_content_type", "client_addr", "client_port", "remote_addr", "user_agent",
            "proto", "scheme", "query"])
        self.assertEqual(log["host"], "example.com")
        self.assertEqual(log["port"], 80)
        self.assertEqual(log["path"], "/somepath")
        self.assertEqual(log["status"], 201)
        self.assertEqual(log["service"], "web")
        self.assertEqual(log["target"], "10.0.0.2:3000")
        self.assertIsInstance(log["duration"], int)
        self.assertEqual(log["method"], "POST")
        self.assertEqual(log["req_content_length"], 5)
        self.assertEqual(log["req_content_type"], "text/plain")
        self.assertEqual(log["resp_content_length"], 8)
        self.assertEqual(log["resp_content_type"], "application/json")
        self.assertEqual(log["client_addr"], "192.168.1.1")
        self.assertEqual(log["client_port"], "54321")
        self.assertEqual(log["remote_addr"], "192.168.1.9")
        self.assertEqual(log["user_agent"], "agent")
        self.assertEqual(log["proto"], "HTTP/1.1")
        self.assertEqual(log["scheme"], "http")
        self.assertEqual(log["query"], "q=ok")
        self.assertEqual(h.metrics.events, [
            ("enter", "web"), ("leave", "web"), ("observe", "web", "POST", 201)])

    def test_request_objects_freed_without_the_garbage_collector(self) -> None:
        """
        Once a request is complete, nothing of it is kept in a reference
        cycle: its request object and upstream exchange are freed by
        reference counting alone (the cyclic collector stays off here),
        so requests do not pile up garbage whose collections every request
        pays for.
        """
        h = Harness()
        seen: list[Any] = []
        render = h.site.resource.render
        pool = h.service.target.pool
        request = pool.request

        def capture(rq: Any) -> Any:
            seen.append(weakref.ref(rq))
            return render(rq)

        def exchange(*args: Any, **kw: Any) -> Any:
            ex = request(*args, **kw)
            seen.append(weakref.ref(ex))
            return ex

        h.site.resource.render = capture  # type: ignore[method-assign]
        pool.request = exchange  # type: ignore[method-assign]
        enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if enabled else None)
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(OK)
        h.get()  # on the same connections
        proto.dataReceived(OK)
        self.assertEqual(h.output().count(b"HTTP/1.1 200 OK"), 2)
        self.assertEqual(len(seen), 4)
        self.assertEqual([r() for r in seen], [None] * 4)

    def test_logged_headers(self) -> None:
        """
        Configured request/response headers are logged as req_*/resp_*.
        """
        h = Harness(log_request_headers=("X-Custom",), log_response_headers=("Cache-Control",))
        h.get(headers=b"x-custom: one\r\nX-Custom: two\r\n")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: no-cache\r\nContent-Length: 0\r\n\r\n")
        log = h.requests_logged()[0]
        self.assertEqual(log["req_x_custom"], "one,two")
        self.assertEqual(log["resp_cache_control"], "no-cache")

    def test_streamed_chunks(self) -> None:
        """
        A response without length is streamed to the client chunk by chunk.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
        self.assertTrue(h.output().endswith(b"\r\n\r\n6\r\ndata:1\r\n"))
        self.assertEqual(h.requests_logged(), [])
        proto.dataReceived(b"6\r\ndata:2\r\n0\r\n\r\n")
        self.assertTrue(h.output().endswith(b"6\r\ndata:2\r\n0\r\n\r\n"))
        self.assertEqual(len(h.requests_logged()), 1)

    def test_multiple_set_cookie_order(self) -> None:
        """
        Several Set-Cookie headers keep their order.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                           b"Set-Cookie: c=3\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nSet-Cookie: c=3\r\n", h.output())

    def test_writer_cookie(self) -> None:
        """
        The claim's writer-affinity cookie is added and X-Writer-Affinity
        stripped; C{X-Writer-Affinity: false} suppresses the cookie.
        """
        h = Harness()
        h.service.set_cookie = b"mproxy-writer=123; Path=/"
        h.get(method=b"POST")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nX-Writer-Affinity: true\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"Set-Cookie: mproxy-writer=123; Path=/\r\n", h.output())
        self.assertNotIn(b"X-Writer-Affinity", h.output())
        h2 = Harness()
        h2.service.set_cookie = b"mproxy-writer=123; Path=/"
        h2.get(method=b"POST")
        proto, t = h2.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nX-Writer-Affinity: false\r\nContent-Length: 0\r\n\r\n")
        self.assertNotIn(b"mproxy-writer", h2.output())
        self.assertNotIn(b"X-Writer-Affinity", h2.output())

    def test_head(self) -> None:
        """
        HEAD responses are relayed without a body and the client connection
        stays usable.
        """
        h = Harness()
        h.get(method=b"HEAD")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(h.output(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(h.service.claims[0].releases, 1)
        self.assertFalse(h.ct.disconnecting)

    def test_early_hints_relayed(self) -> None:
        """
        103 Early Hints reach the client before the final response; a 100
        from the target is not relayed.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                           b"Link: </a.css>\r\n\r\n" + OK)
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK"))
        self.assertNotIn(b"100 Continue", out)

    def test_trailers_relayed(self) -> None:
        """
        Trailers are relayed to a client that accepts them.
        """
        h = Harness()
        h.get(headers=b"TE: trailers\r\n")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                           b"1\r\na\r\n0\r\nX-Sum: 9\r\n\r\n")
        self.assertTrue(h.output().endswith(b"0\r\nX-Sum: 9\r\n\r\n"))

    def test_keep_alive_next_request(self) -> None:
        """
        After a proxied response the next request on the connection is
        routed and forwarded on the pooled upstream connection.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(OK)
        t.clear()
        h.get(b"/second")
        self.assertTrue(t.value().startswith(b"GET /second "))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        proto.dataReceived(OK)
        self.assertEqual(h.output().count(b"hello"), 2)
        self.assertEqual(len(h.service.claims), 2)


class BodyTests(SynchronousTestCase):
    def test_length_body_streamed(self) -> None:
        """
        A request body is streamed to the target as it arrives.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 6\r\n\r\nabc")
        proto, t = h.upstream()
        self.assertTrue(t.value().endswith(b"Content-Length: 6\r\n" + t.value().split(b"Content-Length: 6\r\n", 1)[1]))
        self.assertTrue(t.value().endswith(b"\r\n\r\nabc"))
        h.send(b"def")
        self.assertTrue(t.value().endswith(b"\r\n\r\nabcdef"))

    def test_chunked_body_streamed(self) -> None:
        """
        A chunked request body stays chunked upstream.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        proto, t = h.upstream()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", t.value())
        self.assertTrue(t.value().endswith(b"\r\n\r\n3\r\nabc\r\n"))
        h.send(b"0\r\n\r\n")
        self.assertTrue(t.value().endswith(b"3\r\nabc\r\n0\r\n\r\n"))

    def test_malformed_chunked(self) -> None:
        """
        A malformed chunked body while proxying: 400, upstream abandoned,
        logged.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n")
        proto, t = h.upstream()
        h.send(b"ZZ\r\nhello\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b"<h1>400 Bad Request</h1>", h.output())
        self.assertTrue(t.disconnected)
        self.assertIn("Malformed chunked request", h.logger.messages())
        self.assertEqual(h.requests_logged()[0]["status"], 400)
        self.assertEqual(h.service.claims[0].releases, 1)


class RefusalTests(SynchronousTestCase):
    def test_503_with_message(self) -> None:
        """
        A 503 refusal shows the (escaped) stop message.
        """
        h = Harness()
        h.service.result = Refusal(503, "Back <soon>")
        h.get()
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"Back &lt;soon&gt;", out)
        self.assertIn("503 — Service Temporarily Unavailable".encode(), out)

    def test_health_200(self) -> None:
        """
        A 200 refusal is an empty 200.
        """
        h = Harness()
        h.service.result = Refusal(200)
        h.get(b"/up")
        self.assertEqual(h.output(), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def test_held_request(self) -> None:
        """
        A request held by a paused service proceeds when the Deferred
        fires with a claim.
        """
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.service.result = d
        h.get()
        self.assertEqual(h.reactor.tcpClients, [])
        claim = FakeClaim(h.service.target)
        d.callback(claim)
        proto, t = h.upstream()
        proto.dataReceived(OK)
        self.assertIn(b"hello", h.output())
        self.assertEqual(claim.releases, 1)

    def test_held_request_expired(self) -> None:
        """
        A held request whose pause expired gets a 504.
        """
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.service.result = d
        h.get()
        d.callback(Refusal(504))
        self.assertTrue(h.output().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertIn("Rejecting request due to expired pause", h.logger.messages())

    def test_client_leaves_while_held(self) -> None:
        """
        If the client leaves while held, a later claim is released at once
        and nothing is forwarded.
        """
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.service.result = d
        h.get()
        h.client.connectionLost(Failure(error.ConnectionDone()))
        claim = FakeClaim(h.service.target)
        d.callback(claim)
        self.assertEqual(claim.releases, 1)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.requests_logged()[0]["status"], 499)


class FailureTests(SynchronousTestCase):
    def test_connect_failure_502(self) -> None:
        """
        A target that cannot be reached, also on the one retry: 502 page,
        ERROR log, claims released.
        """
        h = Harness()
        h.service.retry_results = [h.service.target]
        h.get()
        for i in (0, 1):
            factory = h.reactor.tcpClients[i][2]
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn("502 — Bad Gateway".encode(), h.output())
        self.assertIn("Error while proxying", h.logger.messages())
        self.assertEqual([c.releases for c in h.service.claims], [1, 1])

    def test_target_timeout_504(self) -> None:
        """
        No response headers within target_timeout: 504.
        """
        h = Harness(target_timeout=3)
        h.get()
        h.upstream()
        h.reactor.advance(3.1)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertIn("504 — Gateway Timeout".encode(), h.output())

    def test_client_hangup_499(self) -> None:
        """
        A client that hangs up: upstream request aborted, 499 logged,
        claim released, nothing sent.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        h.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(t.disconnected)
        self.assertEqual(h.requests_logged()[0]["status"], 499)
        self.assertEqual(h.service.claims[0].releases, 1)
        self.assertEqual(h.output(), b"")

    def test_upstream_dies_mid_body(self) -> None:
        """
        A target failing mid-body aborts the client connection.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(h.ct.disconnected)
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_drain_cancel_before_response(self) -> None:
        """
        A drain deadline before the response started: 504 page and an INFO
        log; the upstream request is aborted.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        h.service.claims[0].canceller()
        self.assertTrue(h.output().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertIn("Request cancelled due to draining", h.logger.messages())
        self.assertTrue(t.disconnected)
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_drain_cancel_after_response_started(self) -> None:
        """
        A drain deadline while the response streams aborts the client.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        h.service.claims[0].canceller()
        self.assertTrue(h.ct.disconnected)
        self.assertTrue(t.disconnected)
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_select_raises(self) -> None:
        """
        A failing service gives a 500, not a dead connection.
        """
        h = Harness()

        def boom(*a: Any) -> Any:
            raise RuntimeError("boom")

        h.service.select = boom  # type: ignore[method-assign]
        h.get()
        self.assertTrue(h.output().startswith(b"HTTP/1.1 500 "))


class UpgradeTests(SynchronousTestCase):
    WS = (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
          b"Sec-WebSocket-Version: 13\r\n")

    def test_websocket_tunnel(self) -> None:
        """
        A WebSocket upgrade becomes a byte tunnel; the claim is marked
        upgraded and released when the tunnel closes.
        """
        h = Harness()
        h.get(b"/ws", self.WS)
        self.assertTrue(h.service.selects[0][3])
        proto, t = h.upstream()
        hs = upstream_headers(t.value())
        self.assertEqual(header(hs, b"connection"), [b"Upgrade"])
        self.assertEqual(header(hs, b"upgrade"), [b"websocket"])
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Accept: a\r\n\r\nhello")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertIn(b"Upgrade: websocket\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nhello"))
        self.assertTrue(h.service.claims[0].upgraded)
        t.clear()
        h.send(b"\x81\x02hi")
        self.assertEqual(t.value(), b"\x81\x02hi")
        self.assertEqual(h.service.claims[0].releases, 0)
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(h.service.claims[0].releases, 1)
        self.assertTrue(h.ct.disconnecting)
        self.assertEqual(h.requests_logged()[0]["status"], 101)

    def test_drain_sends_close_frame(self) -> None:
        """
        Draining a tunnel sends a WebSocket close frame (1001) and closes.
        """
        h = Harness()
        h.get(b"/ws", self.WS)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\n\r\n")
        h.service.claims[0].canceller()
        self.assertTrue(h.output().endswith(b"\x88\x02\x03\xe9"))
        self.assertTrue(h.ct.disconnecting)
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_shutdown_ends_tunnel(self) -> None:
        """
        A graceful shutdown does not wait for a tunnel: it gets the close
        frame (1001) and closes at once, like at a drain deadline.
        """
        h = Harness()
        h.get(b"/ws", self.WS)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\n\r\n")
        h.site.shutdown(10)
        self.assertTrue(h.output().endswith(b"\x88\x02\x03\xe9"))
        self.assertTrue(h.ct.disconnecting)
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_mismatched_upgrade_502(self) -> None:
        """
        A 101 to another protocol than asked for is a 502.
        """
        h = Harness()
        h.get(b"/ws", self.WS)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                           b"Connection: Upgrade\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 "))

    def test_unrequested_upgrade_502(self) -> None:
        """
        A 101 to a request that did not ask for an upgrade is a 502.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 "))

    def test_refused_upgrade_closes(self) -> None:
        """
        When the target answers an upgrade request normally, the response
        is relayed and the connection closes.
        """
        h = Harness()
        h.get(b"/ws", self.WS)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(h.ct.disconnecting)


class GenericRequestTests(SynchronousTestCase):
    def test_standard_twisted_request(self) -> None:
        """
        The resource also serves standard Twisted requests (the HTTP/2
        path): the body is forwarded and the response relayed.
        """
        reactor = MemoryReactorClock()
        router = FakeRouter()
        logger = ListLogger()
        service = FakeService(reactor)
        router.routes["example.com"] = (service, "/")
        site = Site(ProxyResource(router, logger, clock=reactor), reactor=reactor)
        channel = site.buildProtocol(None)
        ct = StringTransport()
        channel.makeConnection(ct)
        channel.dataReceived(b"POST /x?y HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        host, port, factory, timeout, bind = reactor.tcpClients[0]
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        sent = t.value()
        self.assertTrue(sent.startswith(b"POST /x?y HTTP/1.1\r\n"))
        self.assertEqual(header(upstream_headers(sent), b"content-length"), [b"3"])
        self.assertTrue(sent.endswith(b"\r\n\r\nabc"))
        proto.dataReceived(OK)
        out = ct.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertTrue(out.endswith(b"hello"))
        self.assertNotIn(b"Server:", out)
        self.assertEqual(service.claims[0].releases, 1)
        self.assertEqual([r["status"] for r in logger.records if r["msg"] == "Request"], [200])



#: values that JSON must escape or keep as they are: quotes, backslashes,
#: every control character, DEL, Latin-1 bytes, line and paragraph
#: separators, a lone surrogate (a path's undecodable escape)
TRICKY = ['a"b\\c', "".join(chr(i) for i in range(32)) + "\x7f", "caf\xe9 \xff",
          "\u2028\u2029", "/x\udcff", "", "</script>", "{\"k\": 1}"]


class _CallStub:
    """
    The attributes of a completed call that the request log reads.
    """

    def __init__(self, text: str, tls: bool, remote: str, service: Any) -> None:
        b = text.encode("latin-1", "replace")
        self.rq = SimpleNamespace(
            client_strings=(text, text[::-1]), is_tls=tls, method=b"G\"ET",
            body_length=-1 if tls else 7, sentLength=12345678901, clientproto=b"HTTP/1.0",
            query=b,
        )
        self.res = SimpleNamespace(http_port=8080, https_port=8443)
        self.host = b
        self.path = text
        self.request_id = b
        self.status = 599
        self.service = service
        self.target = text
        self.req_ctype = b
        self.resp_ctype = b
        self.remote_addr = remote.encode("latin-1", "replace")
        self.user_agent = b
        self.log_extra = None
        self.tried = None


class RequestLogEncodingTests(SynchronousTestCase):
    """
    The request log line encoded in one format (L{reqlog.log_request} with
    a logger that takes encoded attributes) is the text of the record
    encoded as a dict.
    """

    def lines(self, call: Any) -> tuple[str, str]:
        fast, slow = io.StringIO(), io.StringIO()
        reqlog.log_request(JSONLogger(fast, now=lambda: 'T"\n'), call, 987654321012)
        reqlog._log_record(JSONLogger(slow, now=lambda: 'T"\n'), call, 987654321012)
        return fast.getvalue(), slow.getvalue()

    def test_same_text_as_the_record(self) -> None:
        """
        For tricky strings in every field, TLS or not, with or without a
        remote address and a service, both lines are the same text, one
        line of JSON that reads back as the values.
        """
        for text in TRICKY:
            for tls in (False, True):
                for remote in ("", text, "10.0.0.1, 10.0.0.2"):
                    for service in (None, SimpleNamespace(name=text)):
                        call = _CallStub(text, tls, remote, service)
                        fast, slow = self.lines(call)
                        self.assertEqual(fast, slow, (text, tls, remote, service))
                        self.assertEqual(fast.count("\n"), 1)
                        record = json.loads(fast)
                        self.assertEqual(record["path"], text)
                        self.assertEqual(record["remote_addr"],
                                         call.remote_addr.decode("latin-1") or text)
                        self.assertEqual(record["service"], service.name if service else "")
                        self.assertEqual(record["port"], 8443 if tls else 8080)

    def test_extra_fields_and_retries(self) -> None:
        """
        Logged headers (which may reuse a key) and retries take the record
        path: the line is the record's.
        """
        call = _CallStub("x", False, "", None)
        call.log_extra = {"req_content_type": "over", "resp_x": 'a"b'}
        call.tried = ["10.0.0.9:80"]
        fast, slow = self.lines(call)
        self.assertEqual(fast, slow)
        record = json.loads(fast)
        self.assertEqual(record["req_content_type"], "over")
        self.assertEqual(record["tried"], ["10.0.0.9:80", "x"])
        self.assertEqual(list(record).index("req_content_type"), 13)

    def test_logger_without_encoded_records(self) -> None:
        """
        A logger with only C{info} gets the record as attributes.
        """
        got: list[tuple[str, dict[str, Any]]] = []
        logger = SimpleNamespace(info=lambda msg, **attrs: got.append((msg, attrs)))
        reqlog.log_request(logger, _CallStub("p", True, "", None), 5)
        self.assertEqual(got[0][0], "Request")
        self.assertEqual(got[0][1]["path"], "p")
        self.assertEqual(got[0][1]["scheme"], "https")

    def test_repeated_values_encoded_once(self) -> None:
        """
        What repeats from one request to the next (host, method, content
        types, service and target, the client's fields) is encoded once:
        a second request like the first encodes only its path, request id
        and query.
        """
        for cache in (reqlog._values, reqlog._service_targets, reqlog._clients):
            cache.clear()
        encoded: list[str] = []
        real = reqlog._s

        def counting(text: str) -> str:
            encoded.append(text)
            return real(text)

        self.patch(reqlog, "_s", counting)
        first, _ = self.lines(_CallStub("a", False, "", SimpleNamespace(name="svc")))
        del encoded[:]
        second, _ = self.lines(_CallStub("a", False, "", SimpleNamespace(name="svc")))
        self.assertEqual(second, first)
        self.assertEqual(len(encoded), 3)

    def test_caches_bounded(self) -> None:
        """
        Clients choose most of these values: each cache holds at most
        L{reqlog.CACHE_SIZE} of them, and every line stays right.
        """
        for i in range(reqlog.CACHE_SIZE + 5):
            call = _CallStub("h%d" % i, False, "", SimpleNamespace(name="s%d" % i))
            fast, slow = self.lines(call)
            self.assertEqual(fast, slow)
        for cache in (reqlog._values, reqlog._service_targets, reqlog._clients):
            self.assertTrue(0 < len(cache) <= reqlog.CACHE_SIZE)

    def test_built_when_the_worker_writes_its_turn(self) -> None:
        """
        Through a worker's log stream the line is built when the reactor
        turn's lines are written (after the turn's responses went out):
        nothing is encoded before, and the line is the one written at once
        elsewhere.
        """
        import os

        from mproxy.workers.worker import FDLines

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        turn: list[Any] = []
        encoded: list[str] = []
        real = reqlog._s

        def counting(text: str) -> str:
            encoded.append(text)
            return real(text)

        self.patch(reqlog, "_s", counting)
        call = _CallStub("/later", False, "", SimpleNamespace(name="svc"))
        reqlog.log_request(JSONLogger(FDLines(w, turn.append), now=lambda: "T"), call, 7)
        self.assertEqual(encoded, [])
        self.assertEqual(len(turn), 1)
        turn[0]()
        self.assertNotEqual(encoded, [])
        now = io.StringIO()
        reqlog.log_request(JSONLogger(now, now=lambda: "T"), call, 7)
        self.assertEqual(os.read(r, 65536), now.getvalue().encode("utf-8"))

    def test_below_level(self) -> None:
        """
        A logger above INFO writes no request line.
        """
        out = io.StringIO()
        reqlog.log_request(JSONLogger(out, level="WARN"), _CallStub("p", False, "", None), 5)
        self.assertEqual(out.getvalue(), "")


class PageTests(SynchronousTestCase):
    def test_titles(self) -> None:
        """
        The built-in pages carry their titles.
        """
        for code, title in [(404, "404 — Not Found"), (413, "413 — Content Too Large"),
                            (502, "502 — Bad Gateway"),
                            (503, "503 — Service Temporarily Unavailable"),
                            (504, "504 — Gateway Timeout")]:
            self.assertIn(title.encode(), render_page(code))

    def test_fallback(self) -> None:
        """
        Other statuses get a one-line heading.
        """
        self.assertEqual(render_page(400), b"<h1>400 Bad Request</h1>")
        self.assertEqual(render_page(500), b"<h1>500 Internal Server Error</h1>")

    def test_503_default_text(self) -> None:
        """
        Without a message, 503 has a generic text and no placeholder.
        """
        page = render_page(503)
        self.assertNotIn(b"{{", page)
        self.assertIn(b"maintenance", page)

    def test_request_ids_unique(self) -> None:
        """
        Generated request ids are UUID v4 strings and differ.
        """
        ids = {new_request_id() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        for i in ids:
            self.assertTrue(re.match(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", i))


class SpoolTests(SynchronousTestCase):
    def test_memory_then_disk(self) -> None:
        """
        Up to C{memory} bytes stay in memory, the rest spills to an
        anonymous file; reading gives everything back in order; closing
        releases the file.
        """
        from mproxy.http.spool import Spool

        logger = ListLogger()
        s = Spool(4, 0, logger)
        self.assertTrue(s.write(b"abc"))
        self.assertFalse(s.spilled)
        self.assertTrue(s.write(b"defgh"))
        self.assertTrue(s.spilled)
        f = s._file
        out = b""
        while True:
            piece = s.read(2)
            if not piece:
                break
            out += piece
        self.assertEqual(out, b"abcdefgh")
        s.close()
        self.assertTrue(f.closed)
        self.assertEqual(logger.messages(), ["Buffer: spilling to disk", "Buffer: removing spill"])

    def test_limit(self) -> None:
        """
        Writing past the limit fails.
        """
        from mproxy.http.spool import Spool

        s = Spool(100, 5)
        self.assertTrue(s.write(b"12345"))
        self.assertFalse(s.write(b"6"))
        self.assertEqual(s.size, 5)


class RequestBufferingTests(SynchronousTestCase):
    def test_buffered_then_sent(self) -> None:
        """
        With request buffering the target is contacted only once the whole
        body is in (spilled past buffer_memory), then gets all of it; the
        spill is removed afterwards.
        """
        h = Harness(buffer_requests=True, buffer_memory=4, max_request_body=100)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(h.reactor.tcpClients, [])
        h.send(b"world")
        proto, t = h.upstream()
        self.assertTrue(t.value().endswith(b"\r\n\r\nhelloworld"))
        self.assertIn("Buffer: spilling to disk", h.logger.messages())
        proto.dataReceived(OK)
        self.assertIn("Buffer: removing spill", h.logger.messages())
        self.assertIn(b"hello", h.output())

    def test_declared_too_large(self) -> None:
        """
        A declared length over max_request_body: 413 at once, target never
        contacted.
        """
        h = Harness(buffer_requests=True, max_request_body=8)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 20\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 413 "))
        self.assertIn("413 — Content Too Large".encode(), h.output())
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.service.claims[0].releases, 1)
        self.assertTrue(h.ct.disconnecting)

    def test_chunked_too_large(self) -> None:
        """
        A chunked body growing past the limit: 413, target never contacted.
        """
        h = Harness(buffer_requests=True, buffer_memory=4, max_request_body=8)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n5\r\nworld\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_limit_ignored_without_buffering(self) -> None:
        """
        Without request buffering max_request_body is not enforced.
        """
        h = Harness(max_request_body=2)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello")
        proto, t = h.upstream()
        self.assertTrue(t.value().endswith(b"hello"))


class ResponseBufferingTests(SynchronousTestCase):
    def test_buffered_response(self) -> None:
        """
        With response buffering nothing is sent until the target finished.
        """
        h = Harness(buffer_responses=True, buffer_memory=2, max_response_body=100)
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(h.output(), b"")
        proto.dataReceived(b"world")
        self.assertEqual(h.output(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhelloworld")
        self.assertEqual(h.service.claims[0].releases, 1)

    def test_too_large_500(self) -> None:
        """
        A response over max_response_body: 500, nothing of it sent.
        """
        h = Harness(buffer_responses=True, buffer_memory=2, max_response_body=8)
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\nhelloworld")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"))
        self.assertIn(b"<h1>500 Internal Server Error</h1>", out)
        self.assertNotIn(b"X-A", out)
        self.assertIn("Response exceeded max response limit", h.logger.messages())
        self.assertTrue(t.disconnected)

    def test_limit_ignored_without_buffering(self) -> None:
        """
        Without response buffering max_response_body is not enforced.
        """
        h = Harness(max_response_body=2)
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(OK)
        self.assertTrue(h.output().endswith(b"hello"))

    def test_streaming_bypasses(self) -> None:
        """
        Event streams (with parameters), X-Accel-Buffering: no and responses
        of unknown length are streamed even with buffering on.
        """
        for head in (b"Content-Type: text/event-stream; charset=utf-8\r\nContent-Length: 20\r\n",
                     b"X-Accel-Buffering: no\r\nContent-Length: 20\r\n",
                     b"Transfer-Encoding: chunked\r\n"):
            h = Harness(buffer_responses=True, max_response_body=2)
            h.get()
            proto, t = h.upstream()
            body = b"5\r\nhello\r\n" if b"chunked" in head else b"hello"
            proto.dataReceived(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body)
            self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK"), head)
            self.assertIn(b"hello", h.output())

    def test_websocket_bypasses(self) -> None:
        """
        Upgrades are tunnelled even with tiny buffering limits.
        """
        h = Harness(buffer_requests=True, buffer_responses=True, buffer_memory=1,
                    max_request_body=2, max_response_body=2)
        h.get(b"/ws", UpgradeTests.WS)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\n\r\nlong frame from target")
        self.assertTrue(h.output().endswith(b"long frame from target"))
        h.send(b"long frame from client")
        self.assertTrue(t.value().endswith(b"long frame from client"))


class FrontTests(SynchronousTestCase):
    def test_acme_challenge(self) -> None:
        """
        Known ACME HTTP-01 tokens are answered before routing (even for
        unrouted hosts); unknown ones fall through.
        """

        class Challenges:
            def http01_response(self, path: bytes) -> bytes | None:
                return b"token.key" if path == b"/.well-known/acme-challenge/tok" else None

        h = Harness()
        h.site.resource.challenges = Challenges()
        h.send(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: unknown.org\r\n\r\n")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(out.endswith(b"\r\n\r\ntoken.key"))
        self.assertEqual(h.requests_logged()[0]["service"], "")
        h.get(b"/.well-known/acme-challenge/other")
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_tls_request_to_plain_service(self) -> None:
        """
        A request over TLS for a service without TLS is a 503.
        """
        h = Harness()
        h.client.is_tls = True
        h.get()
        self.assertTrue(h.output().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_https_redirect(self) -> None:
        """
        A TLS service redirects plain HTTP with a 301 that closes the
        connection.
        """
        h = Harness()
        h.service.options = ServiceOptions(hosts=["example.com"], tls_enabled=True)
        h.get(b"/p?q=1")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 301 Moved Permanently\r\n"), out)
        self.assertIn(b"Location: https://example.com/p?q=1\r\n", out)
        self.assertIn(b"Connection: close\r\n", out)
        self.assertTrue(h.ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_tls_service_over_tls_served(self) -> None:
        """
        The same TLS service is proxied when the request came over TLS, and
        the target is told the scheme.
        """
        h = Harness(forward_headers=False)
        h.service.options = ServiceOptions(hosts=["example.com"], tls_enabled=True)
        h.client.is_tls = True
        h.get()
        proto, t = h.upstream()
        self.assertEqual(header(upstream_headers(t.value()), b"x-forwarded-proto"), [b"https"])
        proto.dataReceived(OK)
        log = h.requests_logged()[0]
        self.assertEqual((log["scheme"], log["port"]), ("https", 443))

    def test_canonical_host_redirect(self) -> None:
        """
        Requests to another host of the service go to the canonical host.
        """
        h = Harness()
        h.router.routes["www.example.com"] = (h.service, "/")
        h.service.options = ServiceOptions(hosts=["example.com", "www.example.com"],
                                           canonical_host="example.com")
        h.send(b"POST /p HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 0\r\n\r\n")
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 301 "))
        self.assertIn(b"Location: http://example.com/p\r\n", out)
        self.assertIn(b"Content-Length: 0\r\n", out)


    def test_canonical_host_redirect_over_tls(self) -> None:
        """
        Over TLS too, another host of a TLS service goes to the canonical
        host (on HTTPS), and the canonical host itself is served.
        """
        h = Harness()
        h.router.routes["www.example.com"] = (h.service, "/")
        h.service.options = ServiceOptions(hosts=["example.com", "www.example.com"],
                                           tls_enabled=True, canonical_host="example.com")
        h.client.is_tls = True
        h.send(b"GET /p HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        self.assertIn(b"Location: https://example.com/p\r\n", h.output())
        h = Harness()
        h.service.options = ServiceOptions(hosts=["example.com"], tls_enabled=True,
                                           canonical_host="example.com")
        h.client.is_tls = True
        h.get()
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_tls_service_without_redirect_serves_http(self) -> None:
        """
        A TLS service with the HTTPS redirect off serves plain HTTP.
        """
        h = Harness()
        h.service.options = ServiceOptions(hosts=["example.com"], tls_enabled=True,
                                           tls_redirect=False)
        h.get()
        self.assertEqual(h.output(), b"")
        self.assertEqual(len(h.reactor.tcpClients), 1)

class CookieScopeTests(SynchronousTestCase):
    def test_scope_cookie(self) -> None:
        """
        Paths are joined onto the prefix for host-only or same-host cookies;
        other domains and unparseable values are untouched.
        """
        from mproxy.http.cookies import scope_cookie

        self.assertEqual(scope_cookie(b"a=1; Path=/", "/api", "example.com"), b"a=1; Path=/api")
        self.assertEqual(scope_cookie(b"a=1; Path=/admin; HttpOnly", "/api", "example.com:8080"),
                         b"a=1; Path=/api/admin; HttpOnly")
        self.assertEqual(scope_cookie(b"a=1", "/api", "example.com"), b"a=1; Path=/api")
        self.assertEqual(scope_cookie(b"a=1; Domain=example.com", "/api", "example.com"),
                         b"a=1; Path=/api; Domain=example.com")
        self.assertEqual(scope_cookie(b"a=1; Domain=other.com; Path=/", "/api", "example.com"),
                         b"a=1; Domain=other.com; Path=/")
        self.assertEqual(scope_cookie(b"garbage", "/api", "example.com"), b"garbage")

    def test_through_proxy(self) -> None:
        """
        With scope_cookie_paths and a stripped prefix, responses' cookies
        are scoped; without the option they are not.
        """
        h = Harness(prefix="/api", scope_cookie_paths=True)
        h.get(b"/api/x")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path=/\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"Set-Cookie: s=1; Path=/api\r\n", h.output())
        h = Harness(prefix="/api")
        h.get(b"/api/x")
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path=/\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"Set-Cookie: s=1; Path=/\r\n", h.output())


class MetricsTests(SynchronousTestCase):
    def test_unrouted_counted(self) -> None:
        """
        Unrouted requests are counted with an empty service and no gauge.
        """
        h = Harness()
        h.send(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
        self.assertEqual(h.metrics.events, [("observe", "", "GET", 404)])

    def test_excluded_path(self) -> None:
        """
        A target-view path listed in exclude_metrics_paths is not counted
        but still logged.
        """
        h = Harness(prefix="/api")
        h.service.options = ServiceOptions(exclude_metrics_paths=["/up"])
        h.get(b"/api/up")
        proto, t = h.upstream()
        proto.dataReceived(OK)
        self.assertEqual(h.metrics.events, [])
        self.assertEqual(len(h.requests_logged()), 1)
        h.get(b"/api/other")
        proto.dataReceived(OK)
        self.assertEqual([e[0] for e in h.metrics.events], ["enter", "leave", "observe"])


class HostlessTests(SynchronousTestCase):
    def test_http10_without_host(self) -> None:
        """
        An HTTP/1.0 request without Host reaches the default service and the
        target gets the target address as Host.
        """
        h = Harness()
        h.router.routes[""] = (h.service, "/")
        h.send(b"GET /old HTTP/1.0\r\n\r\n")
        proto, t = h.upstream()
        hs = upstream_headers(t.value())
        self.assertEqual(header(hs, b"host"), [b"10.0.0.2:3000"])
        self.assertEqual(header(hs, b"x-forwarded-host"), [])
        proto.dataReceived(OK)
        self.assertTrue(h.output().endswith(b"hello"))
        self.assertTrue(h.ct.disconnecting)


class ProxyFuzzTests(SynchronousTestCase):
    def test_mutated_requests(self) -> None:
        """
        Mutated requests and responses never raise out of the proxy, and
        every claim taken is released once the exchange ends.
        """
        import random

        rnd = random.Random(99)
        req = (b"POST /a%20b/c?x=%zz HTTP/1.1\r\nHost: example.com\r\nCookie: a=b; mproxy-rollout=\xff\r\n"
               b"Content-Length: 3\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: x-a, close\r\n\r\nabc")
        resp = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nConnection: close\r\n"
                b"X-Writer-Affinity: false\r\n\r\nhello")
        for i in range(300):
            data = bytearray(req)
            for _ in range(rnd.randint(0, 4)):
                pos = rnd.randrange(len(data))
                data[pos] = rnd.randrange(256)
            h = Harness(prefix=rnd.choice(["/", "/a b"]))
            h.send(bytes(data))
            if h.reactor.tcpClients:
                proto, t = h.upstream()
                r = bytearray(resp)
                for _ in range(rnd.randint(0, 3)):
                    pos = rnd.randrange(len(r))
                    r[pos] = rnd.randrange(256)
                proto.dataReceived(bytes(r))
                proto.connectionLost(Failure(error.ConnectionDone()))
                h.client.connectionLost(Failure(error.ConnectionDone()))
                for c in h.service.claims:
                    self.assertEqual(c.releases, 1, (bytes(data), bytes(r)))



class HeldErrorTests(SynchronousTestCase):
    def test_held_failure_after_client_left(self) -> None:
        """
        A hold that fails after the client left is not reported as a
        proxying error.
        """
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.service.result = d
        h.get()
        h.client.connectionLost(Failure(error.ConnectionDone()))
        d.errback(RuntimeError("gone"))
        self.assertNotIn("Error while proxying", h.logger.messages())
        self.assertEqual(h.requests_logged()[0]["status"], 499)


class BodyTimeoutProxyTests(SynchronousTestCase):
    def test_stalled_upload_408(self) -> None:
        """
        A stalled upload: 408 to the client, upstream abandoned, logged.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nab")
        proto, t = h.upstream()
        h.reactor.advance(61)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(t.disconnected)
        self.assertIn("Request body timed out", h.logger.messages())
        self.assertEqual(h.service.claims[0].releases, 1)


class SendTimeoutTests(SynchronousTestCase):
    def test_client_not_reading(self) -> None:
        """
        A client whose socket stays full for the send timeout is dropped and
        the upstream abandoned; reading again in time keeps it.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        producer = h.ct.producer
        producer.pauseProducing()
        self.assertEqual(t.producerState, "paused")
        h.reactor.advance(59)
        producer.resumeProducing()
        self.assertEqual(t.producerState, "producing")
        h.reactor.advance(10)
        self.assertFalse(h.ct.disconnected)
        producer.pauseProducing()
        h.reactor.advance(61)
        self.assertTrue(h.ct.disconnected)
        self.assertTrue(t.disconnected)
        self.assertIn("Client stopped reading", h.logger.messages())
        self.assertEqual(h.service.claims[0].releases, 1)


class CustomPageTests(SynchronousTestCase):
    def test_custom_pages(self) -> None:
        """
        A service's error-pages directory overrides built-in pages per
        status, with the stop message filled in; other statuses keep the
        built-in page.
        """
        import os

        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "503.html"), "w") as f:
            f.write("<p>Custom: {{ .Message }}</p>")
        h = Harness()
        h.service.options = ServiceOptions(error_pages=d)
        h.service.result = Refusal(503, "back <soon>")
        h.get()
        self.assertTrue(h.output().endswith(b"<p>Custom: back &lt;soon&gt;</p>"))
        h2 = Harness()
        h2.service.options = ServiceOptions(error_pages=d)
        h2.service.result = Refusal(504)
        h2.get()
        self.assertIn("504 — Gateway Timeout".encode(), h2.output())


class SmugglingTests(SynchronousTestCase):
    """
    The framing and routing of a forwarded message are the proxy's own.
    """

    def test_connection_cannot_drop_framing(self) -> None:
        """
        Tokens in Connection never remove Content-Length or Host from the
        forwarded request; other named headers still go.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\n"
               b"Connection: Content-Length, Host, Transfer-Encoding, X-Hop\r\n"
               b"X-Hop: 1\r\nContent-Length: 5\r\n\r\nhello")
        proto, t = h.upstream()
        raw = t.value()
        hs = upstream_headers(raw)
        self.assertEqual(header(hs, b"content-length"), [b"5"])
        self.assertEqual(header(hs, b"host"), [b"example.com"])
        self.assertEqual(header(hs, b"x-hop"), [])
        self.assertEqual(header(hs, b"transfer-encoding"), [])
        self.assertTrue(raw.endswith(b"\r\n\r\nhello"))

    def test_smuggled_request_stays_body(self) -> None:
        """
        A body that spells a second request reaches the target as the body
        of the first, with its length: the target sees one request.
        """
        import httptools

        h = Harness()
        smuggled = b"GET /admin HTTP/1.1\r\nHost: other.example\r\n\r\n"
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nConnection: content-length\r\n"
               b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        proto, t = h.upstream()
        seen: list[bytes] = []

        class Target:
            def on_url(self, url: bytes) -> None:
                seen.append(url)

        httptools.HttpRequestParser(Target()).feed_data(t.value())
        self.assertEqual(seen, [b"/x"])

    def test_declared_zero_length_kept(self) -> None:
        """
        A declared C{Content-Length: 0} is forwarded as such (some apps want
        a length on every POST); none is invented for a GET.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
        proto, t = h.upstream()
        self.assertEqual(header(upstream_headers(t.value()), b"content-length"), [b"0"])
        h = Harness()
        h.get()
        proto, t = h.upstream()
        self.assertEqual(header(upstream_headers(t.value()), b"content-length"), [])

    def test_response_connection_cannot_drop_length(self) -> None:
        """
        A target's Connection header cannot remove the response's
        Content-Length either (the client would not know where it ends).
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Up\r\nX-Up: 1\r\n"
                           b"Content-Length: 5\r\n\r\nhello")
        out = h.output()
        self.assertIn(b"\r\nContent-Length: 5\r\n", out)
        self.assertNotIn(b"X-Up", out)

    def test_transfer_codings_kept(self) -> None:
        """
        C{Transfer-Encoding: gzip, chunked} reaches the target with its gzip
        coding; the body stays as sent.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
        proto, t = h.upstream()
        hs = upstream_headers(t.value())
        self.assertEqual(header(hs, b"transfer-encoding"), [b"gzip, chunked"])
        self.assertTrue(t.value().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))


class HeaderHygieneTests(SynchronousTestCase):
    def test_underscore_headers_dropped(self) -> None:
        """
        Header names with underscores never reach the target (CGI-style apps
        would read X_Forwarded_For as X-Forwarded-For); the drop is logged
        at debug level.
        """
        h = Harness()
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nX_Forwarded_For: 6.6.6.6\r\n"
               b"X_Forwarded_Proto: https\r\nContent_Length: 99\r\nX-Fine: 1\r\n"
               b"Content-Length: 0\r\n\r\n")
        proto, t = h.upstream()
        hs = upstream_headers(t.value())
        self.assertEqual([n for n, v in hs if b"_" in n], [])
        self.assertEqual(header(hs, b"x-fine"), [b"1"])
        self.assertEqual(header(hs, b"x-forwarded-for"), [b"192.168.1.1"])
        dropped = [r for r in h.logger.records if r["msg"] == "Dropped request header with underscore"]
        self.assertEqual([(r["level"], r["header"]) for r in dropped], [
            ("DEBUG", "X_Forwarded_For"), ("DEBUG", "X_Forwarded_Proto"),
            ("DEBUG", "Content_Length")])

    def test_request_start_replaced_without_forward_headers(self) -> None:
        """
        With forward-headers off a client's X-Request-Start is replaced by
        the proxy's own.
        """
        h = Harness(forward_headers=False)
        h.get(headers=b"X-Request-Start: t=1\r\n")
        proto, t = h.upstream()
        self.assertRegex(header(upstream_headers(t.value()), b"x-request-start")[0].decode(),
                         r"^t=\d{13}$")

    def test_invalid_status_502(self) -> None:
        """
        A status code outside 100-599 from a target is a 502.
        """
        for status in (b"000", b"099", b"600", b"999"):
            h = Harness()
            h.get()
            proto, t = h.upstream()
            proto.dataReceived(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 0\r\n\r\n")
            self.assertTrue(h.output().startswith(b"HTTP/1.1 502 "), status)


class DotSegmentTests(SynchronousTestCase):
    """
    Dot-segments are resolved before routing, and the target gets the
    resolved path.
    """

    def routed(self, path: bytes, prefix: str = "/") -> tuple[Harness, bytes]:
        h = Harness(prefix=prefix)
        h.get(path)
        return h, h.output()

    def test_prefix_not_escaped(self) -> None:
        """
        C{/public/../internal} in any spelling is C{/internal}: outside the
        C{/public} prefix, so no route.
        """
        for path in (b"/public/../internal", b"/public/%2e%2e/internal",
                     b"/public/%2E%2E/internal", b"/public/.%2e/internal",
                     b"/public/..%2finternal", b"/public%2F..%2Finternal",
                     b"/public/x/../../internal", b"/public/./../internal"):
            h, out = self.routed(path, prefix="/public")
            self.assertTrue(out.startswith(b"HTTP/1.1 404 "), path)
            self.assertEqual(h.router.calls[-1][1], "/internal")
            self.assertEqual(h.reactor.tcpClients, [])

    def test_resolved_path_forwarded(self) -> None:
        """
        A path with dot-segments that stays under the prefix is forwarded
        resolved (query untouched, other escapes kept); one without is
        forwarded byte for byte.
        """
        h, _ = self.routed(b"/public/a/./b/../c%20d?x=/../y", prefix="/public")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /a/c%20d?x=/../y HTTP/1.1\r\n"))
        proto.dataReceived(OK)
        self.assertEqual(h.requests_logged()[0]["path"], "/public/a/c d")
        h, _ = self.routed(b"/public/a%2Fb/.hidden/x..y/%2e%2e.")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /public/a%2Fb/.hidden/x..y/%2e%2e. HTTP/1.1\r\n"))

    def test_resolved_prefix_kept(self) -> None:
        """
        Without prefix stripping the target sees the whole resolved path.
        """
        h = Harness(prefix="/public")
        h.service.options = ServiceOptions(strip_prefix=False)
        h.get(b"/public/a/../b?q")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /public/b?q HTTP/1.1\r\n"))

    def test_root_is_floor(self) -> None:
        """
        C{..} above the root stays at the root.
        """
        h, _ = self.routed(b"/../../etc/passwd")
        proto, t = h.upstream()
        self.assertTrue(t.value().startswith(b"GET /etc/passwd HTTP/1.1\r\n"))


class DroppedUpgradeTests(SynchronousTestCase):
    """
    Only WebSocket upgrades open a tunnel; any other offer is dropped.
    """

    H2C = (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")

    def assert_plain(self, hs: list[tuple[bytes, bytes]]) -> None:
        for gone in (b"upgrade", b"http2-settings", b"connection"):
            self.assertEqual(header(hs, gone), [], gone)

    def test_h2c_proxied_as_normal_request(self) -> None:
        """
        An h2c offer reaches the target as a normal request (no Upgrade,
        HTTP2-Settings or Connection); the service is not told it is a
        WebSocket, and the client connection stays usable.
        """
        h = Harness()
        h.get(b"/x", self.H2C)
        self.assertFalse(h.service.selects[0][3])
        proto, t = h.upstream()
        self.assert_plain(upstream_headers(t.value()))
        proto.dataReceived(OK)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertFalse(h.ct.disconnecting)
        t.clear()
        h.get(b"/second")
        self.assertTrue(t.value().startswith(b"GET /second HTTP/1.1\r\n"))

    def test_h2c_with_body(self) -> None:
        """
        C{curl --http2 -d ...} over plain HTTP: the body is forwarded (it was
        a 400 "upgrade request with a body").
        """
        for framing, body in ((b"Content-Length: 5\r\n", b"hello"),
                              (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")):
            h = Harness()
            h.send(b"POST /form HTTP/1.1\r\nHost: example.com\r\n" + self.H2C + framing
                   + b"\r\n" + body)
            proto, t = h.upstream()
            raw = t.value()
            self.assert_plain(upstream_headers(raw))
            self.assertTrue(raw.endswith(b"\r\n\r\n" + body), raw)
            proto.dataReceived(OK)
            self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))
            t.clear()
            h.get(b"/next")
            self.assertTrue(t.value().startswith(b"GET /next HTTP/1.1\r\n"), framing)

    def test_target_101_to_dropped_offer_502(self) -> None:
        """
        A target that switches anyway (it cannot have been asked) is a 502.
        """
        h = Harness()
        h.get(b"/x", self.H2C)
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                           b"Connection: Upgrade\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 "))

    def test_websocket_only_on_get_http11(self) -> None:
        """
        A WebSocket offer on another method, or over HTTP/1.0, is dropped too.
        """
        for line in (b"POST /ws HTTP/1.1", b"GET /ws HTTP/1.0"):
            h = Harness()
            h.send(line + b"\r\nHost: example.com\r\n" + UpgradeTests.WS + b"\r\n")
            self.assertFalse(h.service.selects[0][3])
            proto, t = h.upstream()
            self.assert_plain(upstream_headers(t.value()))
