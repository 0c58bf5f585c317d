"""
Reading pauses and resumes of L{mproxy.http.server.FastHTTPChannel} while
request bodies are relayed to a target (through L{mproxy.http.proxy} and
L{mproxy.http.upstream}), with transports that pause their producers as
Twisted's TCP transports do: whole bodies in one delivery, bodies larger
than the channel's queue limit, slow targets, keep-alive and pipelined
requests after them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http.request import MAX_QUEUED_BODY
from tests.test_proxy import Harness, Refusal

MIB = 1024 * 1024


class FlowTransport(StringTransport):
    """
    A L{StringTransport} whose registered streaming producer is paused when
    more than C{limit} bytes wait to be sent and resumed by L{drain}, as
    Twisted's TCP transports do (unregistering a producer does not resume
    it).
    """

    producerPaused = False

    def __init__(self, limit: int = 65536) -> None:
        super().__init__()
        self.limit = limit
        self.unsent = 0

    def write(self, data: bytes) -> None:
        super().write(bytes(data))
        self.unsent += len(data)
        self._maybe_pause()

    def writeSequence(self, seq: Any) -> None:
        for piece in seq:
            self.write(piece)

    def _maybe_pause(self) -> None:
        p = self.producer
        if p is not None and self.streaming and not self.producerPaused and self.unsent > self.limit:
            self.producerPaused = True
            p.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()

    def drain(self) -> None:
        """
        Everything written was sent.
        """
        self.unsent = 0
        p = self.producer
        if p is not None and self.producerPaused:
            self.producerPaused = False
            p.resumeProducing()


def post(length: int, path: bytes = b"/up", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n" % length
            + extra + b"\r\n")


def body(length: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(256)) * (length // 256) + b"z" * (length % 256)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FlowHarness(Harness):
    """
    A proxy harness whose client and target transports pause their
    producers.
    """

    def __init__(self, client_limit: int = 65536, upstream_limit: int = 65536,
                 **target_options: Any) -> None:
        super().__init__(**target_options)
        self.ct = FlowTransport(client_limit)
        self.client = self.site.buildProtocol(None)
        self.client.makeConnection(self.ct)
        self.upstream_limit = upstream_limit
        self.targets: list[tuple[Any, FlowTransport]] = []

    @classmethod
    def with_target(cls, slow: bool) -> FlowHarness:
        """
        A harness whose target takes at most 64 KiB at a time (C{slow}),
        or all it is sent at once.
        """
        return cls(upstream_limit=65536 if slow else 1 << 40)

    def answer(self, proto: Any) -> None:
        """
        The target answers (a 200) on C{proto}'s connection; then settled.
        """
        proto.dataReceived(OK)
        self.settle()

    def upstream(self) -> tuple[Any, FlowTransport]:  # type: ignore[override]
        host, port, factory, timeout, bind = self.reactor.tcpClients[self.connected]
        self.connected += 1
        proto = factory.buildProtocol(None)
        t = FlowTransport(self.upstream_limit)
        proto.makeConnection(t)
        self.targets.append((proto, t))
        return proto, t

    def feed(self, data: bytes, step: int) -> None:
        """
        C{data} from the client in deliveries of C{step} bytes (0: one),
        each only while reading is not paused (else the test failed:
        reading stays paused).
        """
        if not step:
            step = len(data)
        for i in range(0, len(data), step):
            self.settle()
            if self.ct.producerState != "producing":
                raise AssertionError("reading paused with %d bytes unsent" % (len(data) - i))
            self.send(data[i:i + step])
        self.settle()

    def settle(self) -> None:
        """
        Batched writes flushed, connections the proxy opened made, every
        target transport drained.
        """
        self.reactor.advance(0)
        while self.connected < len(self.reactor.tcpClients):
            self.upstream()
        for _, t in self.targets:
            t.drain()
        self.reactor.advance(0)


def sent_body(raw: bytes) -> list[bytes]:
    """
    The bodies of the Content-Length requests in C{raw} (what a target got).
    """
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                n = int(value)
        out.append(rest[:n])
        raw = rest[n:]
    return out


class KeepAliveUploadTests(SynchronousTestCase):
    """
    Two large uploads on one keep-alive connection, each delivered in one
    piece or in several, with a target that takes its body at once or
    slowly: both reach the target whole, both are answered, and reading
    is never left paused.
    """

    def _two_uploads(self, first: tuple[int, int], second: tuple[int, int],
                     slow: bool = False) -> FlowHarness:
        h = FlowHarness.with_target(slow)
        bodies = []
        for n, ((length, step), seed) in enumerate(zip((first, second), (1, 2))):
            b = body(length, seed)
            bodies.append(b)
            h.feed(post(length) + b, step)
            proto, t = h.targets[0]
            self.assertEqual(sent_body(t.value()), bodies, (first, second, slow, n))
            h.answer(proto)
            self.assertEqual(h.output().count(b"HTTP/1.1 200 OK\r\n"), n + 1)
            self.assertEqual(h.ct.producerState, "producing", (first, second, slow, n, h.client._paused))
        self.assertEqual(h.connected, 1)
        self.assertFalse(h.ct.disconnecting)
        return h

    def test_one_delivery(self) -> None:
        """
        Each request (head and its 1 MiB body) in one delivery.
        """
        self._two_uploads((MIB, 0), (MIB, 0))

    def test_one_delivery_slow_target(self) -> None:
        """
        The same with a target that takes at most 64 KiB at a time.
        """
        self._two_uploads((MIB, 0), (MIB, 0), slow=True)

    def test_head_with_most_of_the_body(self) -> None:
        """
        The second request's head with ~975 KiB of its body in one
        delivery, the rest after it.
        """
        self._two_uploads((MIB, 65536), (MIB, 975 * 1024), slow=True)
        self._two_uploads((MIB, 65536), (MIB, 975 * 1024))

    def test_pieces_larger_than_the_queue(self) -> None:
        """
        Deliveries larger than the channel's queue limit, and smaller ones.
        """
        for step in (MAX_QUEUED_BODY + 1, 4 * MAX_QUEUED_BODY, 16384, 262144):
            for slow in (False, True):
                self._two_uploads((MIB, step), (MIB, step), slow=slow)

    def test_small_then_large(self) -> None:
        """
        A body under the queue limit, then a large one in one delivery.
        """
        self._two_uploads((1000, 0), (MIB, 0), slow=True)
        self._two_uploads((MIB, 0), (1000, 0), slow=True)

    def test_answered_before_the_body_is_sent(self) -> None:
        """
        A target answering while the body it was sent waits in its
        transport (paused): the response reaches the client; reading goes
        on once that transport drains.
        """
        h = FlowHarness(upstream_limit=65536)
        b = body(MIB, 3)
        h.send(post(MIB) + b)
        h.reactor.advance(0)
        proto, t = h.upstream()
        h.reactor.advance(0)
        h.answer(proto)
        self.assertEqual(h.output().count(b"200 OK"), 1)
        self.assertEqual(h.ct.producerState, "producing")
        self.assertEqual(sent_body(t.value()), [b])


class PipelinedTests(SynchronousTestCase):
    """
    Requests after a large upload in the same delivery.
    """

    def _sent(self, slow: bool, data: bytes) -> tuple[FlowHarness, Any, FlowTransport]:
        """
        C{data} from the client in one delivery (see
        L{FlowHarness.with_target}); the harness and the target connection
        it went to.
        """
        h = FlowHarness.with_target(slow)
        h.send(data)
        h.settle()
        proto, t = h.targets[0]
        h.settle()
        return h, proto, t

    def _both_answered(self, h: FlowHarness, proto: Any) -> None:
        """
        The second request answered: both responses reached the client and
        reading goes on.
        """
        h.answer(proto)
        self.assertEqual(h.output().count(b"200 OK"), 2)
        self.assertEqual(h.ct.producerState, "producing")

    def test_after_upload_in_one_delivery(self) -> None:
        """
        A 1 MiB upload and a GET behind it, in one delivery: both answered
        in order, the GET forwarded once the upload is answered.
        """
        for slow in (False, True):
            b = body(MIB, 4)
            h, proto, t = self._sent(slow, post(MIB) + b
                                     + b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n")
            self.assertEqual(sent_body(t.value()), [b])
            h.answer(proto)
            self.assertTrue(t.value().endswith(b"\r\n\r\n"), slow)
            self.assertIn(b"GET /next ", t.value())
            self._both_answered(h, proto)

    def test_two_uploads_in_one_delivery(self) -> None:
        """
        Two uploads pipelined in one delivery: the second one's body waits
        (reading paused) until the first is answered, then goes on.
        """
        for slow in (False, True):
            b1, b2 = body(300000, 5), body(300000, 6)
            h, proto, t = self._sent(slow, post(300000) + b1 + post(300000) + b2)
            self.assertEqual(sent_body(t.value()), [b1])
            h.answer(proto)
            self.assertEqual(sent_body(t.value()), [b1, b2])
            self._both_answered(h, proto)


class AfterErrorTests(SynchronousTestCase):
    """
    A request refused before its large body was read.
    """

    def _refused_then_get(self, h: FlowHarness, status: bytes) -> None:
        h.send(post(MIB) + body(MIB, 7) + b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n")
        h.settle()
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 " + status + b" "), out[:100])
        # the body was read whole: the connection is kept
        self.assertNotIn(b"Connection: close", out.split(b"\r\n\r\n")[0])
        proto, t = h.targets[0]
        self.assertTrue(t.value().startswith(b"GET /next "))
        h.answer(proto)
        self.assertEqual(h.output().count(b"HTTP/1.1 200 OK\r\n"), 1)
        self.assertEqual(h.ct.producerState, "producing")
        self.assertEqual(h.client._paused, set())
        h.send(b"GET /third HTTP/1.1\r\nHost: example.com\r\n\r\n")
        h.settle()
        self.assertIn(b"GET /third ", t.value())

    def test_413_then_get(self) -> None:
        """
        A body over the service's limit, received whole with the head, and
        a GET behind it: 413, then the GET is served and reading goes on
        (the refused request's queued body no longer holds it).
        """
        self._refused_then_get(FlowHarness(buffer_requests=True, max_request_body=1000), b"413")

    def test_refused_then_get(self) -> None:
        """
        The same for a request the service refuses (503).
        """
        h = FlowHarness()
        h.service.result = Refusal(503, "nope")
        h.send(post(MIB) + body(MIB, 7))
        h.settle()
        self.assertTrue(h.output().startswith(b"HTTP/1.1 503 "))
        h.service.result = None
        h.ct.clear()
        h.get(b"/next")
        h.settle()
        self.assertEqual(h.client._paused, set())
        proto, t = h.targets[0]
        self.assertTrue(t.value().startswith(b"GET /next "))

    def test_refused_before_the_body(self) -> None:
        """
        A refused request whose body is still arriving: the answer says
        Connection: close and the connection closes.
        """
        h = FlowHarness()
        h.service.result = Refusal(503, "nope")
        h.send(post(MIB) + body(300000, 7))
        h.settle()
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"Connection: close", out)
        self.assertTrue(h.client._closing)

    def test_400_after_a_large_body(self) -> None:
        """
        A malformed request behind a large upload in one delivery: the
        upload is answered, then a 400, and the connection closes.
        """
        h = FlowHarness()
        b = body(MIB, 8)
        h.send(post(MIB) + b + b"GARBAGE\r\n\r\n")
        h.settle()
        proto, t = h.targets[0]
        self.assertEqual(sent_body(t.value()), [b])
        h.answer(proto)
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"HTTP/1.1 400 Bad Request\r\n", out)
        self.assertTrue(h.client._closing)
