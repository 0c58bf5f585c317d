"""
Tests for L{mproxy.http.server}: the fast HTTP/1.1 channel.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.http.interfaces import IRequestChannel, ITunnelExchange
from mproxy.http.request import header_lines
from mproxy.http.server import IDLE_CLOSE_QUIET, FastHTTPChannel, FastRequest, ProxySite


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """
    A L{StringTransport} that is a TCP connection: it can half-close and
    switch Nagle off.
    """

    half_closed = False
    nodelay_calls: list[bool]

    def __init__(self) -> None:
        super().__init__()
        self.nodelay_calls = []

    def loseWriteConnection(self) -> None:
        self.half_closed = True

    def getTcpNoDelay(self) -> bool:
        return bool(self.nodelay_calls and self.nodelay_calls[-1])

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay_calls.append(enabled)

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


class Recorder(Resource):
    """
    Remembers requests; answers them only when the test says so, unless
    C{auto} is set.
    """

    isLeaf = True

    def __init__(self, auto: bool = False) -> None:
        super().__init__()
        self.requests: list[FastRequest] = []
        self.auto = auto
        self.bodies: dict[int, list[bytes]] = {}

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        if self.auto:
            body = b"ok:" + request.path
            request.start_response(200, None, [(b"Content-Length", b"%d" % len(body))], len(body))
            request.write(body)
            request.finish()
        return NOT_DONE_YET


def respond(request: FastRequest, body: bytes = b"hi", code: int = 200,
            length: bool = True) -> None:
    headers = [(b"Content-Length", b"%d" % len(body))] if length else []
    request.start_response(code, None, headers, len(body) if length else None)
    if body:
        request.write(body)
    request.finish()


class Harness:
    def __init__(self, resource: Any, **kw: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.site = ProxySite(resource, self.reactor, **kw)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.writes: list[bytes] = []
        orig = self.transport.write

        def write(data: bytes) -> None:
            self.writes.append(data)
            orig(data)

        self.transport.write = write  # type: ignore[method-assign]
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"


class RequestParsingTests(SynchronousTestCase):
    def test_simple_get(self) -> None:
        """
        A request reaches the root resource with method, path, query and raw
        headers; the response goes out in one write.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        self.assertEqual(len(r.requests), 1)
        req = r.requests[0]
        self.assertIsInstance(req, FastRequest)
        self.assertEqual(req.method, b"GET")
        self.assertEqual(req.path, b"/a")
        self.assertEqual(req.query, b"b=1")
        self.assertEqual(req.uri, b"/a?b=1")
        self.assertEqual(req.raw_headers, [(b"Host", b"example.com"), (b"User-Agent", b"t")])
        respond(req, b"hello")
        self.assertEqual(h.writes, [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
        self.assertFalse(h.closed)

    def test_twisted_request_api(self) -> None:
        """
        Ordinary resources can use the standard request API: headers, args,
        setHeader, setResponseCode, write and finish.
        """

        class Plain(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                assert request.getHeader(b"user-agent") == b"t"
                assert request.requestHeaders.getRawHeaders(b"host") == [b"example.com"]
                assert request.args == {b"b": [b"1"]}
                request.setResponseCode(201)
                request.setHeader(b"X-A", b"1")
                return b"body"

        h = Harness(Plain())
        h.send(GET)
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 201 Created\r\n"), out)
        self.assertIn(b"X-A: 1\r\n", out)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n4\r\nbody\r\n0\r\n\r\n"), out)

    def test_keep_alive(self) -> None:
        """
        Several requests are served one after another on one connection.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(GET)
        h.send(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(r.requests), 2)
        self.assertEqual(h.output().count(b"HTTP/1.1 200 OK"), 2)
        self.assertFalse(h.closed)

    def test_pipelining_order(self) -> None:
        """
        Pipelined requests are dispatched one at a time, in order, so the
        responses cannot be reordered.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([q.path for q in r.requests], [b"/1"])
        respond(r.requests[0], b"one")
        self.assertEqual([q.path for q in r.requests], [b"/1", b"/2"])
        respond(r.requests[1], b"two")
        out = h.output()
        self.assertLess(out.index(b"one"), out.index(b"two"))

    def test_connection_close(self) -> None:
        """
        C{Connection: close} from the client closes after the response,
        which says so.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"Connection: close\r\n", h.output())
        self.assertTrue(h.closed)

    def test_http10_keep_alive(self) -> None:
        """
        HTTP/1.0 clients keep the connection only when they ask for it.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"Connection: keep-alive\r\n", h.output())
        self.assertFalse(h.closed)
        h2 = Harness(Recorder(auto=True))
        h2.send(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(h2.closed)

    def test_unknown_length_chunked(self) -> None:
        """
        A response of unknown length is sent chunked to HTTP/1.1 clients.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        req = r.requests[0]
        req.start_response(200, None, [(b"Content-Type", b"text/plain")], None)
        req.write(b"abc")
        req.write(b"defgh")
        req.finish()
        self.assertEqual(
            h.output(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n",
        )

    def test_trailers(self) -> None:
        """
        Trailers given to finish() follow the last chunk.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        req = r.requests[0]
        req.start_response(200, None, [], None)
        req.write(b"x")
        req.finish([(b"Grpc-Status", b"0")])
        self.assertTrue(h.output().endswith(b"1\r\nx\r\n0\r\nGrpc-Status: 0\r\n\r\n"))

    def test_unknown_length_http10(self) -> None:
        """
        For HTTP/1.0 a response of unknown length ends with the connection.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        req = r.requests[0]
        req.start_response(200, None, [], None)
        req.write(b"abc")
        req.finish()
        self.assertNotIn(b"chunked", h.output())
        self.assertTrue(h.output().endswith(b"\r\n\r\nabc"))
        self.assertTrue(h.closed)

    def test_head_has_no_body(self) -> None:
        """
        HEAD responses keep their Content-Length but send no body.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        respond(r.requests[0], b"hello")
        self.assertEqual(h.output(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertFalse(h.closed)

    def test_204_304_no_body(self) -> None:
        """
        204 and 304 responses carry no body and are not chunked.
        """
        for code in (204, 304):
            r = Recorder()
            h = Harness(r)
            h.send(GET)
            req = r.requests[0]
            req.start_response(code, None, [], None)
            req.write(b"ignored")
            req.finish()
            out = h.output()
            self.assertNotIn(b"chunked", out)
            self.assertTrue(out.endswith(b"\r\n\r\n"), out)
            self.assertFalse(h.closed)

    def test_absolute_form(self) -> None:
        """
        An absolute-form request target is reduced to path and query.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET http://example.com/p?q HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(r.requests[0].path, b"/p")
        self.assertEqual(r.requests[0].query, b"q")


class MalformedRequestTests(SynchronousTestCase):
    def assertRejected(self, data: bytes, status: bytes) -> Harness:
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(data)
        self.assertEqual(r.requests, [], "a malformed request reached the resource")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 " + status), h.output())
        self.assertTrue(h.closed)
        return h

    def test_garbage(self) -> None:
        """
        Garbage gets a 400 and the connection closes.
        """
        self.assertRejected(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400")

    def test_content_length_and_transfer_encoding(self) -> None:
        """
        Content-Length together with Transfer-Encoding (smuggling) is a 400.
        """
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400")

    def test_transfer_encoding_not_chunked(self) -> None:
        """
        A Transfer-Encoding whose last coding is not chunked is a 400.
        """
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", b"400")

    def test_duplicate_content_length(self) -> None:
        """
        Two Content-Length headers are a 400.
        """
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"400")

    def test_bad_content_length(self) -> None:
        """
        A non-numeric Content-Length is a 400.
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc", b"400")

    def test_missing_host(self) -> None:
        """
        An HTTP/1.1 request without Host is a 400.
        """
        self.assertRejected(b"GET / HTTP/1.1\r\n\r\n", b"400")

    def test_too_many_headers(self) -> None:
        """
        More than 100 headers: 431.
        """
        headers = b"".join(b"X-%d: v\r\n" % i for i in range(150))
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", b"431")

    def test_headers_too_large(self) -> None:
        """
        A header section over 64 KiB: 431, even before it is complete.
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000, b"431")

    def test_long_request_line(self) -> None:
        """
        A request target over 8 KiB: 414.
        """
        self.assertRejected(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414")

    def test_malformed_chunked_body(self) -> None:
        """
        A malformed chunked body is reported to the body consumer, which
        answers; the connection then closes.
        """
        r = Recorder()
        h = Harness(r)
        errors: list[tuple[int, str]] = []
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        req = r.requests[0]
        req.set_body_consumer(lambda d: None, lambda: None,
                              lambda s, m: errors.append((s, m)))
        h.send(b"ZZ\r\nhello\r\n0\r\n\r\n")
        self.assertEqual([e[0] for e in errors], [400])
        respond(req, b"bad", code=400)
        self.assertTrue(h.closed)

    def test_error_after_pipelined_response(self) -> None:
        """
        A malformed request behind a pending one is answered after it.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET + b"BAD\x00\r\n\r\n")
        self.assertEqual(len(r.requests), 1)
        self.assertEqual(h.output(), b"")
        respond(r.requests[0], b"first")
        out = h.output()
        self.assertLess(out.index(b"first"), out.index(b"400 Bad Request"))
        self.assertTrue(h.closed)


class BodyTests(SynchronousTestCase):
    def test_streamed_body(self) -> None:
        """
        The body is delivered as it arrives (queued until a consumer is set),
        de-chunked, then the end is signalled.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        req = r.requests[0]
        self.assertEqual(req.body_length, -1)
        got: list[bytes] = []
        ended: list[bool] = []
        req.set_body_consumer(got.append, lambda: ended.append(True), lambda s, m: None)
        self.assertEqual(got, [b"abc"])
        h.send(b"2\r\nde\r\n")
        self.assertEqual(got, [b"abc", b"de"])
        self.assertEqual(ended, [])
        h.send(b"0\r\n\r\n")
        self.assertEqual(ended, [True])

    def test_content_length_body(self) -> None:
        """
        A Content-Length body is delivered and ends at the declared length.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel")
        req = r.requests[0]
        got: list[bytes] = []
        ended: list[bool] = []
        req.set_body_consumer(got.append, lambda: ended.append(True), lambda s, m: None)
        h.send(b"lo")
        self.assertEqual(b"".join(got), b"hello")
        self.assertEqual(ended, [True])

    def test_queue_pauses_reading(self) -> None:
        """
        A body nobody consumes yet is queued; past 64 KiB reading pauses,
        and resumes once a consumer takes it.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"a" * 70000)
        self.assertEqual(h.transport.producerState, "paused")
        got: list[bytes] = []
        r.requests[0].set_body_consumer(got.append, lambda: None, lambda s, m: None)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(sum(map(len, got)), 70000)

    def test_body_producer_pauses_reading(self) -> None:
        """
        The request's body producer pauses and resumes reading from the
        client.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        p = r.requests[0].body_producer
        p.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        p.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")

    def test_expect_continue(self) -> None:
        """
        C{Expect: 100-continue} is answered when the body is about to be
        read, not before.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(h.output(), b"")
        r.requests[0].send_continue()
        self.assertEqual(h.output(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_expect_refused_closes(self) -> None:
        """
        Answering without reading an expected body closes the connection
        (the unread body cannot be told from the next request).
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        respond(r.requests[0], b"no", code=413)
        self.assertNotIn(b"100 Continue", h.output())
        self.assertIn(b"Connection: close", h.output())
        self.assertTrue(h.closed)

    def test_unconsumed_body_in_same_packet_keeps_alive(self) -> None:
        """
        A body already fully received does not prevent keep-alive.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertFalse(h.closed)
        h.send(GET)
        self.assertEqual(len(r.requests), 2)


class ConnectionTests(SynchronousTestCase):
    def test_client_lost(self) -> None:
        """
        When the client goes away mid-request the lost handler runs.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        lost: list[bool] = []
        r.requests[0].set_lost_handler(lambda: lost.append(True))
        h.channel.connectionLost()
        self.assertEqual(lost, [True])

    def test_idle_timeout(self) -> None:
        """
        An idle keep-alive connection is closed after the idle timeout.
        """
        h = Harness(Recorder(auto=True), idle_timeout=5, header_timeout=2)
        h.send(GET)
        h.reactor.advance(4)
        self.assertFalse(h.closed)
        h.reactor.advance(2)
        self.assertTrue(h.closed)

    def test_header_timeout(self) -> None:
        """
        A client that does not finish its headers in time gets a 408.
        """
        h = Harness(Recorder(auto=True), idle_timeout=50, header_timeout=2)
        h.send(b"GET / HTTP/1.1\r\nHost:")
        h.reactor.advance(3)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 408"))
        self.assertTrue(h.closed)

    def test_timeouts_after_keep_alive_requests(self) -> None:
        """
        After requests on a keep-alive connection, the idle timeout counts
        from the last response and the header timeout from the start of
        the next request's headers, whichever of the two was set first.
        """
        h = Harness(Recorder(auto=True), idle_timeout=50, header_timeout=20)
        for _ in range(3):
            h.reactor.advance(7)
            h.send(GET)
        h.reactor.advance(49.5)  # 70.5: the first timer's time, long passed
        self.assertFalse(h.closed)
        h.reactor.advance(1)
        self.assertTrue(h.closed)
        self.assertEqual(h.output().count(b"HTTP/1.1 200"), 3)
        h = Harness(Recorder(auto=True), idle_timeout=50, header_timeout=20)
        h.reactor.advance(15)
        h.send(GET)
        h.reactor.advance(40)
        h.send(b"GET / HTTP/1.1\r\nHost:")
        h.reactor.advance(19.5)
        self.assertFalse(h.closed)
        h.reactor.advance(1)
        self.assertTrue(h.output().endswith(b"</h1>"), h.output())
        self.assertIn(b"HTTP/1.1 408", h.output())
        self.assertTrue(h.closed)

    def test_timer_moves_only_sooner(self) -> None:
        """
        Setting the connection's timer for a later deadline does not move
        its DelayedCall (a request costs no timer update); a sooner one does.
        """
        h = Harness(Recorder(auto=True), idle_timeout=50, header_timeout=20)
        (call,) = h.reactor.getDelayedCalls()
        self.assertEqual(call.getTime(), 20)
        h.reactor.advance(5)
        h.send(GET)
        self.assertEqual(h.reactor.getDelayedCalls(), [call])
        self.assertEqual(call.getTime(), 20)
        h.channel.set_timer(1)
        self.assertEqual(call.getTime(), 6)
        h.reactor.advance(1)
        self.assertTrue(h.closed)

    def test_no_timeout_while_request_in_progress(self) -> None:
        """
        A slow response is not cut by the header or idle timeouts.
        """
        r = Recorder()
        h = Harness(r, idle_timeout=5, header_timeout=2)
        h.send(GET)
        h.reactor.advance(100)
        self.assertFalse(h.closed)
        respond(r.requests[0])
        self.assertFalse(h.closed)

    def test_upgrade_take_over(self) -> None:
        """
        After an upgrade request, bytes that follow go to the tunnel.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        req = r.requests[0]
        self.assertTrue(req.upgrade)
        got: list[bytes] = []
        req.start_response(101, None, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], None)
        req.tunnel_write(b"")
        req.take_over(got.append)
        self.assertEqual(got, [b"early"])
        h.send(b"more")
        self.assertEqual(got, [b"early", b"more"])
        self.assertTrue(h.output().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))

    def test_upgrade_bytes_before_take_over(self) -> None:
        """
        Bytes arriving in later packets while the target has not yet
        answered the upgrade are kept for the tunnel, not dropped.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        h.send(b"first ")
        h.send(b"second")
        req = r.requests[0]
        got: list[bytes] = []
        req.start_response(101, None, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], None)
        req.tunnel_write(b"")
        req.take_over(got.append)
        self.assertEqual(b"".join(got), b"first second")
        h.send(b"more")
        self.assertEqual(got[-1], b"more")

    def test_render_exception(self) -> None:
        """
        A resource that raises gives a 500, not a dead server.
        """

        class Broken(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                raise ZeroDivisionError()

        h = Harness(Broken())
        h.send(GET)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 500"))


class ShutdownTests(SynchronousTestCase):
    def test_shutdown(self) -> None:
        """
        Shutdown closes idle connections at once, busy ones after their
        response, and fires when all are gone.
        """
        r = Recorder()
        reactor = MemoryReactorClock()
        site = ProxySite(r, reactor)
        idle = site.buildProtocol(None)
        ti = StringTransport()
        idle.makeConnection(ti)
        busy = site.buildProtocol(None)
        tb = StringTransport()
        busy.makeConnection(tb)
        busy.dataReceived(GET)
        closed: list[bool] = []
        site.on_shutdown.append(lambda: closed.append(True))
        reactor.advance(IDLE_CLOSE_QUIET)
        d = site.shutdown(10)
        self.assertEqual(closed, [True])
        self.assertTrue(ti.disconnecting)
        idle.connectionLost()
        self.assertNoResult(d)
        self.assertFalse(tb.disconnecting)
        respond(r.requests[0])
        self.assertIn(b"Connection: close", tb.value())
        self.assertTrue(tb.disconnecting)
        busy.connectionLost()
        self.successResultOf(d)

    def test_shutdown_closes_a_just_used_connection_after_a_quiet_moment(self) -> None:
        """
        A keep-alive connection that answered a request just now may carry
        the client's next request already: shutdown closes it only once it
        has been idle for a moment, and a request arriving meanwhile is
        answered, with Connection: close.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        respond(r.requests[0])
        h.reactor.advance(IDLE_CLOSE_QUIET / 2)
        d = h.site.shutdown(10)
        self.assertFalse(h.closed)
        h.send(GET)
        h.reactor.advance(IDLE_CLOSE_QUIET)
        self.assertFalse(h.closed, "the request in progress is answered")
        h.transport.clear()
        respond(r.requests[1])
        self.assertIn(b"Connection: close", h.output())
        self.assertTrue(h.closed)
        h.channel.connectionLost()
        self.successResultOf(d)

    def test_shutdown_quiet_close(self) -> None:
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        respond(r.requests[0])
        h.reactor.advance(IDLE_CLOSE_QUIET / 4)
        h.site.shutdown(10)
        h.reactor.advance(IDLE_CLOSE_QUIET / 2)
        self.assertFalse(h.closed)
        h.reactor.advance(IDLE_CLOSE_QUIET / 4)
        self.assertTrue(h.closed)

    def test_shutdown_timeout_aborts(self) -> None:
        """
        Connections still busy at the deadline are aborted.
        """
        r = Recorder()
        reactor = MemoryReactorClock()
        site = ProxySite(r, reactor)
        busy = site.buildProtocol(None)
        tb = StringTransport()
        busy.makeConnection(tb)
        busy.dataReceived(GET)
        d = site.shutdown(10)
        reactor.advance(11)
        self.assertTrue(tb.disconnected)
        self.successResultOf(d)


class ChannelTypeTests(SynchronousTestCase):
    def test_plain_site_builds_fast_channel(self) -> None:
        """
        Plain HTTP listeners get the fast channel.
        """
        site = ProxySite(Recorder(), MemoryReactorClock())
        self.assertIsInstance(site.buildProtocol(None), FastHTTPChannel)


class PipelineDepthTests(SynchronousTestCase):
    def test_many_pipelined_sync_responses(self) -> None:
        """
        Hundreds of pipelined requests answered synchronously are served
        without recursing once per request.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        self.assertEqual(len(r.requests), 2000)
        self.assertEqual(h.output().count(b"HTTP/1.1 200 OK"), 2000)


class FuzzTests(SynchronousTestCase):
    def test_random_input_never_raises(self) -> None:
        """
        Mutated and random input, fed in random pieces, never raises out of
        the channel; whatever is answered is a complete status line.
        """
        import random

        rnd = random.Random(1234)
        seeds = [
            GET,
            b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        ]
        for i in range(400):
            data = bytearray(rnd.choice(seeds) * rnd.randint(1, 3))
            for _ in range(rnd.randint(0, 6)):
                op = rnd.random()
                pos = rnd.randrange(len(data))
                if op < 0.4:
                    data[pos] = rnd.randrange(256)
                elif op < 0.7:
                    del data[pos]
                else:
                    data.insert(pos, rnd.choice(b"\r\n:; \x00ab0"))
            if i % 10 == 0:
                data = bytearray(rnd.randbytes(rnd.randint(1, 300)))
            h = Harness(Recorder(auto=True))
            pos = 0
            while pos < len(data):
                n = rnd.randint(1, 40)
                h.send(bytes(data[pos:pos + n]))
                pos += n
            out = h.output()
            if out:
                self.assertTrue(out.startswith(b"HTTP/1.1 "), (bytes(data), out))


class NegotiatingTests(SynchronousTestCase):
    def test_close_before_any_byte(self) -> None:
        """
        At shutdown a TLS connection that has not chosen a protocol yet is
        closed at once.
        """
        site = ProxySite(Recorder(), MemoryReactorClock(), secure=True)
        p = site.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        self.assertTrue(p.is_idle())
        site.shutdown(10)
        self.assertTrue(t.disconnecting)

    def test_http11_over_tls_uses_fast_channel(self) -> None:
        """
        Without h2 negotiated, TLS connections use the fast channel.
        """
        r = Recorder(auto=True)
        site = ProxySite(r, MemoryReactorClock(), secure=True)
        p = site.buildProtocol(None)
        t = StringTransport()
        t.negotiatedProtocol = None  # type: ignore[attr-defined]
        p.makeConnection(t)
        p.dataReceived(GET)
        self.assertIsInstance(p._channel, FastHTTPChannel)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 OK"))


class FakeContractTests(SynchronousTestCase):
    def test_tcp_string_transport(self) -> None:
        """
        The TCP transport fake provides L{ITCPTransport}.
        """
        self.assertTrue(verifyObject(ITCPTransport, TCPStringTransport()))

    def test_channel_and_request(self) -> None:
        """
        The channel provides what its requests use of it, the request the
        exchange the proxy drives.
        """
        r = Recorder()
        h = Harness(r)
        h.send(GET)
        self.assertTrue(verifyObject(IRequestChannel, h.channel))
        self.assertTrue(verifyObject(ITunnelExchange, r.requests[0]))


class LingerTests(SynchronousTestCase):
    def test_early_response_lingers(self) -> None:
        """
        Answering before the request body was read half-closes the
        connection, discards what still arrives, and closes a little later.
        """

        r = Recorder()
        reactor = MemoryReactorClock()
        site = ProxySite(r, reactor)
        ch = site.buildProtocol(None)
        t = TCPStringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        respond(r.requests[0], b"too big", code=413)
        self.assertTrue(t.half_closed)
        self.assertFalse(t.disconnecting)
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(r.requests), 1)
        reactor.advance(2.1)
        self.assertTrue(t.disconnecting)

    def test_protocol_error_lingers(self) -> None:
        """
        A 431 for a header section still arriving half-closes too: what the
        client keeps sending is discarded instead of resetting the
        connection before it read the 431.
        """

        r = Recorder()
        reactor = MemoryReactorClock()
        site = ProxySite(r, reactor)
        ch = site.buildProtocol(None)
        t = TCPStringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(t.half_closed)
        self.assertFalse(t.disconnecting)
        ch.dataReceived(b"a" * 100_000 + b"\r\n\r\n")
        self.assertEqual(r.requests, [])
        reactor.advance(2.1)
        self.assertTrue(t.disconnecting)


class TraversalTests(SynchronousTestCase):
    def test_resource_tree(self) -> None:
        """
        With a non-leaf root, requests are traversed as by Twisted's own
        Request (prepath/postpath).
        """

        class Leaf(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"/".join(request.prepath) + b"|" + b"/".join(request.postpath)

        root = Resource()
        root.putChild(b"a", Leaf())
        h = Harness(root)
        h.send(b"GET /a/b%20c/d HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(h.output().endswith(b"a|b c/d\r\n0\r\n\r\n"), h.output())


class BodyTimeoutTests(SynchronousTestCase):
    def test_stalled_body(self) -> None:
        """
        A request body that stops arriving is reported as a 408 to its
        consumer; arriving bytes keep it alive.
        """
        r = Recorder()
        h = Harness(r, body_timeout=10, header_timeout=2)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        errors: list[int] = []
        r.requests[0].set_body_consumer(lambda d: None, lambda: None,
                                        lambda s, m: errors.append(s))
        h.reactor.advance(9)
        h.send(b"cd")
        h.reactor.advance(9)
        self.assertEqual(errors, [])
        h.reactor.advance(2)
        self.assertEqual(errors, [408])

    def test_paused_body_does_not_time_out(self) -> None:
        """
        While we are not reading (backpressure), the body cannot time out.
        """
        r = Recorder()
        h = Harness(r, body_timeout=10)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        errors: list[int] = []
        req = r.requests[0]
        req.set_body_consumer(lambda d: None, lambda: None, lambda s, m: errors.append(s))
        req.body_producer.pauseProducing()
        h.reactor.advance(100)
        self.assertEqual(errors, [])

    def test_complete_body_no_timeout(self) -> None:
        """
        A slow response to a complete request is not a body timeout.
        """
        r = Recorder()
        h = Harness(r, body_timeout=10)
        h.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        errors: list[int] = []
        r.requests[0].set_body_consumer(lambda d: None, lambda: None,
                                        lambda s, m: errors.append(s))
        h.reactor.advance(100)
        self.assertEqual(errors, [])


class FakeSocket:
    def __init__(self, take: int | None = None, error: Exception | None = None) -> None:
        self.sent: list[bytes] = []
        self.take = take
        self.error = error

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        n = len(data) if self.take is None else min(self.take, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    def sendmsg(self, buffers: Any) -> int:
        return self.send(b"".join(bytes(b) for b in buffers))


class FakeTCP:
    """
    Looks like a Twisted TCP transport to the batcher.
    """

    def __init__(self, sock: FakeSocket) -> None:
        self.socket = sock
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.connected = True
        self.disconnecting = False
        self._aborting = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._tempDataLen += len(data)


class BatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        from mproxy.http import batch

        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.clock = MemoryReactorClock()
        self.batcher = batch.WriteBatcher(self.clock)

    def test_coalesced_send_next_iteration(self) -> None:
        """
        Writes in one iteration reach the socket together, in order, in one
        send at the next iteration.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"ab")
        self.batcher.write(t, b"cd")
        self.assertEqual(t.socket.sent, [])
        self.clock.advance(0)
        self.assertEqual(t.socket.sent, [b"abcd"])
        self.assertEqual(t.written, [])

    def test_partial_send(self) -> None:
        """
        What the socket does not take is handed to Twisted.
        """
        t = FakeTCP(FakeSocket(take=3))
        self.batcher.write(t, b"abcdef")
        self.clock.advance(0)
        self.assertEqual(t.socket.sent, [b"abc"])
        self.assertEqual(t.written, [b"def"])

    def test_send_error(self) -> None:
        """
        A send error leaves the bytes to Twisted (which reports the loss).
        """
        t = FakeTCP(FakeSocket(error=BlockingIOError()))
        self.batcher.write(t, b"abc")
        self.clock.advance(0)
        self.assertEqual(t.written, [b"abc"])

    def test_busy_transport_not_batched(self) -> None:
        """
        A transport with bytes already buffered by Twisted is written to
        directly, keeping the order.
        """
        t = FakeTCP(FakeSocket())
        t._tempDataLen = 5
        self.batcher.write(t, b"abc")
        self.assertEqual(t.written, [b"abc"])

    def test_flush_transport(self) -> None:
        """
        flush_transport hands pending bytes to Twisted at once (before a
        close or a direct write).
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"abc")
        self.batcher.flush_transport(t)
        self.assertEqual(t.written, [b"abc"])
        self.clock.advance(0)
        self.assertEqual(t.socket.sent, [])

    def test_aborted_transport_dropped(self) -> None:
        """
        Pending bytes of a transport aborted meanwhile are dropped.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"abc")
        t._aborting = True
        self.clock.advance(0)
        self.assertEqual((t.socket.sent, t.written), ([], []))

    def test_other_transports_direct(self) -> None:
        """
        Transports that are not plain TCP (TLS, test transports) are written
        to at once.
        """
        t = StringTransport()
        self.batcher.write(t, b"abc")
        self.assertEqual(t.value(), b"abc")

    def test_close_flushes(self) -> None:
        """
        Closing a channel flushes what its responses left pending.
        """
        r = Recorder(auto=True)
        reactor = MemoryReactorClock()
        site = ProxySite(r, reactor)
        ch = site.buildProtocol(None)
        sock = FakeSocket()
        t = FakeTCP(sock)
        closed: list[bool] = []
        t.getPeer = lambda: None  # type: ignore[attr-defined]
        t.getHost = lambda: None  # type: ignore[attr-defined]
        t.loseConnection = lambda: closed.append(bool(t.written))  # type: ignore[attr-defined]
        ch.makeConnection(t)
        ch.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(closed, [True])
        self.assertTrue(t.written[0].startswith(b"HTTP/1.1 200 OK"))


class BatchLimitTests(SynchronousTestCase):
    def test_large_pending_goes_to_twisted(self) -> None:
        """
        Past 64 KiB pending, a transport's bytes go to Twisted at once (so
        its buffer limits and producer pausing apply).
        """
        from mproxy.http import batch

        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        b = batch.WriteBatcher(MemoryReactorClock())
        t = FakeTCP(FakeSocket())
        for _ in range(5):
            b.write(t, b"a" * 15000)
        self.assertEqual([len(w) for w in t.written], [75000])
        b.write(t, b"c")
        self.assertEqual([len(w) for w in t.written], [75000, 1])
        self.assertEqual(t.socket.sent, [])


class BatchSendNowTests(SynchronousTestCase):
    """
    A large piece goes to the socket at once, after what was pending.
    """

    def setUp(self) -> None:
        from mproxy.http import batch

        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.clock = MemoryReactorClock()
        self.batcher = batch.WriteBatcher(self.clock)
        self.big = bytes(range(256)) * 100

    def test_large_sent_at_once(self) -> None:
        """
        A piece of SEND_NOW bytes or more is sent in the same call, not at
        the next iteration.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, self.big)
        self.assertEqual(t.socket.sent, [self.big])
        self.assertEqual(t.written, [])
        self.clock.advance(0)
        self.assertEqual(t.socket.sent, [self.big])

    def test_pending_first(self) -> None:
        """
        Bytes pending for the transport (a response head) go first, in one
        send with the piece; nothing is left for the next iteration.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"head")
        self.batcher.write(t, self.big)
        self.assertEqual(t.socket.sent, [b"head" + self.big])
        self.clock.advance(0)
        self.assertEqual(t.socket.sent, [b"head" + self.big])
        self.assertEqual(t.written, [])

    def test_partial_in_pending(self) -> None:
        """
        A socket that takes only part of the pending bytes leaves the rest
        of them and the whole piece to Twisted, in order.
        """
        t = FakeTCP(FakeSocket(take=2))
        self.batcher.write(t, b"head")
        self.batcher.write(t, self.big)
        self.assertEqual(t.socket.sent, [b"he"])
        self.assertEqual(t.written, [b"ad" + self.big])

    def test_partial_in_piece(self) -> None:
        """
        A socket that takes part of the piece leaves its tail to Twisted.
        """
        t = FakeTCP(FakeSocket(take=1000))
        self.batcher.write(t, b"head")
        self.batcher.write(t, self.big)
        self.assertEqual(t.written, [self.big[996:]])
        t2 = FakeTCP(FakeSocket(take=1000))
        self.batcher.write(t2, self.big)
        self.assertEqual(t2.written, [self.big[1000:]])

    def test_send_error(self) -> None:
        """
        A send error leaves everything to Twisted.
        """
        t = FakeTCP(FakeSocket(error=BlockingIOError()))
        self.batcher.write(t, b"head")
        self.batcher.write(t, self.big)
        self.assertEqual(t.written, [b"head" + self.big])

    def test_busy_transport(self) -> None:
        """
        A transport with bytes buffered by Twisted gets the piece (after
        anything pending) through Twisted, in order.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"head")
        t._tempDataLen = 5
        self.batcher.write(t, self.big)
        self.assertEqual(t.socket.sent, [])
        self.assertEqual(t.written, [b"head" + self.big])

    def test_aborted(self) -> None:
        """
        Nothing is sent to a transport aborted meanwhile.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"head")
        t._aborting = True
        self.batcher.write(t, self.big)
        self.assertEqual((t.socket.sent, t.written), ([], []))

    def test_other_transports(self) -> None:
        """
        A transport that is not plain TCP (TLS, test transports) gets a
        large piece through its own write.
        """
        t = StringTransport()
        self.batcher.write(t, self.big)
        self.assertEqual(t.value(), self.big)


class NoDelayTests(SynchronousTestCase):
    def test_nodelay(self) -> None:
        """
        A client connection disables Nagle when it starts, once: neither a
        sized response nor a streamed one (unknown length) changes it.
        """
        t = TCPStringTransport()
        calls = t.nodelay_calls
        r = Recorder()
        site = ProxySite(r, MemoryReactorClock())
        ch = site.buildProtocol(None)
        ch.makeConnection(t)
        self.assertEqual(calls, [True])
        ch.dataReceived(GET)
        respond(r.requests[0], b"sized")
        ch.dataReceived(GET)
        r.requests[1].start_response(200, None, [(b"Content-Type", b"text/event-stream")], None)
        r.requests[1].write(b"data: 1\n\n")
        self.assertEqual(calls, [True])
        self.assertTrue(t.getTcpNoDelay())

    def test_not_tcp(self) -> None:
        """
        A transport that is not TCP (an in-memory one) is left alone.
        """
        t = StringTransport()
        site = ProxySite(Recorder(), MemoryReactorClock())
        ch = site.buildProtocol(None)
        ch.makeConnection(t)
        ch.dataReceived(GET)
        self.assertFalse(t.disconnecting)


class DroppedUpgradeTests(SynchronousTestCase):
    """
    Only a WebSocket handshake is an upgrade; any other offer is parsed
    and served as a normal request.
    """

    H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n"

    def body_of(self, req: FastRequest) -> list[Any]:
        got: list[Any] = []
        req.set_body_consumer(got.append, lambda: got.append("end"),
                              lambda s, m: got.append((s, m)))
        return got

    def test_h2c_without_body(self) -> None:
        """
        An h2c offer is not an upgrade: the request is served and the
        requests pipelined after it are parsed.
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send(b"GET /a HTTP/1.1\r\nHost: x\r\n" + self.H2C + b"\r\n"
               b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([(q.path, q.upgrade) for q in r.requests], [(b"/a", False), (b"/b", False)])
        self.assertEqual(h.output().count(b"HTTP/1.1 200 OK\r\n"), 2)
        self.assertFalse(h.closed)

    def test_h2c_with_body(self) -> None:
        """
        A request with a body and an h2c offer (C{curl --http2 -d}) is read
        with its body, whether it arrives with the head or later, and in
        either framing; the next request is parsed after it.
        """
        for framing, parts in (
                (b"Content-Length: 5\r\n", [b"hel", b"lo"]),
                (b"Transfer-Encoding: chunked\r\n", [b"5\r\nhel", b"lo\r\n0\r\n\r\n"])):
            r = Recorder()
            h = Harness(r)
            h.send(b"POST /a HTTP/1.1\r\nHost: x\r\n" + self.H2C + framing + b"\r\n" + parts[0])
            req = r.requests[0]
            self.assertFalse(req.upgrade)
            got = self.body_of(req)
            h.send(parts[1] + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(got, [b"hel", b"lo", "end"], framing)
            respond(req)
            self.assertEqual([q.path for q in r.requests], [b"/a", b"/b"])
            self.assertFalse(h.closed)

    def test_many_dropped_offers_in_one_packet(self) -> None:
        """
        Hundreds of pipelined h2c offers in one read are parsed in a loop
        (no recursion).
        """
        r = Recorder(auto=True)
        h = Harness(r)
        h.send((b"GET /a HTTP/1.1\r\nHost: x\r\n" + self.H2C + b"\r\n") * 1500)
        self.assertEqual(len(r.requests), 1500)

    def test_websocket_offer_is_upgrade(self) -> None:
        """
        The WebSocket offer on GET over HTTP/1.1 is the upgrade (the
        Upgrade value may list other protocols too).
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo, WebSocket\r\n\r\n")
        self.assertTrue(r.requests[0].upgrade)


class ReadSizeTests(SynchronousTestCase):
    def test_upload_reads_grow(self) -> None:
        """
        A request body arriving in reads that fill the read buffer makes
        the connection read twice as much at a time; small reads do not.
        """
        got: list[int] = []

        class Sink(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                def data(chunk: bytes) -> None:
                    got.append(len(chunk))

                def end() -> None:
                    request.start_response(200, None, [(b"Content-Length", b"0")], 0)
                    request.finish()

                request.set_body_consumer(data, end, lambda code, msg: None)
                return NOT_DONE_YET

        h = Harness(Sink())
        h.transport.bufferSize = 65536
        h.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
        self.assertEqual(h.transport.bufferSize, 65536)
        h.send(b"y" * 65536)
        self.assertEqual(h.transport.bufferSize, 131072)
        h.send(b"y" * (200000 - 65536))
        self.assertEqual(sum(got), 200000)
        self.assertIn(b"200", h.output())


class HeaderLinesTests(SynchronousTestCase):
    def test_lines(self) -> None:
        """
        Each header as C{name: value} and CRLF, in order (an empty value
        too); nothing for no headers.
        """
        self.assertEqual(header_lines([]), b"")
        self.assertEqual(header_lines([(b"A", b"1")]), b"A: 1\r\n")
        self.assertEqual(header_lines([(b"A", b"1"), (b"B", b""), (b"A", b"x y")]),
                         b"A: 1\r\nB: \r\nA: x y\r\n")


class _NoFeed:
    """
    A request parser that must not be fed.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test

    def feed_data(self, data: bytes) -> None:
        self.test.fail(f"parser fed {data!r}")


class WholeRequestTests(SynchronousTestCase):
    def test_whole_get_skips_parser(self) -> None:
        """
        A whole bodiless request in one read is read without the
        incremental parser, with the same request; the next one, split,
        goes through the parser.
        """
        r = Recorder()
        h = Harness(r)
        reader = h.channel.reader
        parser, reader.parser = reader.parser, _NoFeed(self)
        h.send(GET)
        self.assertEqual(len(r.requests), 1)
        req = r.requests[0]
        self.assertEqual((req.method, req.path, req.query, req.clientproto, req.keep_alive,
                          req.body_length),
                         (b"GET", b"/a", b"b=1", b"HTTP/1.1", True, 0))
        self.assertEqual(req.raw_headers, [(b"Host", b"example.com"), (b"User-Agent", b"t")])
        self.assertIsNone(reader.current)
        respond(req, b"hello")
        self.assertEqual(h.writes, [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
        reader.parser = parser
        h.send(GET[:10])
        h.send(GET[10:])
        self.assertEqual(len(r.requests), 2)
        self.assertEqual(r.requests[1].raw_headers, req.raw_headers)

    def test_whole_get_after_partial_head(self) -> None:
        """
        The rest of a request whose head began in an earlier read goes to
        the parser even when it looks like a whole request.
        """
        r = Recorder()
        h = Harness(r)
        h.send(b"GET /x HTTP/1.1\r\nX-A: 1\r\n")
        h.send(GET)
        self.assertEqual(len(r.requests), 0)
        self.assertTrue(h.closed or b"400" in h.output())
