"""
Tests for L{mproxy.http.splice}: a Content-Length body's rest relayed from
the target's socket to the client's through a pipe, with the system calls
faked (L{FakeCalls}) so that EAGAIN, partial splices, end of file and
errors come exactly when a test wants them; and for how the upstream
connection (L{mproxy.http.upstream}), the relay (L{mproxy.http.relay}) and
the client's request (L{mproxy.http.request.FastRequest}) use it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.http import batch
from mproxy.http.batch import WriteBatcher
from mproxy.http.reads import HEAD_READ
from mproxy.http.splice import (
    MAX_PIPE_BYTES,
    PIPE_MIN,
    SPLICE_MIN,
    ISpliceCalls,
    ISpliceHandler,
    OSSpliceCalls,
    Splicer,
    available,
    pipe_budget,
)
from mproxy.http.upstream import UpstreamPool, _SpliceHandler


@implementer(ISpliceCalls)
class FakeCalls:
    """
    L{ISpliceCalls} over a model: the source socket holds C{source[fd]}
    bytes (C{None}: at its end; an exception: raised), a sink socket takes
    at most C{room[fd]} bytes (an exception: raised), pipes hold what was
    moved in.  C{log} records each splice as C{(src, dst, count, result)}.
    """

    def __init__(self, pipe_size: int = 1 << 20) -> None:
        self.pipe_size = pipe_size
        self.source: dict[int, Any] = {}
        self.room: dict[int, Any] = {}
        self.taken: dict[int, int] = {}
        self.pipes: dict[int, int] = {}  # write fd -> read fd
        self.held: dict[int, int] = {}   # read fd -> bytes in the pipe
        self.open: set[int] = set()
        self.closed: list[int] = []
        self.log: list[tuple[int, int, int, Any]] = []
        self.pipe_error: Exception | None = None
        self._next = 100

    def pipe(self, size: int) -> tuple[int, int, int]:
        if self.pipe_error is not None:
            raise self.pipe_error
        r, w = self._next, self._next + 1
        self._next += 2
        self.pipes[w] = r
        self.held[r] = 0
        self.open |= {r, w}
        return r, w, min(size, self.pipe_size)

    def close(self, fd: int) -> None:
        self.open.remove(fd)
        self.closed.append(fd)

    def splice(self, src: int, dst: int, count: int) -> int:
        if dst in self.pipes:
            avail = self.source.get(src, 0)
            if isinstance(avail, Exception):
                self.log.append((src, dst, count, type(avail).__name__))
                raise avail
            if avail is None:
                self.log.append((src, dst, count, 0))
                return 0
            if not avail:
                self.log.append((src, dst, count, "EAGAIN"))
                raise BlockingIOError(errno.EAGAIN, "again")
            n = min(avail, count)
            self.source[src] = avail - n
            self.held[self.pipes[dst]] += n
        else:
            room = self.room.get(dst)
            if isinstance(room, Exception):
                self.log.append((src, dst, count, type(room).__name__))
                raise room
            n = min(count, self.held[src]) if room is None else min(count, room,
                                                                    self.held[src])
            if not n:
                self.log.append((src, dst, count, "EAGAIN"))
                raise BlockingIOError(errno.EAGAIN, "again")
            if room is not None:
                self.room[dst] = room - n
            self.held[src] -= n
            self.taken[dst] = self.taken.get(dst, 0) + n
        self.log.append((src, dst, count, n))
        return n


class FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sent: list[bytes] = []
        self.take: int | None = None

    def fileno(self) -> int:
        return self.fd

    def send(self, data: bytes) -> int:
        n = len(data) if self.take is None else min(self.take, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    def sendmsg(self, buffers: Any) -> int:
        data = b"".join(bytes(b) for b in buffers)
        return self.send(data)


class FakeTCP(StringTransport):
    """
    A Twisted TCP transport as far as the batcher and the relay look:
    a socket with a file descriptor, Twisted's write buffer, reading and
    writing registrations, its own C{doRead} / C{doWrite}.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.socket = FakeSocket(fd)
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.connected = True
        self.disconnecting = False
        self._aborting = False
        self.reading = True
        self.writing = False
        self.own_reads: list[bytes] = []
        self.own_writes = 0
        self.aborted = False
        self.bufferSize = 65536

    def doRead(self) -> None:
        self.own_reads.append(b"read")

    def doWrite(self) -> None:
        self.own_writes += 1

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def startWriting(self) -> None:
        self.writing = True

    def stopWriting(self) -> None:
        self.writing = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tempDataLen += len(data)

    def abortConnection(self) -> None:
        self.aborted = True
        self._aborting = True
        self.doRead = lambda *a: None  # type: ignore[method-assign]
        self.doWrite = lambda *a: None  # type: ignore[method-assign]


@implementer(ISpliceHandler)
class Handler:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def sent(self, n: int) -> None:
        self.events.append(("sent", n))

    def stalled(self) -> None:
        self.events.append("stalled")

    def flowing(self) -> None:
        self.events.append("flowing")

    def ended(self) -> None:
        self.events.append("ended")

    def source_failed(self, message: str) -> None:
        self.events.append(("source_failed", message))

    def sink_failed(self, message: str) -> None:
        self.events.append(("sink_failed", message))


SRC, DST = 7, 8


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls = FakeCalls()
        self.splicer = Splicer(self.calls, pipe_size=1 << 20)
        self.source = FakeTCP(SRC)
        self.sink = FakeTCP(DST)
        self.handler = Handler()

    def start(self, left: int) -> Any:
        relay = self.splicer.start(self.source, self.sink, left, self.handler)
        self.assertIsNotNone(relay)
        return relay

    def test_interfaces(self) -> None:
        verifyObject(ISpliceCalls, OSSpliceCalls())
        verifyObject(ISpliceCalls, self.calls)
        verifyObject(ISpliceHandler, self.handler)

    def test_whole_rest(self) -> None:
        """
        A readable source fills the pipe with the whole rest, which the
        sink takes at once: the end, the transports' own reading and
        writing back, the pipe kept for the next relay.
        """
        relay = self.start(300000)
        self.assertEqual(self.source.doRead, relay._readable)
        self.calls.source[SRC] = 300000
        self.source.doRead()
        self.assertEqual(self.handler.events, [("sent", 300000), "ended"])
        self.assertEqual(self.calls.taken[DST], 300000)
        self.assertTrue(relay.closed)
        self.assertNotIn("doRead", self.source.__dict__)
        self.source.doRead()
        self.assertEqual(self.source.own_reads, [b"read"])
        self.assertEqual(self.splicer.idle_pipes, 1)
        self.assertEqual(self.calls.closed, [])
        self.assertFalse(self.sink.writing)

    def test_pipe_reused(self) -> None:
        """
        The next relay takes the pipe the last one gave back.
        """
        self.start(SPLICE_MIN)
        self.calls.source[SRC] = SPLICE_MIN
        self.source.doRead()
        self.start(SPLICE_MIN)
        self.assertEqual(self.splicer.idle_pipes, 0)
        self.assertEqual(len(self.calls.open), 2)

    def test_fills_bounded(self) -> None:
        """
        A fill asks for no more than the body's rest, nor more than the
        pipe holds; bytes after the body stay in the source's socket.
        """
        self.calls.pipe_size = 131072
        relay = self.start(300000)
        self.calls.source[SRC] = 400000
        self.source.doRead()
        self.assertEqual(self.calls.log[0][2], 131072)
        self.source.doRead()
        self.source.doRead()
        self.assertEqual([c[2] for c in self.calls.log if c[1] not in (DST,)],
                         [131072, 131072, 300000 - 262144])
        self.assertEqual(self.calls.source[SRC], 100000)
        self.assertEqual(relay.left, 0)
        self.assertEqual(self.handler.events[-1], "ended")
        self.assertEqual(sum(e[1] for e in self.handler.events if e[0] == "sent"), 300000)

    def test_source_eagain(self) -> None:
        """
        Nothing to read yet: nothing happens, the next readable event goes
        on.
        """
        relay = self.start(SPLICE_MIN)
        self.source.doRead()
        self.assertEqual(self.handler.events, [])
        self.assertEqual(self.calls.log[0][3], "EAGAIN")
        self.calls.source[SRC] = 1000
        self.source.doRead()
        self.assertEqual(self.handler.events, [("sent", 1000)])
        self.assertEqual(relay.left, SPLICE_MIN - 1000)

    def test_sink_full(self) -> None:
        """
        What the client's socket does not take waits in the pipe: the relay
        is the sink's doWrite until it is taken, the handler hears the
        stall (so reading from the target pauses) and, once it is taken,
        the flow; the source is not read while the pipe holds bytes.
        """
        relay = self.start(200000)
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = 30000
        self.source.doRead()
        self.assertEqual(self.handler.events, [("sent", 30000), "stalled"])
        self.assertEqual(relay.in_pipe, 70000)
        self.assertTrue(self.sink.writing)
        self.assertEqual(self.sink.doWrite, relay._writable)
        # a readable source now does not fill the pipe, and stops reading
        self.calls.source[SRC] = 100000
        n = len(self.calls.log)
        self.source.doRead()
        self.assertEqual(len(self.calls.log), n)
        self.assertFalse(self.source.reading)
        # the socket takes some, then nothing, then the rest
        self.calls.room[DST] = 20000
        self.sink.doWrite()
        self.calls.room[DST] = 0
        self.sink.doWrite()
        self.assertEqual(self.handler.events, [("sent", 30000), "stalled", ("sent", 20000)])
        self.calls.room[DST] = None
        self.sink.doWrite()
        self.assertEqual(self.handler.events[-2:], [("sent", 50000), "flowing"])
        self.assertFalse(self.sink.writing)
        self.assertNotIn("doWrite", self.sink.__dict__)
        self.assertTrue(self.source.reading)
        self.source.doRead()
        self.assertEqual(self.handler.events[-2:], [("sent", 100000), "ended"])
        self.assertEqual(self.calls.taken[DST], 200000)

    def test_last_bytes_after_stall(self) -> None:
        """
        The rest taken after a stall ends the relay (no flow: nothing more
        to read).
        """
        self.start(100000)
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = 1
        self.source.doRead()
        self.calls.room[DST] = None
        self.sink.doWrite()
        self.assertEqual(self.handler.events, [("sent", 1), "stalled", ("sent", 99999), "ended"])
        self.assertEqual(self.splicer.idle_pipes, 1)
        self.assertFalse(self.sink.writing)

    def test_sink_written_meanwhile(self) -> None:
        """
        If Twisted was given bytes for the sink meanwhile, its own writing
        goes on once the relay no longer needs the socket.
        """
        self.start(100000)
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = 1
        self.source.doRead()
        self.sink._tempDataLen = 5
        self.calls.room[DST] = None
        self.sink.doWrite()
        self.assertTrue(self.sink.writing)
        self.assertNotIn("doWrite", self.sink.__dict__)

    def test_source_end(self) -> None:
        """
        The target's socket at its end before the body's: the source
        failed, the pipe is closed (not kept), the transports are theirs
        again.
        """
        self.start(100000)
        self.calls.source[SRC] = 5000
        self.source.doRead()
        self.calls.source[SRC] = None
        self.source.doRead()
        self.assertEqual(self.handler.events, [
            ("sent", 5000), ("source_failed", "target closed the connection mid-response")])
        self.assertEqual(self.calls.open, set())
        self.assertEqual(self.splicer.idle_pipes, 0)
        self.assertNotIn("doRead", self.source.__dict__)

    def test_source_error(self) -> None:
        self.start(100000)
        self.calls.source[SRC] = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        self.source.doRead()
        self.assertEqual(self.handler.events, [
            ("source_failed", "target connection failed mid-response: Connection reset by peer")])
        self.assertEqual(self.calls.open, set())

    def test_sink_error(self) -> None:
        """
        The client's socket failing (the client went away): the sink
        failed, the pipe (holding bytes) is closed.
        """
        self.start(100000)
        self.calls.source[SRC] = 50000
        self.calls.room[DST] = BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.source.doRead()
        self.assertEqual(self.handler.events, [("sink_failed", "client connection failed: Broken pipe")])
        self.assertEqual(self.calls.open, set())
        self.assertNotIn("doRead", self.source.__dict__)

    def test_sink_error_while_waiting(self) -> None:
        self.start(100000)
        self.calls.source[SRC] = 50000
        self.calls.room[DST] = 10
        self.source.doRead()
        self.calls.room[DST] = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        self.sink.doWrite()
        self.assertEqual(self.handler.events[-1],
                         ("sink_failed", "client connection failed: Connection reset by peer"))
        self.assertNotIn("doWrite", self.sink.__dict__)
        self.assertFalse(self.sink.writing)
        self.assertEqual(self.calls.open, set())

    def test_stop(self) -> None:
        """
        A relay stopped (its exchange abandoned) closes its pipe, gives
        the transports their own reading and writing back and tells the
        handler nothing.
        """
        relay = self.start(100000)
        self.calls.source[SRC] = 50000
        self.calls.room[DST] = 10
        self.source.doRead()
        events = list(self.handler.events)
        relay.stop()
        relay.stop()
        self.assertEqual(self.handler.events, events)
        self.assertEqual(self.calls.open, set())
        self.assertNotIn("doRead", self.source.__dict__)
        self.assertNotIn("doWrite", self.sink.__dict__)
        self.assertFalse(self.sink.writing)
        self.sink.doWrite()
        self.assertEqual(self.sink.own_writes, 1)

    def test_stop_after_abort(self) -> None:
        """
        A transport aborted meanwhile keeps the C{doRead} / C{doWrite}
        its abort set.
        """
        relay = self.start(100000)
        self.calls.source[SRC] = 50000
        self.calls.room[DST] = 10
        self.source.doRead()
        self.source.abortConnection()
        self.sink.abortConnection()
        relay.stop()
        self.assertIn("doRead", self.source.__dict__)
        self.assertIn("doWrite", self.sink.__dict__)
        self.assertNotEqual(self.source.doRead, relay._readable)

    def test_pool_limit(self) -> None:
        """
        At most C{max_idle} empty pipes are kept; the others are closed.
        """
        splicer = Splicer(self.calls, pipe_size=1 << 20, max_idle=1)
        relays = [splicer.start(FakeTCP(10 + i), FakeTCP(20 + i), 10, Handler())
                  for i in range(3)]
        self.assertEqual(len(self.calls.open), 6)
        for i, r in enumerate(relays):
            self.calls.source[10 + i] = 10
            r.source.doRead()
            self.assertEqual(r.handler.events, [("sent", 10), "ended"])
        self.assertEqual(splicer.idle_pipes, 1)
        self.assertEqual(len(self.calls.open), 2)
        splicer.close()
        self.assertEqual(self.calls.open, set())

    def test_no_pipe(self) -> None:
        """
        No pipe (the system refuses one), or only a small one (the user's
        pipe quota is used up): no relay, nothing left open; after a small
        one, none is asked for until a pipe is given back.
        """
        self.calls.pipe_error = OSError(errno.EMFILE, "Too many open files")
        self.assertIsNone(self.splicer.start(self.source, self.sink, 100000, self.handler))
        self.calls.pipe_error = None
        self.calls.pipe_size = PIPE_MIN // 2
        self.assertIsNone(self.splicer.start(self.source, self.sink, 100000, self.handler))
        self.assertEqual(self.calls.open, set())
        made = self.calls._next
        self.assertIsNone(self.splicer.start(self.source, self.sink, 100000, self.handler))
        self.assertEqual(self.calls._next, made)
        self.assertNotIn("doRead", self.source.__dict__)

    def test_capacity_budget(self) -> None:
        """
        The pipes held, in use and idle, add up to at most C{max_bytes}:
        past it a body takes the ordinary path (no pipe is asked for).  A
        pipe closed gives its share back, an idle one keeps it.
        """
        big = 1 << 20
        splicer = Splicer(self.calls, pipe_size=big, max_idle=1, max_bytes=2 * big + PIPE_MIN)
        relays = [splicer.start(FakeTCP(10 + i), FakeTCP(20 + i), 10, Handler())
                  for i in range(2)]
        self.assertEqual(splicer.held, 2 * big)
        made = self.calls._next
        self.assertIsNone(splicer.start(FakeTCP(12), FakeTCP(22), 10, Handler()))
        self.assertEqual(self.calls._next, made)
        for i, r in enumerate(relays):
            self.calls.source[10 + i] = 10
            r.source.doRead()
        # the first one given back is kept idle, the other closed
        self.assertEqual(splicer.held, big)
        self.assertEqual(len(self.calls.open), 2)
        again = [splicer.start(FakeTCP(13 + i), FakeTCP(23 + i), 10, Handler())
                 for i in range(2)]
        self.assertNotIn(None, again)
        self.assertEqual(splicer.held, 2 * big)
        self.assertIsNone(splicer.start(FakeTCP(15), FakeTCP(25), 10, Handler()))
        for r in again:
            r.stop()
        splicer.close()
        self.assertEqual((splicer.held, self.calls.open), (0, set()))

    def test_budget_after_small_pipe(self) -> None:
        """
        A pipe too small to use, closed at once, does not count.
        """
        self.calls.pipe_size = PIPE_MIN // 2
        self.assertIsNone(self.splicer.start(self.source, self.sink, 100000, self.handler))
        self.assertEqual(self.splicer.held, 0)

    def test_pipe_budget(self) -> None:
        """
        A process may hold a quarter of the user's pipe quota, and never
        more than L{MAX_PIPE_BYTES}; no quota (0) or none to read: that
        maximum.
        """
        self.assertEqual(pipe_budget(8192, 4096), 8 << 20)
        self.assertEqual(pipe_budget(16384, 4096), MAX_PIPE_BYTES)
        self.assertEqual(pipe_budget(1 << 20, 4096), MAX_PIPE_BYTES)
        self.assertEqual(pipe_budget(0, 4096), MAX_PIPE_BYTES)
        self.assertEqual(pipe_budget(1024, 4096), 1 << 20)
        self.assertLessEqual(pipe_budget(), MAX_PIPE_BYTES)
        self.assertLessEqual(Splicer().max_bytes, MAX_PIPE_BYTES)

    def test_os_calls(self) -> None:
        """
        The real calls move bytes from a socket to another through a pipe
        of the size asked for.
        """
        if not available():
            raise self.skipTest("no splice(2) here")
        import socket

        calls = OSSpliceCalls()
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        for s in (a, b, c, d):
            self.addCleanup(s.close)
            s.setblocking(False)
        r, w, size = calls.pipe(PIPE_MIN)
        self.addCleanup(calls.close, r)
        self.addCleanup(calls.close, w)
        self.assertEqual(size, PIPE_MIN)
        self.assertRaises(BlockingIOError, calls.splice, b.fileno(), w, 100)
        a.send(b"hello world")
        self.assertEqual(calls.splice(b.fileno(), w, 5), 5)
        self.assertEqual(calls.splice(r, c.fileno(), 5), 5)
        self.assertEqual(d.recv(100), b"hello")
        a.close()
        self.assertEqual(calls.splice(b.fileno(), w, 100), 6)
        self.assertEqual(calls.splice(b.fileno(), w, 100), 0)
        fds = len(os.listdir("/proc/self/fd"))
        calls.close(calls.pipe(PIPE_MIN)[0])
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds + 1)


class Receiver:
    """
    An upstream receiver that relays like L{mproxy.http.relay.Relay}: it
    offers C{sink} for splicing (C{None}: it does not).
    """

    def __init__(self, sink: Any = None) -> None:
        self.sink = sink
        self.events: list[Any] = []
        self.ex: Any = None

    def upstream_informational(self, status: int, headers: Any) -> None:
        self.events.append(("info", status))

    def upstream_response(self, status: int, reason: bytes, headers: Any) -> None:
        self.events.append(("response", status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", len(data)))

    def upstream_done(self, trailers: Any) -> None:
        self.events.append("done")

    def upstream_failed(self, err: Any) -> None:
        self.events.append(("failed", err.status, err.message))

    def splice_transport(self) -> Any:
        return self.sink

    def spliced(self, n: int) -> None:
        self.events.append(("spliced", n))

    def pauseProducing(self) -> None:
        self.events.append("pause")
        self.ex.pauseProducing()

    def resumeProducing(self) -> None:
        self.events.append("resume")
        self.ex.resumeProducing()

    def splice_broken(self) -> None:
        self.events.append("broken")


def head(length: int, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (length, extra)


class UpstreamSpliceTests(SynchronousTestCase):
    """
    The upstream connection hands a Content-Length body's rest of at least
    L{SPLICE_MIN} bytes to a splice relay when the receiver offers the
    client's transport, and goes on as before otherwise.
    """

    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, "10.0.0.2", 3000)
        self.calls = FakeCalls()
        self.pool.splicer = Splicer(self.calls, pipe_size=1 << 20)
        self.sink = FakeTCP(DST)
        self.connects = 0

    def request(self, receiver: Receiver, method: bytes = b"GET") -> Any:
        ex = self.pool.request(method, b"/x", [(b"Host", b"example.com")], receiver)
        receiver.ex = ex
        return ex

    def connect(self) -> tuple[Any, FakeTCP]:
        factory = self.reactor.tcpClients[self.connects][2]
        self.connects += 1
        proto = factory.buildProtocol(None)
        t = FakeTCP(SRC)
        proto.makeConnection(t)
        return proto, t

    def spliced_exchange(self, length: int = 200000, first: int = 20000) -> Any:
        r = Receiver(self.sink)
        self.request(r)
        proto, t = self.connect()
        proto.dataReceived(head(length) + b"a" * first)
        return r, proto, t

    def test_rest_spliced(self) -> None:
        """
        The piece that came with the head is delivered; the rest goes by
        splice; its end completes the exchange and the connection is
        idle for the next request, read by the parser again.
        """
        r, proto, t = self.spliced_exchange()
        self.assertEqual(r.events, [("response", 200), ("data", 20000)])
        self.assertIsNotNone(proto._splice)
        self.calls.source[SRC] = 180000
        t.doRead()
        self.assertEqual(r.events[2:], [("spliced", 180000), "done"])
        self.assertEqual(self.calls.taken[DST], 180000)
        self.assertIsNone(proto._splice)
        self.assertEqual(self.pool.idle_count, 1)
        self.assertNotIn("doRead", t.__dict__)
        self.assertEqual(self.pool.splicer.idle_pipes, 1)
        # the next request on the same connection
        r2 = Receiver(self.sink)
        self.request(r2)
        self.assertEqual(self.connects, 1)
        proto.dataReceived(head(5) + b"hello")
        self.assertEqual(r2.events, [("response", 200), ("data", 5), "done"])

    def test_next_head_read(self) -> None:
        """
        After a spliced body the next response's first read is
        L{HEAD_READ} bytes (a 64 KiB body and its head), not the grown
        read size; the reads after it are the grown size again.
        """
        r, proto, t = self.spliced_exchange()
        t.bufferSize = 262144
        proto._reads = 262144
        self.calls.source[SRC] = 180000
        t.doRead()
        self.assertEqual(t.bufferSize, HEAD_READ)
        self.request(Receiver(None))
        proto.dataReceived(head(1 << 20) + b"a" * (HEAD_READ - 100))
        self.assertEqual(t.bufferSize, 262144)

    def test_rest_spliced_after_parser(self) -> None:
        """
        A head parsed by the parser (its read too short to split): the
        rest is spliced from the next read on.
        """
        r = Receiver(self.sink)
        self.request(r)
        proto, t = self.connect()
        proto.dataReceived(head(200000, b"X-A: b\r\n") + b"a" * 100)
        self.assertIsNone(proto._splice)
        proto.dataReceived(b"b" * 1000)
        self.assertIsNotNone(proto._splice)
        self.calls.source[SRC] = 198900
        t.doRead()
        self.assertEqual(r.events, [("response", 200), ("data", 100), ("data", 1000),
                                    ("spliced", 198900), "done"])
        self.assertEqual(self.pool.idle_count, 1)

    def test_small_rest_not_spliced(self) -> None:
        """
        A rest under L{SPLICE_MIN} bytes goes on as pieces.
        """
        r, proto, t = self.spliced_exchange(length=20000 + SPLICE_MIN - 1)
        self.assertIsNone(proto._splice)
        self.assertEqual(self.calls.log, [])
        proto.dataReceived(b"b" * (SPLICE_MIN - 1))
        self.assertEqual(r.events[-2:], [("data", SPLICE_MIN - 1), "done"])

    def test_receiver_without_sink(self) -> None:
        """
        A receiver that offers no transport (buffered, TLS, HTTP/2) gets
        the body as pieces.
        """
        self.sink = None  # type: ignore[assignment]
        r, proto, t = self.spliced_exchange()
        self.assertIsNone(proto._splice)
        proto.dataReceived(b"b" * 180000)
        self.assertEqual(r.events[-2:], [("data", 180000), "done"])
        self.assertEqual(self.calls.open, set())

    def test_not_tcp(self) -> None:
        """
        An upstream transport that is not a plain TCP one: no splice.
        """
        r = Receiver(self.sink)
        self.request(r)
        factory = self.reactor.tcpClients[0][2]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(head(200000) + b"a" * 20000)
        self.assertIsNone(proto._splice)

    def test_head_request(self) -> None:
        """
        A HEAD response's Content-Length announces no body: nothing to
        splice.
        """
        r = Receiver(self.sink)
        self.request(r, b"HEAD")
        proto, t = self.connect()
        proto.dataReceived(head(200000))
        self.assertEqual(r.events, [("response", 200), "done"])
        self.assertIsNone(proto._splice)

    def test_backpressure(self) -> None:
        """
        The client's socket full: the receiver is paused (so the exchange
        stops reading from the target) and resumed when it takes the
        rest.
        """
        r, proto, t = self.spliced_exchange()
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = 1000
        t.doRead()
        self.assertEqual(r.events[2:], [("spliced", 1000), "pause"])
        self.assertFalse(t.reading)
        self.assertTrue(self.sink.writing)
        self.calls.room[DST] = None
        self.sink.doWrite()
        self.assertEqual(r.events[4:], [("spliced", 99000), "resume"])
        self.assertTrue(t.reading)
        self.calls.source[SRC] = 80000
        t.doRead()
        self.assertEqual(r.events[6:], [("spliced", 80000), "done"])
        self.assertEqual(self.pool.idle_count, 1)

    def test_target_closes_mid_body(self) -> None:
        """
        The target's end before the body's: a 502 failure, the connection
        aborted (not reused), the pipe closed.
        """
        r, proto, t = self.spliced_exchange()
        self.calls.source[SRC] = 1000
        t.doRead()
        self.calls.source[SRC] = None
        t.doRead()
        self.assertEqual(r.events[-1],
                         ("failed", 502, "target closed the connection mid-response"))
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())
        self.assertEqual(self.pool.idle_count, 0)

    def test_client_fails(self) -> None:
        """
        The client's socket failing: the target connection is aborted,
        the receiver told to abort the client's.
        """
        r, proto, t = self.spliced_exchange()
        self.calls.source[SRC] = 1000
        self.calls.room[DST] = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        t.doRead()
        self.assertEqual(r.events[-1], "broken")
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())
        proto.connectionLost()
        self.assertEqual(r.events[-1], "broken")
        self.assertEqual(self.pool.idle_count, 0)

    def test_cancel(self) -> None:
        """
        The exchange cancelled mid-body (the client went away, a drain's
        deadline): the pipe is closed, the target connection aborted.
        """
        r, proto, t = self.spliced_exchange()
        self.calls.source[SRC] = 1000
        self.calls.room[DST] = 10
        t.doRead()
        r.ex.cancel()
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())
        self.assertIsNone(proto._splice)
        self.assertNotIn("doWrite", self.sink.__dict__)
        self.assertFalse(self.sink.writing)

    def test_connection_lost(self) -> None:
        """
        The target connection lost under the relay: the pipe is closed,
        the exchange fails with a 502.
        """
        r, proto, t = self.spliced_exchange()
        proto.connectionLost()
        self.assertEqual(self.calls.open, set())
        self.assertEqual(r.events[-1][:2], ("failed", 502))

    def test_handler(self) -> None:
        r, proto, t = self.spliced_exchange()
        verifyObject(ISpliceHandler, _SpliceHandler(proto, r.ex))


class ProxySpliceTests(SynchronousTestCase):
    """
    Through the proxy (L{mproxy.http.proxy}, L{mproxy.http.relay},
    L{mproxy.http.request.FastRequest}): which responses are spliced, and
    what the client, the log and the connections see.
    """

    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.calls = FakeCalls()

    def harness(self, **options: Any) -> Any:
        from tests.test_proxy import Harness

        h = Harness(**options)
        h.service.target.pool.splicer = Splicer(self.calls, pipe_size=1 << 20)
        h.client = h.site.buildProtocol(None)
        h.ct = FakeTCP(DST)
        h.client.makeConnection(h.ct)
        return h

    def upstream(self, h: Any) -> tuple[Any, FakeTCP]:
        host, port, factory, timeout, bind = h.reactor.tcpClients[h.connected]
        h.connected += 1
        proto = factory.buildProtocol(None)
        t = FakeTCP(SRC)
        proto.makeConnection(t)
        h.reactor.advance(0)  # the batched request goes out
        return proto, t

    def client_bytes(self, h: Any) -> bytes:
        return b"".join(h.ct.socket.sent) + h.ct.value()

    def test_spliced_response(self) -> None:
        """
        The head and the first piece reach the client's socket before the
        rest is spliced; the log counts every body byte; the client and
        target connections are kept for the next request.
        """
        h = self.harness()
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000, b"Content-Type: x/y\r\n") + b"a" * 20000)
        self.assertIsNotNone(proto._splice)
        out = self.client_bytes(h)
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:100])
        self.assertTrue(out.endswith(b"\r\n\r\n" + b"a" * 20000))
        self.assertEqual(h.ct.value(), b"")
        self.calls.source[SRC] = 280000
        t.doRead()
        self.assertEqual(self.calls.taken[DST], 280000)
        log = h.requests_logged()[0]
        self.assertEqual((log["status"], log["resp_content_length"]), (200, 300000))
        self.assertEqual(h.service.target.pool.idle_count, 1)
        # keep-alive: the next request is served on both connections
        h.get(b"/y")
        h.reactor.advance(0)
        proto.dataReceived(OK_SMALL)
        h.reactor.advance(0)
        self.assertTrue(self.client_bytes(h).endswith(OK_SMALL_OUT))
        self.assertEqual(h.connected, 1)

    def test_pending_bytes_go_first(self) -> None:
        """
        What was written to the client and is still pending (a small first
        piece is batched) goes to its socket before the first spliced
        byte; if the socket does not take it all, nothing is spliced yet.
        """
        h = self.harness()
        h.get()
        proto, t = self.upstream(h)
        h.ct.socket.take = 10
        proto.dataReceived(head(300000) + b"a" * 100)
        proto.dataReceived(b"b" * 100)
        self.assertIsNone(proto._splice)
        self.assertEqual(self.calls.log, [])
        h.ct.socket.take = None
        h.ct._tempDataLen = 0
        h.ct.clear()
        proto.dataReceived(b"c" * 100)
        self.assertIsNotNone(proto._splice)

    def test_buffered_response_not_spliced(self) -> None:
        """
        A buffered response (C{--buffer-responses}) is held whole: no
        splice.
        """
        h = self.harness(buffer_responses=True)
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.assertIsNone(proto._splice)
        self.assertEqual(self.calls.open, set())

    def test_head_and_304(self) -> None:
        """
        Responses without a body to the client are not spliced.
        """
        h = self.harness()
        h.get(method=b"HEAD")
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000))
        self.assertIsNone(proto._splice)
        h2 = self.harness()
        h2.get()
        proto2, t2 = self.upstream(h2)
        proto2.dataReceived(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 300000\r\n\r\n")
        self.assertIsNone(proto2._splice)
        self.assertEqual(self.calls.open, set())

    def test_chunked_to_client_not_spliced(self) -> None:
        """
        A response the client gets chunked (an HTTP/1.1 body without a
        length) never reaches the splice; an HTTP/1.0 client's
        Content-Length response is spliced and the connection closed
        after it.
        """
        h = self.harness()
        h.send(b"GET /x HTTP/1.0\r\nHost: example.com\r\n\r\n")
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.assertIsNotNone(proto._splice)
        self.calls.source[SRC] = 280000
        t.doRead()
        self.assertTrue(h.ct.disconnecting)

    def test_client_gone(self) -> None:
        """
        The client's socket failing: the client connection is aborted, the
        target connection too (not reused), the request logged once.
        """
        h = self.harness()
        aborted: list[bool] = []
        h.ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = BrokenPipeError(errno.EPIPE, "Broken pipe")
        t.doRead()
        self.assertEqual(aborted, [True])
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())
        h.client.connectionLost()
        proto.connectionLost()
        self.assertEqual(len(h.requests_logged()), 1)
        self.assertEqual(h.service.target.pool.idle_count, 0)

    def test_target_dies(self) -> None:
        """
        The target's connection ending mid-body: the client connection is
        aborted (a started response cannot be completed), the error
        logged.
        """
        h = self.harness()
        aborted: list[bool] = []
        h.ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.calls.source[SRC] = None
        t.doRead()
        self.assertEqual(aborted, [True])
        errors = [r for r in h.logger.records if r["msg"] == "Error while proxying"]
        self.assertEqual(errors[0]["error"], "target closed the connection mid-response")
        self.assertEqual(self.calls.open, set())

    def test_stalled_client_times_out(self) -> None:
        """
        A client that leaves the spliced body unread is dropped after the
        send timeout, as with the body in pieces; reading from the target
        pauses meanwhile.
        """
        from mproxy.http.relay import SEND_TIMEOUT

        h = self.harness()
        aborted: list[bool] = []
        h.ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.calls.source[SRC] = 100000
        self.calls.room[DST] = 0
        t.doRead()
        self.assertFalse(t.reading)
        h.reactor.advance(SEND_TIMEOUT / 2)
        # progress restarts the timeout
        self.calls.room[DST] = None
        h.ct.doWrite()
        self.assertTrue(t.reading)
        self.calls.room[DST] = 0
        self.calls.source[SRC] = 100000
        t.doRead()
        h.reactor.advance(SEND_TIMEOUT - 1)
        self.assertEqual(aborted, [])
        h.reactor.advance(1)
        self.assertEqual(aborted, [True])
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())

    def test_drain_cancel(self) -> None:
        """
        A drain's deadline under a spliced body aborts both connections and
        closes the pipe.
        """
        h = self.harness()
        aborted: list[bool] = []
        h.ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        h.get()
        proto, t = self.upstream(h)
        proto.dataReceived(head(300000) + b"a" * 20000)
        self.assertIsNotNone(proto._splice)
        proto.exchange.receiver.drain_cancel()
        self.assertEqual(aborted, [True])
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())


OK_SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
OK_SMALL_OUT = b"\r\n\r\nhello"


class BatcherSentOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.batcher = WriteBatcher(MemoryReactorClock())

    def test_pending_sent(self) -> None:
        t = FakeTCP(DST)
        self.batcher.write(t, b"abc")
        self.assertTrue(self.batcher.sent_out(t))
        self.assertEqual(t.socket.sent, [b"abc"])
        self.assertTrue(self.batcher.sent_out(t))
        self.assertEqual(t.socket.sent, [b"abc"])

    def test_partly_sent(self) -> None:
        t = FakeTCP(DST)
        t.socket.take = 1
        self.batcher.write(t, b"abc")
        self.assertFalse(self.batcher.sent_out(t))
        self.assertEqual(t.value(), b"bc")

    def test_busy_closing_or_other(self) -> None:
        t = FakeTCP(DST)
        t._tempDataLen = 1
        self.assertFalse(self.batcher.sent_out(t))
        t2 = FakeTCP(DST)
        t2.disconnecting = True
        self.assertFalse(self.batcher.sent_out(t2))
        self.assertFalse(self.batcher.sent_out(StringTransport()))


CLIENT, TARGET = DST, SRC


class UploadSpliceTests(SynchronousTestCase):
    """
    A Content-Length request body's rest of at least L{SPLICE_MIN} bytes
    goes from the client's socket to the target's by splice once the
    exchange is connected; everything around it behaves as with the body
    in pieces.
    """

    def setUp(self) -> None:
        batch.DIRECT_TYPES.add(FakeTCP)
        self.addCleanup(batch.DIRECT_TYPES.discard, FakeTCP)
        self.calls = FakeCalls()
        from mproxy.http import server

        self.patch(server, "splicer_for", lambda reactor: self.splicer)
        self.splicer = Splicer(self.calls, pipe_size=1 << 20)

    def harness(self, **options: Any) -> Any:
        h = ProxySpliceTests.harness(self, **options)  # type: ignore[arg-type]
        return h

    upstream = ProxySpliceTests.upstream
    client_bytes = ProxySpliceTests.client_bytes

    def post(self, h: Any, length: int = 300000, first: int = 20000) -> tuple[Any, FakeTCP]:
        h.send(b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n" % length
               + b"a" * first)
        proto, t = self.upstream(h)
        self.assertTrue(t.socket.sent[0].startswith(b"POST /up HTTP/1.1\r\n"))
        # the next read: the exchange is connected now
        h.send(b"b" * 1000)
        return proto, t

    def test_upload_spliced(self) -> None:
        """
        The head and the body's first pieces go to the target's socket
        before the rest is spliced; the body's end lets the response
        through and the next request is read as usual.
        """
        h = self.harness()
        h.ct.bufferSize = 262144
        proto, t = self.post(h)
        sent = b"".join(t.socket.sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n" + b"a" * 20000 + b"b" * 1000), sent[-100:])
        self.assertIsNotNone(h.client.reader.current._body_splice)
        self.assertEqual(h.ct.doRead.__name__, "_readable")
        self.calls.source[CLIENT] = 279000 + 50
        h.ct.doRead()
        self.assertEqual(self.calls.taken[TARGET], 279000)
        self.assertEqual(self.calls.source[CLIENT], 50)  # (what follows the body)
        self.assertNotIn("doRead", h.ct.__dict__)
        self.assertIsNone(h.client.reader.current)
        self.assertEqual(h.ct.bufferSize, HEAD_READ)
        proto.dataReceived(OK_SMALL)
        h.reactor.advance(0)
        self.assertTrue(self.client_bytes(h).endswith(OK_SMALL_OUT))
        self.assertEqual(h.requests_logged()[0]["status"], 200)
        # the next request on the connection
        h.send(b"GET /n HTTP/1.1\r\nHost: example.com\r\n\r\n")
        h.reactor.advance(0)
        self.assertTrue(t.socket.sent[-1].startswith(b"GET /n HTTP/1.1\r\n"))

    def test_not_connected_yet(self) -> None:
        """
        While the exchange waits for its connection the body is queued as
        pieces (nothing to splice to).
        """
        h = self.harness()
        h.send(b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 300000\r\n\r\n"
               + b"a" * 20000)
        h.send(b"b" * 1000)
        self.assertIsNone(h.client.reader.current._body_splice)
        self.assertEqual(self.calls.open, set())

    def test_buffered_request_not_spliced(self) -> None:
        h = self.harness(buffer_requests=True)
        h.send(b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 300000\r\n\r\n"
               + b"a" * 20000)
        h.send(b"b" * 1000)
        self.assertIsNone(h.client.reader.current._body_splice)
        self.assertEqual(self.calls.open, set())

    def test_backpressure_and_timeout(self) -> None:
        """
        The target's socket full: reading from the client pauses (no body
        timeout meanwhile) until it takes what waits; progress keeps the
        body timeout away.
        """
        h = self.harness()
        proto, t = self.post(h)
        self.calls.source[CLIENT] = 100000
        self.calls.room[TARGET] = 1000
        h.ct.doRead()
        self.assertFalse(h.ct.reading)
        self.assertTrue(t.writing)
        h.reactor.advance(120)
        self.assertEqual(h.requests_logged(), [])
        self.calls.room[TARGET] = None
        t.doWrite()
        self.assertTrue(h.ct.reading)
        self.assertFalse(t.writing)
        self.calls.source[CLIENT] = 179000
        h.ct.doRead()
        self.assertEqual(self.calls.taken[TARGET], 279000)
        self.assertIsNone(h.client.reader.current)

    def test_client_gone(self) -> None:
        """
        The client's socket at its end mid-body: the client connection is
        aborted, its loss abandons the exchange (the target connection
        aborted too).
        """
        h = self.harness()
        aborted: list[bool] = []
        h.ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        proto, t = self.post(h)
        self.calls.source[CLIENT] = None
        h.ct.doRead()
        self.assertEqual(aborted, [True])
        self.assertEqual(self.calls.open, set())
        h.client.connectionLost()
        self.assertTrue(t.aborted)
        self.assertEqual(h.requests_logged()[0]["status"], 499)

    def test_target_fails(self) -> None:
        """
        The target's socket failing mid-body: the target connection is
        aborted, the client gets the 502 page (the body was streamed: the
        request is not sent again).
        """
        h = self.harness()
        proto, t = self.post(h)
        self.calls.source[CLIENT] = 100000
        self.calls.room[TARGET] = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        h.ct.doRead()
        self.assertTrue(t.aborted)
        self.assertEqual(self.calls.open, set())
        self.assertNotIn("doRead", h.ct.__dict__)
        proto.connectionLost()
        h.reactor.advance(0)
        self.assertIn(b"HTTP/1.1 502 ", self.client_bytes(h))
        self.assertEqual(h.connected, 1)

    def test_early_response(self) -> None:
        """
        The target answering before the body's end: the splice stops (the
        connection reads, and drops, the rest itself), the response goes
        to the client.
        """
        h = self.harness()
        proto, t = self.post(h)
        self.calls.source[CLIENT] = 1000
        h.ct.doRead()
        proto.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        h.reactor.advance(0)
        self.assertIn(b"HTTP/1.1 413 Too Large", self.client_bytes(h))
        self.assertEqual(self.calls.open, set())
        self.assertNotEqual(getattr(h.ct.doRead, "__name__", ""), "_readable")

    def test_early_response_while_stalled(self) -> None:
        """
        An early response while the target's socket is full: reading from
        the client goes on (the connection reads and drops the rest of
        the body before it closes).
        """
        h = self.harness()
        proto, t = self.post(h)
        self.calls.source[CLIENT] = 100000
        self.calls.room[TARGET] = 10
        h.ct.doRead()
        self.assertFalse(h.ct.reading)
        proto.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(h.ct.reading)
        self.assertNotIn("doWrite", t.__dict__)
        self.assertEqual(self.calls.open, set())
