"""
Tests for the large-body paths: body pieces passed on without copies
(L{mproxy.http.upstream}'s Content-Length bodies, L{mproxy.http.batch}'s
L{WriteBatcher.write_pieces}, L{mproxy.http.request.FastRequest.write}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http import batch
from mproxy.http.batch import SEND_NOW, WriteBatcher
from mproxy.http.upstream import UpstreamPool

BIG = bytes(range(256)) * 100  # 25,600 bytes: over SEND_NOW


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.on_data: Any = None

    def upstream_informational(self, status: int, headers: Any) -> None:
        self.events.append(("info", status))

    def upstream_response(self, status: int, reason: bytes, headers: Any) -> None:
        self.events.append(("response", status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", data))
        if self.on_data is not None:
            self.on_data(data)

    def upstream_done(self, trailers: Any) -> None:
        self.events.append(("done", trailers))

    def upstream_failed(self, err: Any) -> None:
        self.events.append(("failed", err.status, err.message))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def pieces(self) -> list[bytes]:
        return [e[1] for e in self.events if e[0] == "data"]


class Upstream:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, "10.0.0.2", 3000)
        self.connected = 0

    def request(self, method: bytes = b"GET") -> tuple[Any, Receiver]:
        r = Receiver()
        ex = self.pool.request(method, b"/x", [(b"Host", b"example.com")], r)
        return ex, r

    def connect(self) -> tuple[Any, StringTransport]:
        factory = self.reactor.tcpClients[self.connected][2]
        self.connected += 1
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t


HEAD10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


class ContentLengthBodyTests(SynchronousTestCase):
    """
    After the head, the rest of a Content-Length body reaches the receiver
    as the pieces that arrived (the parser would copy each one).
    """

    def test_pieces_as_received(self) -> None:
        """
        Each later read of the body is passed on as the same object; the
        body ends at its length and the connection is kept.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10 + b"ab")
        second, third = bytearray(b"cdef"), b"ghij"
        second = bytes(second)
        proto.dataReceived(second)
        self.assertEqual(r.kinds(), ["response", "data", "data"])
        proto.dataReceived(third)
        self.assertEqual(r.kinds(), ["response", "data", "data", "data", "done"])
        self.assertEqual(b"".join(r.pieces()), b"abcdefghij")
        self.assertIs(r.pieces()[1], second)
        self.assertIs(r.pieces()[2], third)
        self.assertEqual(u.pool.idle_count, 1)
        self.assertFalse(t.disconnecting)

    def test_next_response_parsed(self) -> None:
        """
        The connection's next response, after a body that bypassed the
        parser, is parsed as usual (chunked this time).
        """
        u = Upstream()
        u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10)
        proto.dataReceived(b"0123456789")
        ex, r = u.request()
        self.assertEqual(u.connected, 1)
        proto.dataReceived(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(r.events, [("response", 201), ("data", b"abc"), ("done", None)])
        self.assertEqual(u.pool.idle_count, 1)

    def test_head_and_body_in_one_read(self) -> None:
        """
        A whole response in one read goes through the parser alone.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10 + b"0123456789")
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        ex2, r2 = u.request()
        proto.dataReceived(HEAD10 + b"abcde")
        proto.dataReceived(b"fghij")
        self.assertEqual(b"".join(r2.pieces()), b"abcdefghij")
        self.assertEqual(r2.kinds()[-1], "done")

    def test_connection_close(self) -> None:
        """
        C{Connection: close} on a response whose body bypassed the parser
        still ends the connection after it.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
        proto.dataReceived(b"abcd")
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(u.pool.idle_count, 0)

    def test_http10_not_kept(self) -> None:
        """
        An HTTP/1.0 response without keep-alive is not re-used.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n")
        proto.dataReceived(b"abcd")
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertTrue(t.disconnecting)

    def test_bytes_after_the_body(self) -> None:
        """
        The body ends at its length; bytes after it (nothing was asked)
        abort the connection instead of being taken for a response.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10)
        proto.dataReceived(b"0123456789HTTP/1.1 200 OK\r\n")
        self.assertEqual(r.events[1:], [("data", b"0123456789"), ("done", None)])
        self.assertTrue(t.disconnecting)

    def test_cancel_from_the_receiver(self) -> None:
        """
        A receiver that cancels the exchange on a piece hears nothing
        more; what still arrives aborts the connection.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10 + b"ab")
        r.on_data = lambda data: ex.cancel()
        proto.dataReceived(b"cdefghij")
        self.assertEqual(r.kinds(), ["response", "data", "data"])
        proto.dataReceived(b"more")
        self.assertEqual(r.kinds(), ["response", "data", "data"])
        self.assertEqual(u.pool.idle_count, 0)

    def test_failing_receiver(self) -> None:
        """
        A receiver that raises on a piece fails the exchange (502) and
        aborts the connection, as for a piece the parser delivered.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10 + b"ab")

        def boom(data: bytes) -> None:
            raise ValueError("boom")

        r.on_data = boom
        proto.dataReceived(b"cd")
        self.assertEqual(r.events[-1][:2], ("failed", 502))
        self.assertIn("boom", r.events[-1][2])
        self.assertTrue(t.disconnecting)

    def test_lost_mid_body(self) -> None:
        """
        A connection lost in the middle of such a body fails the exchange.
        """
        u = Upstream()
        ex, r = u.request()
        proto, t = u.connect()
        proto.dataReceived(HEAD10 + b"ab")
        proto.dataReceived(b"cd")
        proto.connectionLost()
        self.assertEqual(r.events[-1][:2], ("failed", 502))

    def test_head_request(self) -> None:
        """
        A HEAD response's Content-Length announces no body: the next
        response on the connection is parsed.
        """
        u = Upstream()
        ex, r = u.request(b"HEAD")
        proto, t = u.connect()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "done"])
        ex2, r2 = u.request()
        proto.dataReceived(HEAD10 + b"01234")
        proto.dataReceived(b"56789")
        self.assertEqual(b"".join(r2.pieces()), b"0123456789")
        self.assertEqual(r2.kinds()[-1], "done")


BODY = bytes(range(256)) * 300  # 76,800 bytes: more than one whole read takes


def head(length: int, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (length, extra)


class ViewReceiver(Receiver):
    takes_views = True


class BodyWithHeadTests(SynchronousTestCase):
    """
    The part of a Content-Length body that arrives in the same read as its
    head bypasses the parser too: a receiver that takes views gets it as a
    memoryview of the read (not copied), others as bytes.
    """

    def _exchange(self, receiver: Receiver, method: bytes = b"GET") -> tuple[Any, Any, Any]:
        u = Upstream()
        ex = u.pool.request(method, b"/x", [(b"Host", b"example.com")], receiver)
        proto, t = u.connect()
        return u, proto, t

    def test_not_copied(self) -> None:
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        data = head(len(BODY) + 4) + BODY
        proto.dataReceived(data)
        self.assertEqual(r.kinds(), ["response", "data"])
        (piece,) = r.pieces()
        self.assertIs(type(piece), memoryview)
        self.assertIs(piece.obj, data)
        self.assertEqual(piece, BODY)
        last = bytes(bytearray(b"1234"))
        proto.dataReceived(last)
        self.assertIs(r.pieces()[1], last)
        self.assertEqual(r.kinds()[-1], "done")
        self.assertEqual(u.pool.idle_count, 1)
        # the next response on the connection is parsed as usual
        ex2, r2 = u.request()
        proto.dataReceived(head(3) + b"abc")
        self.assertEqual(r2.events, [("response", 200), ("data", b"abc"), ("done", None)])

    def test_head_without_the_parser(self) -> None:
        """
        A plain keep-alive head (as a whole small response would be) is
        parsed at once, without the parser; many such responses follow
        each other on one connection.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r)

        class Unfed:
            def feed_data(self, data: Any) -> None:
                raise AssertionError("fed")

            def should_keep_alive(self) -> bool:
                raise AssertionError("asked")

        proto.parser = Unfed()
        data = head(len(BODY), b"Keep-Alive: timeout=30\r\n") + BODY
        proto.dataReceived(data)
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertIs(r.pieces()[0].obj, data)
        self.assertEqual(proto.keep_alive, 30.0)
        self.assertEqual(u.pool.idle_count, 1)
        for i in range(50):
            ex, r = u.request()
            proto.dataReceived(head(len(BODY) + 1) + BODY)
            proto.dataReceived(b"!")
            self.assertEqual(r.kinds(), ["response", "data", "data", "done"], i)
        self.assertEqual(u.connected, 1)

    def test_bytes_for_other_receivers(self) -> None:
        r = Receiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(head(len(BODY)) + BODY)
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertIs(type(r.pieces()[0]), bytes)
        self.assertEqual(r.pieces()[0], BODY)
        self.assertEqual(u.pool.idle_count, 1)

    def test_connection_close(self) -> None:
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(head(len(BODY), b"Connection: close\r\n") + BODY)
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(u.pool.idle_count, 0)

    def test_bytes_after_the_body(self) -> None:
        """
        Bytes after the body in the same read (nothing asked for them)
        abort the connection; the body is complete.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(head(len(BODY)) + BODY + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertEqual(r.pieces()[0], BODY)
        self.assertTrue(t.disconnecting)

    def test_chunked_through_the_parser(self) -> None:
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n")
        self.assertEqual(r.kinds(), ["response", "data", "done"])
        self.assertEqual(r.pieces()[0], BODY)
        self.assertIs(type(r.pieces()[0]), bytes)

    def test_informational_first(self) -> None:
        """
        A 1xx head (even one with a Content-Length) before the response in
        the same read: the response after it is read as usual.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 7\r\n\r\n"
                           + head(len(BODY)) + BODY)
        self.assertEqual(r.kinds(), ["info", "response", "data", "done"])
        self.assertEqual(b"".join(r.pieces()), BODY)

    def test_switching_protocols(self) -> None:
        """
        After a 101 (with a Content-Length, which it does not frame), the
        rest of the read goes into the tunnel, once.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nContent-Length: 5\r\n\r\n" + BODY)
        self.assertEqual(r.kinds(), ["response", "data"])
        self.assertEqual(r.pieces(), [BODY])
        proto.dataReceived(b"more")
        self.assertEqual(r.pieces(), [BODY, b"more"])

    def test_cancelled_on_the_head(self) -> None:
        """
        A receiver that cancels the exchange on the head hears nothing
        more.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        ex = proto.exchange

        class Cancelling(ViewReceiver):
            def upstream_response(self, status: int, reason: bytes, headers: Any) -> None:
                super().upstream_response(status, reason, headers)
                ex.cancel()

        ex.receiver = c = Cancelling()
        proto.dataReceived(head(len(BODY) + 10) + BODY)
        self.assertEqual(c.kinds(), ["response"])
        self.assertTrue(t.disconnecting)

    def test_failing_receiver(self) -> None:
        r = ViewReceiver()
        u, proto, t = self._exchange(r)

        def boom(data: bytes) -> None:
            raise ValueError("boom")

        r.on_data = boom
        proto.dataReceived(head(len(BODY) + 10) + BODY)
        self.assertEqual(r.events[-1][:2], ("failed", 502))
        self.assertIn("boom", r.events[-1][2])
        self.assertTrue(t.disconnecting)

    def test_malformed_head(self) -> None:
        r = ViewReceiver()
        u, proto, t = self._exchange(r)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n" + BODY)
        self.assertEqual(r.events[-1][:2], ("failed", 502))
        self.assertTrue(t.disconnecting)

    def test_head_request(self) -> None:
        """
        A HEAD response is never split: its Content-Length frames nothing.
        """
        r = ViewReceiver()
        u, proto, t = self._exchange(r, b"HEAD")
        proto.dataReceived(head(len(BODY)))
        self.assertEqual(r.kinds(), ["response", "done"])
        self.assertEqual(u.pool.idle_count, 1)


class ChunkedUploadTests(SynchronousTestCase):
    def test_large_chunk_with_framing(self) -> None:
        """
        A large piece of a request body sent chunked goes to the target
        with its size line and CRLF as separate pieces (the piece itself
        not copied); small ones are framed as before.
        """
        u = Upstream()
        seqs: list[list[bytes]] = []
        r = Receiver()
        ex = u.pool.request(b"POST", b"/up", [(b"Host", b"x")], r, body_length=-1)
        proto, t = u.connect()
        t.writeSequence = lambda seq: seqs.append(list(seq))  # type: ignore[method-assign]
        ex.write_body(BIG)
        self.assertEqual(seqs, [[b"%x\r\n" % len(BIG), BIG, b"\r\n"]])
        self.assertIs(seqs[0][1], BIG)
        ex.write_body(b"abc")
        ex.end_body()
        self.assertTrue(t.value().endswith(b"3\r\nabc\r\n0\r\n\r\n"))


class FakeSocket:
    def __init__(self, take: int | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []
        self.take = take
        self.error = error

    def _take(self, n: int) -> int:
        if self.error is not None:
            raise self.error
        return n if self.take is None else min(self.take, n)

    def send(self, data: bytes) -> int:
        self.calls.append(("send", [data]))
        return self._take(len(data))

    def sendmsg(self, buffers: Any) -> int:
        buffers = list(buffers)
        self.calls.append(("sendmsg", buffers))
        return self._take(sum(len(b) for b in buffers))


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

    def writeSequence(self, data: Any) -> None:
        for piece in data:
            self.write(piece)


class WritePiecesTests(SynchronousTestCase):
    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.clock = MemoryReactorClock()
        self.batcher = WriteBatcher(self.clock)

    def test_one_sendmsg(self) -> None:
        """
        The pieces go to the socket at once, after what was pending, in
        one sendmsg of the pieces themselves (not joined).
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"pending")
        self.batcher.write_pieces(t, (b"head", BIG, b"\r\n"))
        ((kind, buffers),) = t.socket.calls
        self.assertEqual(kind, "sendmsg")
        self.assertEqual(buffers, [b"pending", b"head", BIG, b"\r\n"])
        self.assertIs(buffers[2], BIG)
        self.clock.advance(0)
        self.assertEqual(len(t.socket.calls), 1)
        self.assertEqual(t.written, [])

    def test_partial(self) -> None:
        """
        What the socket did not take goes to Twisted in order: the rest
        of the piece it stopped in, then the whole pieces after it.
        """
        t = FakeTCP(FakeSocket(take=10))
        self.batcher.write_pieces(t, (b"head", BIG, b"\r\n"))
        self.assertEqual(t.written, [BIG[6:], b"\r\n"])
        t2 = FakeTCP(FakeSocket(take=4))
        self.batcher.write_pieces(t2, (b"head", BIG))
        self.assertEqual(t2.written, [BIG])
        self.assertIs(t2.written[0], BIG)

    def test_error(self) -> None:
        """
        A send error leaves every piece to Twisted.
        """
        t = FakeTCP(FakeSocket(error=BlockingIOError()))
        self.batcher.write(t, b"p")
        self.batcher.write_pieces(t, (b"head", BIG))
        self.assertEqual(t.written, [b"p", b"head", BIG])

    def test_busy_transport(self) -> None:
        """
        A transport with bytes buffered by Twisted gets what was pending,
        then the pieces, through Twisted.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"p")
        t._tempDataLen = 5
        self.batcher.write_pieces(t, (b"head", BIG))
        self.assertEqual(t.socket.calls, [])
        self.assertEqual(t.written, [b"p", b"head", BIG])

    def test_aborted(self) -> None:
        """
        Nothing goes to a transport aborted meanwhile.
        """
        t = FakeTCP(FakeSocket())
        self.batcher.write(t, b"p")
        t._aborting = True
        self.batcher.write_pieces(t, (b"head", BIG))
        self.assertEqual((t.socket.calls, t.written), ([], []))

    def test_other_transports(self) -> None:
        """
        Other transports (TLS, test transports) get the pieces through
        their writeSequence.
        """
        seqs: list[list[bytes]] = []
        t = StringTransport()
        t.writeSequence = lambda seq: seqs.append(list(seq))  # type: ignore[method-assign]
        self.batcher.write_pieces(t, (b"head", BIG))
        self.assertEqual(seqs, [[b"head", BIG]])


class ViewPieceTests(SynchronousTestCase):
    """
    Memoryview pieces (a body that arrived with its head) go to the socket
    as they are; what of them goes to Twisted, which takes only bytes, is
    copied.
    """

    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.clock = MemoryReactorClock()
        self.batcher = WriteBatcher(self.clock)
        self.view = memoryview(b"head" + BIG)[4:]

    def test_sent_as_they_are(self) -> None:
        t = FakeTCP(FakeSocket())
        self.batcher.write_pieces(t, (b"head", self.view))
        self.assertIs(t.socket.calls[0][1][1], self.view)
        self.batcher.write(t, self.view)
        self.assertIs(t.socket.calls[1][1][0], self.view)
        self.assertEqual(t.written, [])

    def test_partial(self) -> None:
        t = FakeTCP(FakeSocket(take=10))
        self.batcher.write_pieces(t, (b"head", self.view, b"\r\n"))
        self.assertEqual(t.written, [BIG[6:], b"\r\n"])
        self.assertEqual([type(p) for p in t.written], [bytes, bytes])
        t2 = FakeTCP(FakeSocket(take=4))
        self.batcher.write_pieces(t2, (b"head", self.view))
        self.assertEqual(t2.written, [BIG])
        self.assertIs(type(t2.written[0]), bytes)
        t3 = FakeTCP(FakeSocket(take=10))
        self.batcher.write(t3, self.view)
        self.assertEqual(t3.written, [BIG[10:]])
        self.assertIs(type(t3.written[0]), bytes)
        t4 = FakeTCP(FakeSocket(error=BlockingIOError()))
        self.batcher.write(t4, self.view)
        self.assertEqual(t4.written, [BIG])
        self.assertIs(type(t4.written[0]), bytes)

    def test_busy_and_other_transports(self) -> None:
        t = FakeTCP(FakeSocket())
        t._tempDataLen = 5
        self.batcher.write_pieces(t, (b"head", self.view))
        self.batcher.write(t, self.view)
        self.assertEqual(t.written, [b"head", BIG, BIG])
        self.assertEqual([type(p) for p in t.written], [bytes, bytes, bytes])
        s = StringTransport()
        self.batcher.write_pieces(s, (b"head", self.view))
        self.batcher.write(s, self.view)
        self.assertEqual(s.value(), b"head" + BIG + BIG)


    def test_transport_taking_views(self) -> None:
        """
        A transport that is not plain TCP but takes memoryviews (the TLS
        connection) gets the pieces as they are, not copied.
        """
        seqs: list[list[Any]] = []
        t = StringTransport()
        t.takes_views = True  # type: ignore[attr-defined]
        t.writeSequence = lambda seq: seqs.append(list(seq))  # type: ignore[method-assign]
        self.batcher.write_pieces(t, (b"head", self.view))
        self.assertEqual(len(seqs), 1)
        self.assertIs(seqs[0][1], self.view)

    def test_tls_transport_takes_views(self) -> None:
        """
        The TLS connection says it takes them.
        """
        from mproxy.tls.fasttls import FastTLSProtocol

        self.assertTrue(FastTLSProtocol.takes_views)


class RelayViewsTests(SynchronousTestCase):
    def test_http11_only(self) -> None:
        """
        The relay takes memoryview pieces for HTTP/1.1 clients only.
        """
        from types import SimpleNamespace

        from mproxy.http.h2exchange import H2Request
        from mproxy.http.relay import Relay
        from mproxy.http.request import FastRequest

        relay = Relay(SimpleNamespace(rq=FastRequest.__new__(FastRequest)))  # type: ignore[arg-type]
        self.assertTrue(relay.takes_views)
        relay = Relay(SimpleNamespace(rq=H2Request.__new__(H2Request)))  # type: ignore[arg-type]
        self.assertFalse(relay.takes_views)


class ResponseWriteTests(SynchronousTestCase):
    """
    L{FastRequest.write} of a large chunk: the head and the chunk's
    framing go with it in one sendmsg, the chunk not copied.
    """

    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)

    def _request(self, method: bytes = b"GET") -> tuple[Any, FakeTCP]:
        from twisted.web.resource import Resource

        from mproxy.http.server import ProxySite

        site = ProxySite(Resource(), MemoryReactorClock())
        ch = site.buildProtocol(None)
        t = FakeTCP(FakeSocket())
        t.getPeer = lambda: None  # type: ignore[attr-defined]
        t.getHost = lambda: None  # type: ignore[attr-defined]
        ch.makeConnection(t)
        req = ch.requestFactory(ch, method, b"/", b"HTTP/1.1", [(b"Host", b"x")])
        ch._requests.append(req)
        return req, t

    def test_head_and_chunk(self) -> None:
        req, t = self._request()
        req.start_response(200, None, [(b"Content-Length", b"%d" % (2 * len(BIG)))],
                           2 * len(BIG))
        req.write(BIG)
        ((kind, buffers),) = t.socket.calls
        self.assertEqual(kind, "sendmsg")
        self.assertTrue(buffers[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(buffers[0].endswith(b"\r\n\r\n"))
        self.assertIs(buffers[1], BIG)
        req.write(BIG)
        self.assertIs(t.socket.calls[1][1][-1], BIG)
        self.assertEqual(req.sentLength, 2 * len(BIG))

    def test_chunked(self) -> None:
        """
        A response of unknown length: each large chunk goes with its size
        line and CRLF, the chunk itself not copied; the body ends as usual.
        """
        req, t = self._request()
        req.start_response(200, None, [], None)
        req.write(BIG)
        buffers = t.socket.calls[0][1]
        self.assertIn(b"Transfer-Encoding: chunked", buffers[0])
        self.assertEqual(buffers[1:], [b"%x\r\n" % len(BIG), BIG, b"\r\n"])
        self.assertIs(buffers[2], BIG)
        req.write(BIG)
        self.assertEqual(t.socket.calls[1][1], [b"%x\r\n" % len(BIG), BIG, b"\r\n"])

    def test_small_chunks_batched(self) -> None:
        """
        Small chunks are still batched for the next iteration.
        """
        req, t = self._request()
        req.start_response(200, None, [(b"Content-Length", b"3")], 3)
        req.write(b"abc")
        self.assertEqual(t.socket.calls, [])
        self.assertLess(3, SEND_NOW)

    def test_head_request(self) -> None:
        """
        A HEAD response sends its head only, however much is written.
        """
        req, t = self._request(b"HEAD")
        req.start_response(200, None, [(b"Content-Length", b"%d" % len(BIG))], len(BIG))
        req.write(BIG)
        req.channel.batcher.flush()
        sent = b"".join(b"".join(bufs) for _, bufs in t.socket.calls)
        self.assertTrue(sent.endswith(b"\r\n\r\n"), sent[-20:])
        self.assertNotIn(BIG[:100], sent)


class _Recorder:
    """
    A leaf resource that remembers its requests and streams their bodies
    into C{bodies} (answering once a body ends).
    """

    isLeaf = True

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.pieces: list[list[bytes]] = []
        self.errors: list[int] = []

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        self.requests.append(request)
        pieces: list[bytes] = []
        self.pieces.append(pieces)

        def end() -> None:
            body = b"%d" % sum(map(len, pieces))
            request.start_response(200, None, [(b"Content-Length", b"%d" % len(body))],
                                   len(body))
            request.write(body)
            request.finish()

        def data(piece: bytes) -> None:
            if piece == b"boom":
                raise ValueError("boom")
            pieces.append(piece)

        request.set_body_consumer(data, end, lambda status, message: self.errors.append(status))
        if not request.body_length:
            end()
        return NOT_DONE_YET


class Client:
    def __init__(self) -> None:
        from mproxy.http.server import ProxySite

        self.reactor = MemoryReactorClock()
        self.resource = _Recorder()
        self.site = ProxySite(self.resource, self.reactor)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()


POST10 = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


class RequestBodyTests(SynchronousTestCase):
    """
    After the head, the rest of a Content-Length request body reaches the
    consumer as the pieces that arrived (the parser would copy each one).
    """

    def test_pieces_as_received(self) -> None:
        c = Client()
        c.send(POST10 + b"ab")
        second, third = bytes(bytearray(b"cdef")), bytes(bytearray(b"ghij"))
        c.send(second)
        c.send(third)
        (pieces,) = c.resource.pieces
        self.assertEqual(pieces, [b"ab", b"cdef", b"ghij"])
        self.assertIs(pieces[1], second)
        self.assertIs(pieces[2], third)
        self.assertTrue(c.output().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(c.output().endswith(b"\r\n\r\n10"))
        self.assertFalse(c.transport.disconnecting)

    def test_transport_told_body_left(self) -> None:
        """
        A transport with C{fit_reads} is told, after each piece that
        bypasses the parser, how many bytes of the Content-Length body are
        still to come (0 once it is complete); not for a chunked body,
        whose length is not known.
        """
        told: list[int] = []

        class Fitting(StringTransport):
            def fit_reads(self, left: int) -> None:
                told.append(left)

        from mproxy.http.server import ProxySite

        site = ProxySite(_Recorder(), MemoryReactorClock())
        ch = site.buildProtocol(None)
        t = Fitting()
        ch.makeConnection(t)
        ch.dataReceived(POST10 + b"ab")
        ch.dataReceived(b"cdef")
        ch.dataReceived(b"ghij")
        self.assertEqual(told, [4, 0])
        ch.dataReceived(b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(told, [4, 0])
        self.assertEqual(t.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_following_requests_parsed(self) -> None:
        """
        Requests after such a body, in the same read as its end or later,
        are parsed as usual.
        """
        c = Client()
        c.send(POST10)
        c.send(b"01234")
        c.send(b"56789" + b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
        c.send(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([r.path for r in c.resource.requests], [b"/up", b"/two", b"/three"])
        self.assertEqual(c.resource.pieces[:2], [[b"01234", b"56789"], [b"abc"]])
        self.assertEqual(c.output().count(b"HTTP/1.1 200 OK"), 3)

    def test_queued_until_consumed(self) -> None:
        """
        Pieces that arrive before the body has a consumer are queued and
        delivered to it in order.
        """
        from mproxy.http.server import ProxySite

        got: list[bytes] = []

        class Later:
            isLeaf = True
            request: Any = None

            def render(self, request: Any) -> Any:
                from twisted.web.server import NOT_DONE_YET

                self.request = request
                return NOT_DONE_YET

        res = Later()
        site = ProxySite(res, MemoryReactorClock())
        ch = site.buildProtocol(None)
        ch.makeConnection(StringTransport())
        ch.dataReceived(POST10 + b"a")
        ch.dataReceived(b"bcd")
        ended: list[bool] = []
        res.request.set_body_consumer(got.append, lambda: ended.append(True),
                                      lambda s, m: None)
        ch.dataReceived(b"efghij")
        self.assertEqual(got, [b"a", b"bcd", b"efghij"])
        self.assertEqual(ended, [True])

    def _pausing(self, resource: Any) -> tuple[Any, list[str]]:
        from mproxy.http.server import ProxySite

        calls: list[str] = []

        class Recording(StringTransport):
            def pauseProducing(self) -> None:
                calls.append("pause")
                super().pauseProducing()

            def resumeProducing(self) -> None:
                calls.append("resume")
                super().resumeProducing()

        ch = ProxySite(resource, MemoryReactorClock()).buildProtocol(None)
        ch.makeConnection(Recording())
        return ch, calls

    def test_queue_taken_in_the_same_read(self) -> None:
        """
        A large body piece that arrives with its head is queued until the
        request is dispatched at the end of the read; a consumer set then
        takes it at once, and reading is not paused for it.
        """
        from mproxy.http.request import MAX_QUEUED_BODY

        res = _Recorder()
        ch, calls = self._pausing(res)
        n = MAX_QUEUED_BODY * 2
        ch.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
                        + b"q" * n)
        self.assertEqual(b"".join(res.pieces[0]), b"q" * n)
        self.assertEqual(calls, [])
        self.assertEqual(ch._paused, set())

    def test_queue_left_pauses_reading(self) -> None:
        """
        A body still queued once the read is handled (its consumer not
        set yet) pauses reading until the consumer takes it.
        """
        from twisted.web.server import NOT_DONE_YET

        from mproxy.http.request import MAX_QUEUED_BODY

        class Later:
            isLeaf = True
            request: Any = None

            def render(self, request: Any) -> Any:
                self.request = request
                return NOT_DONE_YET

        res = Later()
        ch, calls = self._pausing(res)
        n = MAX_QUEUED_BODY * 2
        ch.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
                        + b"q" * (n - 10))
        self.assertEqual(calls, ["pause"])
        self.assertEqual(ch._paused, {"queue"})
        got: list[bytes] = []
        res.request.set_body_consumer(got.append, lambda: None, lambda s, m: None)
        self.assertEqual(calls, ["pause", "resume"])
        self.assertEqual(ch._paused, set())
        ch.dataReceived(b"r" * 10)
        self.assertEqual(b"".join(got), b"q" * (n - 10) + b"r" * 10)

    def test_failing_consumer(self) -> None:
        """
        A consumer that raises on a piece is reported as the parser
        reports a failing callback: 400 to the request, reading stops.
        """
        c = Client()
        c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nab")
        c.send(b"boom")
        self.assertEqual(c.resource.errors, [400])
        c.send(b"cd")
        self.assertEqual(c.resource.pieces, [[b"ab"]])

    def test_body_timeout_moves(self) -> None:
        """
        Each piece that bypasses the parser counts as body progress for
        the body timeout.
        """
        c = Client()
        c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        for _ in range(3):
            c.reactor.advance(40)
            c.send(b"x")
        self.assertEqual(c.resource.errors, [])
        c.reactor.advance(61)
        self.assertEqual(c.resource.errors, [408])


def post(length: int, extra: bytes = b"") -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (length, extra)


class RequestBodyWithHeadTests(SynchronousTestCase):
    """
    The part of a Content-Length request body that arrives in the same
    read as its head bypasses the parser too, as a memoryview of the read
    (not copied); framing errors are refused as before.
    """

    def test_not_copied(self) -> None:
        c = Client()
        data = post(len(BODY) + 4) + BODY
        c.send(data)
        last = bytes(bytearray(b"1234"))
        c.send(last)
        (pieces,) = c.resource.pieces
        self.assertIs(type(pieces[0]), memoryview)
        self.assertIs(pieces[0].obj, data)
        self.assertEqual(pieces[0], BODY)
        self.assertIs(pieces[1], last)
        self.assertTrue(c.output().endswith(b"\r\n\r\n%d" % (len(BODY) + 4)))
        self.assertFalse(c.transport.disconnecting)

    def test_following_requests(self) -> None:
        """
        Requests after the body in the same read are parsed as usual.
        """
        c = Client()
        c.send(post(len(BODY)) + BODY + b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
               + post(3) + b"abc")
        self.assertEqual([r.path for r in c.resource.requests], [b"/up", b"/two", b"/up"])
        self.assertEqual(c.resource.pieces, [[BODY], [], [b"abc"]])
        self.assertEqual(c.output().count(b"HTTP/1.1 200 OK"), 3)

    def test_head_over_two_reads(self) -> None:
        """
        A head whose end straddles two reads: the body is still complete.
        """
        c = Client()
        whole = post(len(BODY)) + BODY
        cut = len(post(len(BODY))) - 1
        c.send(whole[:cut])
        c.send(whole[cut:])
        (pieces,) = c.resource.pieces
        self.assertEqual(b"".join(pieces), BODY)
        self.assertTrue(c.output().endswith(b"\r\n\r\n%d" % len(BODY)))
        # cut in a header line: the second read is split after the head
        c = Client()
        c.send(whole[:20])
        c.send(whole[20:])
        (pieces,) = c.resource.pieces
        self.assertEqual(pieces, [BODY])
        self.assertIs(type(pieces[0]), memoryview)

    def test_with_transfer_encoding(self) -> None:
        c = Client()
        c.send(post(len(BODY), b"Transfer-Encoding: chunked\r\n") + BODY)
        self.assertTrue(c.output().startswith(b"HTTP/1.1 400 "), c.output()[:40])
        self.assertEqual(c.resource.requests, [])

    def test_bad_length(self) -> None:
        c = Client()
        c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n" + BODY)
        self.assertTrue(c.output().startswith(b"HTTP/1.1 400 "), c.output()[:40])
        c2 = Client()
        c2.send(post(5, b"Content-Length: 5\r\n") + BODY)
        self.assertTrue(c2.output().startswith(b"HTTP/1.1 400 "), c2.output()[:40])

    def test_dropped_upgrade(self) -> None:
        """
        An upgrade offer other than WebSocket is dropped: the request's
        body and the requests after it are read as usual.
        """
        c = Client()
        c.send(post(len(BODY), b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
               + BODY + b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([r.path for r in c.resource.requests], [b"/up", b"/two"])
        self.assertEqual(b"".join(c.resource.pieces[0]), BODY)
        self.assertEqual(c.output().count(b"HTTP/1.1 200 OK"), 2)
