"""
Tests for L{mproxy.http.upstream}: the client side of the proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.http.interfaces import IUpstreamExchange, IUpstreamPool, IUpstreamReceiver
from mproxy.http.upstream import CLOSED, NOT_CONNECTED, PoolRegistry, UpstreamPool


@implementer(IUpstreamReceiver)
class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def upstream_informational(self, status: int, headers: Any) -> None:
        self.events.append(("info", status, headers))

    def upstream_response(self, status: int, reason: bytes, headers: Any) -> None:
        self.events.append(("response", status, reason, headers))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def upstream_done(self, trailers: Any) -> None:
        self.events.append(("done", trailers))

    def upstream_failed(self, err: Any) -> None:
        self.events.append(("failed", err.status, err.message))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


class Harness:
    def __init__(self, **kw: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, "10.0.0.2", 3000, **kw)
        self.connected = 0

    def request(self, method: bytes = b"GET", target: bytes = b"/x", body_length: int = 0,
                timeout: float = 30.0) -> tuple[Any, Receiver]:
        r = Receiver()
        ex = self.pool.request(method, target, [(b"Host", b"example.com")], r,
                               body_length=body_length, timeout=timeout)
        return ex, r

    def connect(self) -> tuple[Any, StringTransport]:
        host, port, factory, timeout, bind = self.reactor.tcpClients[self.connected]
        self.connected += 1
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t


class RequestResponseTests(SynchronousTestCase):
    def test_simple_exchange(self) -> None:
        """
        The request head goes out as given; the response head, body and end
        reach the receiver; the connection goes back to the pool.
        """
        h = Harness()
        ex, r = h.request()
        self.assertEqual(h.reactor.tcpClients[0][:2], ("10.0.0.2", 3000))
        proto, t = h.connect()
        self.assertEqual(t.value(), b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        proto.dataReceived(OK)
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertEqual(r.events[0][1:3], (200, b"OK"))
        self.assertEqual(r.events[0][3], [(b"Content-Length", b"5"), (b"Content-Type", b"text/plain")])
        self.assertEqual(r.body(), b"hello")
        self.assertEqual(h.pool.idle_count, 1)
        self.assertFalse(t.disconnecting)

    def test_keep_alive_reuse(self) -> None:
        """
        A second request reuses the idle connection.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(OK)
        t.clear()
        ex, r = h.request(target=b"/y")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertTrue(t.value().startswith(b"GET /y HTTP/1.1"))
        proto.dataReceived(OK)
        self.assertEqual(r.body(), b"hello")

    def test_connection_close_not_reused(self) -> None:
        """
        A response with C{Connection: close} ends the connection.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.pool.idle_count, 0)

    def test_chunked_response_and_trailers(self) -> None:
        """
        Chunked bodies arrive de-chunked, piece by piece, with trailers.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.assertEqual(r.kinds(), ["response", "data"])
        proto.dataReceived(b"2\r\nde\r\n0\r\nX-Sum: 1\r\n\r\n")
        self.assertEqual(r.body(), b"abcde")
        self.assertEqual(r.events[-1], ("done", [(b"X-Sum", b"1")]))
        self.assertEqual(h.pool.idle_count, 1)

    def test_close_delimited(self) -> None:
        """
        A body without length ends when the target closes.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        proto.dataReceived(b" more")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(r.body(), b"some more")
        self.assertEqual(r.kinds()[-1], "done")

    def test_close_delimited_reset(self) -> None:
        """
        A body without length cut by a reset (not a clean close) is a
        failure: the client must not get it as complete.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(r.events[-1][:2], ("failed", 502))

    def test_truncated_body(self) -> None:
        """
        A connection lost before the declared length is a failure.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(r.events[-1][:2], ("failed", 502))

    def test_head_response(self) -> None:
        """
        A response to HEAD ends after its headers even with a
        Content-Length, and the connection is reusable.
        """
        h = Harness()
        ex, r = h.request(method=b"HEAD")
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "done"])
        self.assertEqual(h.pool.idle_count, 1)
        ex2, r2 = h.request()
        proto.dataReceived(OK)
        self.assertEqual(r2.body(), b"hello")

    def test_informational(self) -> None:
        """
        1xx responses (other than 101) are passed on before the final one.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + OK)
        self.assertEqual(r.kinds(), ["info", "response", "data", "done"])
        self.assertEqual(r.events[0][1], 103)
        self.assertEqual(r.events[0][2], [(b"Link", b"</s.css>; rel=preload")])

    def test_malformed_response(self) -> None:
        """
        A response that does not parse is a 502 and the connection is
        dropped.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 abc\r\n\r\n")
        self.assertEqual(r.events[-1][:2], ("failed", 502))
        self.assertTrue(t.disconnecting)

    def test_204_no_body(self) -> None:
        """
        204 completes without a body.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "done"])


class FailureTests(SynchronousTestCase):
    def test_connect_refused(self) -> None:
        """
        A failed connect is a 502.
        """
        h = Harness()
        ex, r = h.request()
        factory = h.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(r.events[0][:2], ("failed", 502))

    def test_connect_timeout(self) -> None:
        """
        A connect that times out is a 504; the connect timeout is the
        target timeout.
        """
        h = Harness()
        ex, r = h.request(timeout=7)
        self.assertEqual(h.reactor.tcpClients[0][3], 7)
        factory = h.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.assertEqual(r.events[0][:2], ("failed", 504))

    def test_header_timeout(self) -> None:
        """
        No response headers within the timeout after the request was sent:
        504 and the connection is aborted.
        """
        h = Harness()
        ex, r = h.request(timeout=5)
        proto, t = h.connect()
        h.reactor.advance(4.9)
        self.assertEqual(r.events, [])
        h.reactor.advance(0.2)
        self.assertEqual(r.events[0][:2], ("failed", 504))
        self.assertTrue(t.disconnected)

    def test_header_timeout_on_reused_connection(self) -> None:
        """
        On a re-used connection each request gets its own full timeout,
        counted from when it was sent (the connection's one timer is not
        moved for a later deadline, but fires only once that passed), and
        a shorter timeout applies at once.
        """
        h = Harness()
        ex, r = h.request(timeout=5)
        proto, t = h.connect()
        (timer,) = h.reactor.getDelayedCalls()
        h.reactor.advance(3)
        proto.dataReceived(OK)
        ex2, r2 = h.request(timeout=5)
        self.assertEqual(h.reactor.getDelayedCalls(), [timer])
        self.assertEqual(timer.getTime(), 5)
        h.reactor.advance(4.9)  # 7.9: the timer's time passed, not the deadline
        self.assertEqual(r2.events, [])
        h.reactor.advance(0.2)
        self.assertEqual(r2.events[0][:2], ("failed", 504))
        self.assertTrue(t.disconnected)
        h = Harness()
        ex, r = h.request(timeout=30)
        proto, t = h.connect()
        proto.dataReceived(OK)
        ex2, r2 = h.request(timeout=2)
        h.reactor.advance(2.1)
        self.assertEqual(r2.events[0][:2], ("failed", 504))

    def test_timeout_does_not_bound_body(self) -> None:
        """
        Once headers arrived, a slow body is not cut by the timeout.
        """
        h = Harness()
        ex, r = h.request(timeout=5)
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        h.reactor.advance(60)
        proto.dataReceived(b"cdefghij")
        self.assertEqual(r.kinds()[-1], "done")

    def test_timeout_starts_after_body(self) -> None:
        """
        The header wait starts only when the request body was sent.
        """
        h = Harness()
        ex, r = h.request(method=b"POST", body_length=3, timeout=5)
        proto, t = h.connect()
        h.reactor.advance(10)
        self.assertEqual(r.events, [])
        ex.write_body(b"abc")
        ex.end_body()
        h.reactor.advance(6)
        self.assertEqual(r.events[0][:2], ("failed", 504))

    def test_stale_connection_not_resent(self) -> None:
        """
        A GET on a re-used connection that the target closed before
        answering is not sent again by the pool: it fails as L{CLOSED} on a
        re-used connection, for the caller to decide.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(OK)
        ex, r = h.request(target=b"/again")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        errors: list[Any] = []
        r.upstream_failed = errors.append  # type: ignore[method-assign]
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual([(e.status, e.kind, e.reused) for e in errors], [(502, CLOSED, True)])
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_closed_on_fresh_connection(self) -> None:
        """
        A fresh connection closed before any response byte is L{CLOSED},
        not re-used.
        """
        h = Harness()
        ex, r = h.request()
        errors: list[Any] = []
        r.upstream_failed = errors.append  # type: ignore[method-assign]
        proto, t = h.connect()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual([(e.status, e.kind, e.reused) for e in errors], [(502, CLOSED, False)])

    def test_closed_after_response_bytes(self) -> None:
        """
        Once a byte of the response arrived (even an interim 100), a closed
        connection is an ordinary failure: nothing says it could be resent.
        """
        for partial in (b"HTTP/1.1 200 OK\r\nContent-", b"HTTP/1.1 100 Continue\r\n\r\n"):
            h = Harness()
            ex, r = h.request()
            errors: list[Any] = []
            r.upstream_failed = errors.append  # type: ignore[method-assign]
            proto, t = h.connect()
            proto.dataReceived(partial)
            proto.connectionLost(Failure(error.ConnectionLost()))
            self.assertEqual([(e.status, e.kind) for e in errors], [(502, "")])

    def test_connect_failure_kind(self) -> None:
        """
        A refused or timed-out connect is L{NOT_CONNECTED}.
        """
        for reason, status in ((error.ConnectionRefusedError(), 502),
                               (error.TimeoutError(), 504)):
            h = Harness()
            ex, r = h.request()
            errors: list[Any] = []
            r.upstream_failed = errors.append  # type: ignore[method-assign]
            host, port, factory, timeout, bind = h.reactor.tcpClients[0]
            factory.clientConnectionFailed(None, Failure(reason))
            self.assertEqual([(e.status, e.kind) for e in errors], [(status, NOT_CONNECTED)])

    def test_fresh_skips_idle(self) -> None:
        """
        C{fresh=True} dials a new connection even with an idle one.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(OK)
        self.assertEqual(h.pool.idle_count, 1)
        h.pool.request(b"GET", b"/f", [], Receiver(), fresh=True)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertEqual(h.pool.idle_count, 1)

    def test_replay_moves_unsent_body(self) -> None:
        """
        C{replay} takes the body queued by an exchange whose connect failed,
        its end too: the new connection gets head, body, nothing twice.
        """
        h = Harness()
        ex, r = h.request(method=b"POST", body_length=-1)
        ex.write_body(b"abc")
        ex.end_body()
        host, port, factory, timeout, bind = h.reactor.tcpClients[0]
        r.upstream_failed = lambda e: None  # type: ignore[method-assign]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        other = UpstreamPool(h.reactor, "10.0.0.3", 3000)
        r2 = Receiver()
        ex2 = other.request(b"POST", b"/x", [(b"Host", b"example.com")], r2, body_length=-1,
                            replay=ex)
        ex2.end_body()
        h.connected = 1
        proto, t = h.connect()
        sent = t.value()
        self.assertTrue(sent.startswith(b"POST /x HTTP/1.1\r\n"))
        self.assertTrue(sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))
        proto.dataReceived(OK)
        self.assertEqual(r2.body(), b"hello")

    def test_keep_alive_timeout_respected(self) -> None:
        """
        A connection whose target announced C{Keep-Alive: timeout=N} is not
        re-used once idle for N minus the margin (at least 0.5 s); it is
        closed and a new one dialled.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2, max=100\r\n"
                           b"Content-Length: 0\r\n\r\n")
        h.reactor.advance(1.4)
        h.request()
        self.assertEqual(len(h.reactor.tcpClients), 1)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.reactor.advance(1.6)
        h.request()
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertTrue(t.disconnecting)

    def test_keep_alive_too_short_not_pooled(self) -> None:
        """
        A keep-alive timeout shorter than the margin: the connection is not
        kept.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0.4\r\n"
                           b"Content-Length: 0\r\n\r\n")
        self.assertEqual(h.pool.idle_count, 0)
        self.assertTrue(t.disconnecting)

    def test_cancel(self) -> None:
        """
        Cancelling aborts the connection; the receiver hears nothing more.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        ex.cancel()
        self.assertTrue(t.disconnected)
        proto.dataReceived(OK)
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(r.events, [])
        self.assertEqual(h.pool.idle_count, 0)

    def test_cancel_while_connecting(self) -> None:
        """
        Cancelling before the connection is made stops the connect.
        """
        h = Harness()
        ex, r = h.request()
        connector = h.reactor.connectors[0]
        ex.cancel()
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(r.events, [])


class BodyTests(SynchronousTestCase):
    def test_length_body(self) -> None:
        """
        A body with a declared length is sent as is, also what was written
        before the connection was up.
        """
        h = Harness()
        ex, r = h.request(method=b"POST", body_length=6)
        ex.write_body(b"abc")
        proto, t = h.connect()
        ex.write_body(b"def")
        ex.end_body()
        self.assertTrue(t.value().endswith(b"\r\n\r\nabcdef"))

    def test_chunked_body(self) -> None:
        """
        A body of unknown length is sent chunked.
        """
        h = Harness()
        ex, r = h.request(method=b"POST", body_length=-1)
        proto, t = h.connect()
        ex.write_body(b"abc")
        ex.end_body()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", t.value())
        self.assertTrue(t.value().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))

    def test_body_backpressure(self) -> None:
        """
        The body producer is registered with the target's transport while
        the body is sent, and paused while the connect is pending and too
        much is queued.
        """

        class Producer:
            state = "producing"

            def pauseProducing(self) -> None:
                self.state = "paused"

            def resumeProducing(self) -> None:
                self.state = "producing"

            def stopProducing(self) -> None:
                self.state = "stopped"

        h = Harness()
        ex, r = h.request(method=b"POST", body_length=200000)
        p = Producer()
        ex.set_body_producer(p)
        ex.write_body(b"a" * 70000)
        self.assertEqual(p.state, "paused")
        proto, t = h.connect()
        self.assertEqual(p.state, "producing")
        self.assertIs(t.producer, p)
        ex.write_body(b"b" * 130000)
        ex.end_body()
        self.assertIsNone(t.producer)

    def test_response_backpressure(self) -> None:
        """
        The exchange pauses and resumes reading the response.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        ex.pauseProducing()
        self.assertEqual(t.producerState, "paused")
        ex.resumeProducing()
        self.assertEqual(t.producerState, "producing")

    def test_upgrade_tunnel(self) -> None:
        """
        After a 101, bytes flow both ways untouched until the target closes.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\n\r\nframe1")
        self.assertEqual(r.kinds(), ["response", "data"])
        self.assertEqual(r.events[1], ("data", b"frame1"))
        proto.dataReceived(b"frame2")
        t.clear()
        ex.write_raw(b"client-frame")
        self.assertEqual(t.value(), b"client-frame")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(h.pool.idle_count, 0)


class PoolTests(SynchronousTestCase):
    def test_close_idle(self) -> None:
        """
        close_idle() closes idle connections only.
        """
        h = Harness()
        h.request()
        p1, t1 = h.connect()
        h.request()
        p2, t2 = h.connect()
        p1.dataReceived(OK)
        h.pool.close_idle()
        self.assertTrue(t1.disconnecting)
        self.assertFalse(t2.disconnecting)
        self.assertEqual(h.pool.idle_count, 0)

    def test_close(self) -> None:
        """
        After close() busy connections are not kept once done.
        """
        h = Harness()
        h.request()
        p1, t1 = h.connect()
        h.pool.close()
        p1.dataReceived(OK)
        self.assertTrue(t1.disconnecting)
        self.assertEqual(h.pool.idle_count, 0)

    def test_max_idle(self) -> None:
        """
        At most C{max_idle} connections are kept.
        """
        h = Harness(max_idle=1)
        h.request()
        h.request()
        p1, t1 = h.connect()
        p2, t2 = h.connect()
        p1.dataReceived(OK)
        p2.dataReceived(OK)
        self.assertEqual(h.pool.idle_count, 1)
        self.assertTrue(t2.disconnecting)

    def test_old_idle_not_reused(self) -> None:
        """
        Connections idle for too long are closed instead of reused.
        """
        h = Harness(idle_reuse_limit=10)
        h.request()
        p1, t1 = h.connect()
        p1.dataReceived(OK)
        h.reactor.advance(11)
        h.request()
        self.assertTrue(t1.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_lost_idle_removed(self) -> None:
        """
        An idle connection closed by the target leaves the pool.
        """
        h = Harness()
        h.request()
        p1, t1 = h.connect()
        p1.dataReceived(OK)
        p1.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(h.pool.idle_count, 0)

    def test_registry(self) -> None:
        """
        The pool factory's registry closes idle connections of all pools.
        """
        reactor = MemoryReactorClock()
        registry = PoolRegistry(reactor)
        pool = registry("127.0.0.1", 80)
        self.assertEqual(pool.address, "127.0.0.1:80")
        r = Receiver()
        pool.request(b"GET", b"/", [], r)
        proto = reactor.tcpClients[0][2].buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(OK)
        registry.close_idle()
        self.assertTrue(t.disconnecting)


class LimitTests(SynchronousTestCase):
    def test_huge_response_headers(self) -> None:
        """
        A target sending more than 1 MiB of headers gets a 502, also when
        the header section never ends.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(40):
            proto.dataReceived(b"X-Big: " + b"a" * 65536)
        self.assertEqual(r.events[0][:2], ("failed", 502))
        self.assertTrue(t.disconnected)

    def test_many_large_headers(self) -> None:
        """
        Complete headers adding up to over 1 MiB: 502.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 600000 + b"\r\nX-B: "
                           + b"b" * 600000 + b"\r\n\r\n")
        self.assertEqual(r.events[0][:2], ("failed", 502))


class HeadKeepAliveTests(SynchronousTestCase):
    def test_head_http10_not_reused(self) -> None:
        """
        A HEAD answered by an HTTP/1.0 server without keep-alive does not
        go back to the pool.
        """
        h = Harness()
        ex, r = h.request(method=b"HEAD")
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "done"])
        self.assertEqual(h.pool.idle_count, 0)
        self.assertTrue(t.disconnecting)

    def test_head_connection_close(self) -> None:
        """
        C{Connection: close} on a HEAD response closes the connection.
        """
        h = Harness()
        ex, r = h.request(method=b"HEAD")
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n")
        self.assertEqual(h.pool.idle_count, 0)


class ContractTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        The pool and its exchanges provide their interfaces; so does the
        receiver fake.
        """
        h = Harness()
        ex, r = h.request()
        self.assertTrue(verifyObject(IUpstreamPool, h.pool))
        self.assertTrue(verifyObject(IUpstreamExchange, ex))
        self.assertTrue(verifyObject(IUpstreamReceiver, r))


class HardeningTests(SynchronousTestCase):
    def test_status_out_of_range(self) -> None:
        """
        A status code outside 100-599 is a broken response (502), and the
        connection is not reused.
        """
        for status in (b"000", b"042", b"600", b"999"):
            h = Harness()
            ex, r = h.request()
            proto, t = h.connect()
            proto.dataReceived(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(r.events, [
                ("failed", 502, f"invalid status code {int(status)} from target")])
            self.assertTrue(t.disconnecting)
            self.assertEqual(h.pool.idle_count, 0)

    def test_transfer_codings(self) -> None:
        """
        A chunked body's other codings are named before C{chunked}.
        """
        h = Harness()
        r = Receiver()
        h.pool.request(b"POST", b"/x", [(b"Host", b"h")], r, body_length=-1, codings=b"gzip")
        proto, t = h.connect()
        self.assertIn(b"\r\nTransfer-Encoding: gzip, chunked\r\n", t.value())


class ReadSizeTests(SynchronousTestCase):
    def test_large_body_reads_grow(self) -> None:
        """
        Body reads that fill the connection's read buffer make it read
        twice as much at a time (up to MAX_READ); the response still
        arrives whole.
        """
        from mproxy.http.reads import MAX_READ

        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        t.bufferSize = 65536
        size = 65536 * 8
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        self.assertEqual(t.bufferSize, 65536)
        sent = 0
        for n in (65536, 131072, 262144, 65536):
            proto.dataReceived(b"x" * n)
            sent += n
        self.assertEqual(t.bufferSize, MAX_READ)
        self.assertEqual(len(r.body()), sent)
        proto.dataReceived(b"x" * (size - sent))
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(len(r.body()), size)


    def test_head_with_body_read_grows(self) -> None:
        """
        A read that fills the buffer with a head and the start of its body
        grows the read size too, so that the next such response (head and
        64 KiB body) arrives in one read, not its last bytes in another.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        t.bufferSize = 65536
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n"
        proto.dataReceived(head + b"x" * (65536 - len(head)))
        self.assertEqual(t.bufferSize, 131072)
        proto.dataReceived(b"x" * len(head))
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(len(r.body()), 65536)
        self.assertEqual(t.bufferSize, 131072)

    def test_body_rest_read_whole(self) -> None:
        """
        The rest of a body a little larger than a read (by up to
        READ_TAIL bytes: a head's worth) is read in one read; after the
        body, reads are of the connection's size again.
        """
        from mproxy.http.reads import MAX_READ, READ_TAIL

        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        t.bufferSize = MAX_READ
        size = 2 * MAX_READ + 300
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        proto.dataReceived(b"x" * MAX_READ)
        self.assertEqual(t.bufferSize, MAX_READ + 300)
        proto.dataReceived(b"x" * (MAX_READ + 300))
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(len(r.body()), size)
        self.assertEqual(t.bufferSize, MAX_READ)
        # a rest more than READ_TAIL bytes beyond a read: reads as usual
        ex, r = h.request()
        size = 2 * MAX_READ + READ_TAIL + 1
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        proto.dataReceived(b"x" * MAX_READ)
        self.assertEqual(t.bufferSize, MAX_READ)
        proto.dataReceived(b"x" * MAX_READ)
        self.assertEqual(t.bufferSize, MAX_READ)
        proto.dataReceived(b"x" * (READ_TAIL + 1))
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(len(r.body()), size)

    def test_body_read_size(self) -> None:
        """
        L{body_read_size}: a rest up to READ_TAIL bytes beyond the read
        size is read whole; any other, at the read size.
        """
        from mproxy.http.reads import READ_TAIL, body_read_size

        self.assertEqual(body_read_size(65536, 100), 65536)
        self.assertEqual(body_read_size(65536, 65536), 65536)
        self.assertEqual(body_read_size(65536, 65537), 65537)
        self.assertEqual(body_read_size(65536, 65536 + READ_TAIL), 65536 + READ_TAIL)
        self.assertEqual(body_read_size(65536, 65537 + READ_TAIL), 65536)


class _NoFeed:
    """
    A parser that must not be fed.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test

    def feed_data(self, data: bytes) -> None:
        self.test.fail(f"parser fed {data!r}")


class WholeResponseTests(SynchronousTestCase):
    def test_whole_response_skips_parser(self) -> None:
        """
        A whole small response in one read is handled without the
        incremental parser, with the same events, and the connection is
        re-used (the parser is fine for the next, split response).
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        parser, proto.parser = proto.parser, _NoFeed(self)
        proto.dataReceived(OK)
        self.assertEqual(r.events, [
            ("response", 200, b"OK", [(b"Content-Length", b"5"), (b"Content-Type", b"text/plain")]),
            ("data", b"hello"), ("done", None)])
        self.assertEqual(h.pool.idle_count, 1)
        proto.parser = parser
        ex, r = h.request()
        proto.dataReceived(OK[:20])
        proto.dataReceived(OK[20:])
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertEqual(r.body(), b"hello")

    def test_whole_response_keep_alive_timeout(self) -> None:
        """
        A whole response's C{Keep-Alive: timeout=N} is heeded.
        """
        h = Harness()
        h.request()
        proto, t = h.connect()
        proto.parser = _NoFeed(self)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(proto.keep_alive, 2.0)

    def test_whole_response_failing_receiver(self) -> None:
        """
        A receiver failing on a whole response breaks the connection as
        it does from the parser's callbacks.
        """
        class Failing(Receiver):
            def upstream_data(self, data: bytes) -> None:
                raise RuntimeError("boom")

        h = Harness()
        r = Failing()
        h.pool.request(b"GET", b"/x", [(b"Host", b"h")], r)
        proto, t = h.connect()
        proto.parser = _NoFeed(self)
        proto.dataReceived(OK)
        self.assertEqual(r.events[-1], ("failed", 502, "error handling response: RuntimeError('boom')"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.pool.idle_count, 0)

    def test_malformed_whole_response(self) -> None:
        """
        A malformed response that arrives whole still goes to the parser
        and is a 502.
        """
        h = Harness()
        ex, r = h.request()
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nX : y\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(r.events[-1][:2], ("failed", 502))
        self.assertTrue(t.disconnecting)

    def test_head_response_not_whole(self) -> None:
        """
        A HEAD response's Content-Length announces no body: it is left to
        the parser.
        """
        h = Harness()
        ex, r = h.request(method=b"HEAD")
        proto, t = h.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "done"])
        self.assertEqual(h.pool.idle_count, 1)
