# -*- test-case-name: tests.test_upstream,tests.test_upstream_handoff -*-
"""
A small HTTP/1.1 client for talking to targets, with a keep-alive pool per
target.

    pool = UpstreamPool(reactor, "10.0.0.5", 3000, *, max_idle=100,
                        idle_reuse_limit=50.0, max_connecting=8)
    exchange = pool.request(b"GET", b"/path?q", headers, receiver, *,
                            body_length=0, timeout=30.0, fresh=False,
                            replay=None)
    pool.close_idle()   # close idle keep-alive connections (drained target)
    pool.close()        # and no new ones; busy ones close when done

C{headers} is a list of C{(name, value)} byte pairs sent as given (the
caller adds Host, Content-Length, ...).  C{body_length} is 0 (no body), the
declared Content-Length, or -1 for a body of unknown length (sent chunked;
the caller must not include framing headers then; C{codings}, e.g.
C{b"gzip"}, are transfer codings the body already has, sent before
C{chunked}).  The body is streamed
with L{UpstreamExchange.write_body} / L{UpstreamExchange.end_body}.

The C{receiver} gets (duck-typed callbacks, called from the reactor):

    - C{upstream_informational(status: int, headers)} for 1xx other than 101;
    - C{upstream_response(status: int, reason: bytes, headers)} once;
    - C{upstream_data(data: bytes)} for each body piece (after a 101: each
      piece of the tunnelled stream); a receiver whose C{takes_views} is
      true may get a large piece as a memoryview of the read it came in
      (L{mproxy.http.rawbody});
    - optionally, for a Content-Length body's rest that may go from the
      target's socket to the client's by splice(2) (L{mproxy.http.splice}):
      C{splice_transport()} gives the client's plain TCP transport once
      everything written to it is in its socket (else C{None}: the body
      goes on as pieces), C{spliced(n)} counts the bytes that went,
      C{pauseProducing()} / C{resumeProducing()} are called as the
      client's socket fills and empties, C{splice_broken()} when the
      client's socket failed (abort the client connection);
    - C{upstream_done(trailers: list | None)} when the body is complete
      (after a 101: when the target closes the tunnel);
    - C{upstream_failed(error: UpstreamError)} instead of the rest when the
      exchange fails: C{error.status} is 502 (connect failure, protocol
      error, a status code outside 100-599, connection lost) or 504 (C{timeout} passed while waiting for
      the response headers, or the connect timed out).  Its C{kind} says
      whether the request could be sent again: L{NOT_CONNECTED} (the
      connection could not be made: nothing was sent), L{CLOSED} (the
      connection was closed or reset before any byte of the response; its
      C{reused} says whether it was a re-used keep-alive connection), or
      C{""} (anything else).

C{timeout} bounds the connect and the wait for the response headers after
the request was fully written, never the body.  The pool never sends a
request twice: whether a failed one is sent again (and where) is the
caller's decision.  C{fresh=True} dials a new connection instead of
re-using an idle one; C{replay} is an exchange of the same request whose
connect failed: what it queued of the body (and its end) is sent first, so
a streamed body can go to another target as long as nothing of it was sent.

The exchange is an C{IPushProducer} for the response body: register it
with the client transport to get backpressure.  The request body's
producer is given with L{UpstreamExchange.set_body_producer} and is paused
while the target's socket is full.

Connections are dialled with C{reactor.connectTCP} (names resolved by the
reactor, IPv6 literals accepted).  A request that finds no idle connection
waits for one, oldest first: its own connect, started at once while fewer
than C{max_connecting} (L{MAX_CONNECTING}) are in progress to the target,
or the first connection released in the meantime (a response ended), or
another request's connect made (a burst then needs far fewer new
connections).  A connect whose request was served by another connection
goes on for the next waiting request, else as a spare: taken over by the
next request that finds no idle connection, or made and kept idle (closed
when C{max_idle} are idle).  A request only fails on a connect made for it
(a failed connect it took over is replaced by its own) or once it waited
its whole connect timeout without a connection (a 504, as a connect timing
out).  C{fresh} requests always connect at once, for themselves.
C{close_idle} also stops the spare connects; after C{close} nothing is
handed on and the waiting requests all connect.  Idle connections older than
C{idle_reuse_limit}, or close to the idle timeout the target announced
(C{Keep-Alive: timeout=N}: not re-used after N minus a margin of a tenth of
N, at least 0.5 s), are closed instead of re-used, so the target rarely
closes a connection just as a request is sent on it; response header
sections over 1 MiB are a 502.

L{PoolRegistry} is the pool factory targets use: C{registry(host, port)}
makes a pool and remembers it so that C{registry.close_idle()} can close
every idle connection at shutdown.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import httptools
from twisted.internet import error as _error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mproxy.http.batch import DIRECT_TYPES, SEND_NOW, batcher_for
from mproxy.http.interfaces import IUpstreamExchange, IUpstreamPool
from mproxy.http.rawbody import RawBody, head_end
from mproxy.http.reads import HEAD_READ, READ_GROW_AT, body_read_size, grown_size
from mproxy.http.request import header_lines
from mproxy.http.splice import SPLICE_MIN, ISpliceHandler, SpliceRelay, splicer_for
from mproxy.http.whole import keep_alive_timeout as _keep_alive_timeout
from mproxy.http.whole import parse_head, parse_whole


MAX_PENDING_BODY = 65536
#: connects in progress to one target at most; more requests wait for one
#: of them, or for a busy connection to be released
MAX_CONNECTING = 8
#: idle connections older than this are not reused (servers drop them)
IDLE_REUSE_LIMIT = 50.0
#: an announced keep-alive timeout is cut by this share, at least
#: L{KEEP_ALIVE_MIN_MARGIN} seconds
KEEP_ALIVE_MARGIN = 0.1
KEEP_ALIVE_MIN_MARGIN = 0.5

#: L{UpstreamError.kind}: the connection could not be made
NOT_CONNECTED = "not-connected"
#: L{UpstreamError.kind}: closed or reset before any byte of the response
CLOSED = "closed"


class UpstreamError(Exception):
    """
    An exchange with a target failed.

    @ivar status: the status the proxy should answer with (502 or 504).
    @ivar kind: L{NOT_CONNECTED}, L{CLOSED} or C{""} (see the module
        docstring).
    @ivar reused: for L{CLOSED}, the connection was a re-used keep-alive one.
    """

    def __init__(self, status: int, message: str, kind: str = "",
                 reused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.reused = reused


class _HeadDone(Exception):
    pass


class _BadResponse(Exception):
    pass


#: largest response header section accepted from a target
MAX_RESPONSE_HEADER_BYTES = 1 << 20


def _hex(n: int) -> bytes:
    return b"%x\r\n" % n


@implementer(IUpstreamExchange)
class UpstreamExchange:
    """
    One request to a target.  See the module docstring.
    """

    conn: _Connection | None = None
    connector: Any = None
    #: when it began waiting for a connection (none was idle)
    since = 0.0
    body_producer: Any = None
    responded = False
    tunnel = False
    _pending_bytes = 0

    def __init__(self, pool: UpstreamPool, method: bytes, head: bytes, receiver: Any,
                 body_length: int, timeout: float) -> None:
        self.pool = pool
        self.method = method
        self.head = head
        self.receiver = receiver
        self.body_length = body_length
        self.chunked = body_length < 0
        self.body_ended = body_length == 0
        self.timeout = timeout
        self.pending: list[bytes] | None = None
        # (read for every request: an instance's own attribute reads
        # faster than a class's default)
        self.done = False
        self._producer_paused = False

    def _take_over(self, old: UpstreamExchange) -> None:
        """
        Go on with the body of C{old}, an exchange of the same request that
        never connected: its queued bytes, its end, its producer.
        """
        self.pending = old.pending
        self._pending_bytes = old._pending_bytes
        self.body_ended = old.body_ended
        self.body_producer = old.body_producer
        self._producer_paused = old._producer_paused
        old.pending = None
        old._producer_paused = False

    # --- request body -------------------------------------------------------

    def set_body_producer(self, producer: Any) -> None:
        """
        C{producer} (an IPushProducer) is paused while the target cannot
        take more of the request body.
        """
        self.body_producer = producer
        conn = self.conn
        if conn is not None and not self.body_ended:
            conn._register_body_producer(producer)

    def set_tunnel_producer(self, producer: Any) -> None:
        """
        After a 101: C{producer} (the client side) is paused while the
        target cannot take more of the tunnelled stream.
        """
        conn = self.conn
        if conn is not None:
            conn._register_body_producer(producer)

    def write_body(self, data: bytes) -> None:
        if self.done or self.body_ended or not data:
            return
        if self.chunked:
            conn = self.conn
            if conn is not None and len(data) >= SEND_NOW:
                # a large chunk goes out with its framing, not joined to it
                conn.pool.batcher.write_pieces(conn.transport, (_hex(len(data)), data, b"\r\n"))
                return
            data = _hex(len(data)) + data + b"\r\n"
        self._write(data)

    def write_raw(self, data: bytes) -> None:
        """
        Send bytes as they are (tunnels).
        """
        if self.done or not data:
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.pool.batcher.write(conn.transport, data)
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > MAX_PENDING_BODY and self.body_producer is not None:
            self._producer_paused = True
            self.body_producer.pauseProducing()

    def body_splice_transport(self) -> Any:
        """
        The connection's transport, when the rest of a Content-Length
        request body may go to its socket by splice: the exchange is
        connected, no response came yet, the transport is plain TCP and
        everything written to it is in its socket; else C{None}.
        """
        conn = self.conn
        if (conn is None or self.done or self.chunked or self.body_ended or self.responded
                or conn.lost or conn._splice is not None):
            return None
        t = conn.transport
        if type(t) not in DIRECT_TYPES or not conn.pool.batcher.sent_out(t):
            return None
        return t

    def end_body(self) -> None:
        if self.done or self.body_ended:
            return
        self.body_ended = True
        if self.chunked:
            self._write(b"0\r\n\r\n")
        conn = self.conn
        if conn is not None:
            producer = conn._body_producer
            conn._unregister_body_producer()
            if producer is not None:
                # the transport may have paused it (and never resumes a
                # producer it no longer holds): the client's reading must
                # not stay paused for a body that is all sent
                producer.resumeProducing()
            if not self.responded:
                self._arm_timer()

    def _take_pending(self) -> bytes:
        p = self.pending
        if not p:
            return b""
        self.pending = None
        self._pending_bytes = 0
        return b"".join(p)

    def _resume_body(self) -> None:
        """
        The connection is up and what was queued is written: let the body
        producer go on (if queueing had paused it).
        """
        if self._producer_paused:
            self._producer_paused = False
            self.body_producer.resumeProducing()

    # --- timing -------------------------------------------------------------

    def _arm_timer(self) -> None:
        conn = self.conn
        if self.timeout and conn is not None:
            conn.arm(self.timeout)

    def _disarm_timer(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.armed = False

    def _timed_out(self) -> None:
        if self.done or self.responded:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            conn.transport.abortConnection()
        self._fail(504, "target timed out waiting for response headers")

    # --- outcome ------------------------------------------------------------

    def _response(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.responded = True
        conn = self.conn
        if conn is not None:
            conn.armed = False
        self.receiver.upstream_response(status, reason, headers)

    def _fail(self, status: int, message: str, kind: str = "", reused: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._disarm_timer()
        self.receiver.upstream_failed(UpstreamError(status, message, kind, reused))

    def _finished(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.done:
            return
        self.done = True
        self._disarm_timer()
        self.receiver.upstream_done(trailers)

    def cancel(self) -> None:
        """
        Abandon the exchange: the connection (or the connect attempt) is
        aborted and the receiver hears nothing more.
        """
        if self.done:
            return
        self.done = True
        self._disarm_timer()
        pool = self.pool
        if pool._waiting and pool._unwait(self):
            self.connector = None  # (its connect went on for another request)
        c = self.connector
        if c is not None:
            self.connector = None
            try:
                c.stopConnecting()
            except _error.NotConnectingError:
                pass
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn._stop_splice()
            conn.transport.abortConnection()

    def close(self) -> None:
        """
        End a tunnel gracefully: what was written is still delivered.
        """
        if self.done:
            return
        self.done = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.pool.batcher.flush_transport(conn.transport)
            conn.transport.loseConnection()

    # --- IPushProducer (response direction) -----------------------------------

    def pauseProducing(self) -> None:
        conn = self.conn
        if conn is not None and not conn.paused:
            conn.paused = True
            conn.transport.pauseProducing()

    def resumeProducing(self) -> None:
        conn = self.conn
        if conn is not None and conn.paused:
            conn.paused = False
            conn.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()


class _Connection(Protocol):
    """
    One connection to the target.  Its response-header timer is one
    DelayedCall, left to fire harmlessly when disarmed: arming it for a
    request only sets the deadline (the DelayedCall is moved only when the
    deadline comes before it, and set again for the rest when it fires
    before the deadline), so a request costs no timer update.
    """

    exchange: UpstreamExchange | None = None
    timer: Any = None
    armed = False
    deadline = 0.0
    _timer_at = 0.0
    _pending: UpstreamExchange | None = None
    tunnel = False
    paused = False
    reused = False
    idle_until = 0.0
    keep_alive = 0.0
    lost = False
    _begun = False
    _info = False
    _in_body = False
    _body_producer: Any = None
    #: the response's Content-Length value (None: another framing), the
    #: body bytes the parser delivered, and once the rest of the body
    #: bypasses the parser (L{_raw}) whether the connection is kept after it
    #: and whether the parser saw nothing of the response (its head was
    #: parsed at once)
    _length: bytes | None = None
    _body_seen = 0
    _raw_keep_alive = False
    _raw_unparsed = False
    #: the connection's read size, grown while reads fill it (0: the
    #: transport's); its C{bufferSize} is this, or a body's rest
    _reads = 0
    #: the body's rest on its way to the client by splice (L{_try_splice})
    _splice: SpliceRelay | None = None

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        # (read for every request: an instance's own attributes read
        # faster than the class's defaults)
        self.lost = False
        self.tunnel = False
        self.paused = False
        self.keep_alive = 0.0
        self._body_producer = None
        self.parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._framed = False
        self._raw = RawBody(self._raw_piece, self._raw_ended, self._raw_failed)
        self._splice = None

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        ex, self._pending = self._pending, None
        pool = self.pool
        if ex is None or ex.done:
            # a spare connect: the request it was made for is served
            pool._release(self, reused=False)
        else:
            ex.connector = None
            pool._waiting.pop(ex, None)
            self.start(ex, reused=False)
        if pool._unconnected:
            pool._connect_next()

    def start(self, ex: UpstreamExchange, reused: bool) -> None:
        self.exchange = ex
        self.reused = reused
        ex.conn = self
        self.pool._busy.add(self)
        self._in_body = False
        self._info = False
        self._begun = False
        data = ex.head
        if ex.pending:
            data += ex._take_pending()
        self.pool.batcher.write(self.transport, data)
        if ex.body_ended:
            if ex._producer_paused:
                # a body queued whole while connecting paused its producer
                ex._resume_body()
            ex._arm_timer()
        elif ex.body_producer is not None:
            self._register_body_producer(ex.body_producer)
            ex._resume_body()

    def arm(self, timeout: float) -> None:
        self.armed = True
        reactor = self.pool.reactor
        deadline = self.deadline = reactor.seconds() + timeout
        t = self.timer
        if t is None:
            self.timer = reactor.callLater(timeout, self._timer_fired)
            self._timer_at = deadline
        elif self._timer_at > deadline:
            t.reset(timeout)
            self._timer_at = deadline

    def _timer_fired(self) -> None:
        self.timer = None
        if not self.armed:
            return
        reactor = self.pool.reactor
        rest = self.deadline - reactor.seconds()
        if rest > 0:
            # (at least a millisecond: never early, never a busy loop)
            self.timer = reactor.callLater(max(rest, 0.001), self._timer_fired)
            self._timer_at = self.deadline
            return
        self.armed = False
        ex = self.exchange
        if ex is not None:
            ex._timed_out()

    def _register_body_producer(self, producer: Any) -> None:
        if self._body_producer is None:
            self._body_producer = producer
            self.transport.registerProducer(producer, True)

    def _unregister_body_producer(self) -> None:
        if self._body_producer is not None:
            self._body_producer = None
            self.transport.unregisterProducer()

    # --- parser callbacks -----------------------------------------------------

    _head_bytes = 0
    _raw_head_bytes = 0
    _head_keep_alive = False

    def on_message_begin(self) -> None:
        self._begun = True
        self._reason = b""
        self._headers = []
        self._trailers = None
        self._framed = False
        self._head_bytes = 0
        self._raw_head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_RESPONSE_HEADER_BYTES:
            raise ValueError("response headers too large")
        if self._in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise _BadResponse(f"invalid status code {status} from target")
        headers = self._headers
        if 100 <= status < 200 and status != 101:
            self._info = True
            if ex is not None:
                ex.receiver.upstream_informational(status, headers)
            return
        self._info = False
        self._in_body = True
        self._body_seen = 0
        length = None
        for name, value in headers:
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                self._framed = True
                length = value
            elif n == 17 and name.lower() == b"transfer-encoding":
                self._framed = True
                length = b""  # chunked: never bypasses the parser
            elif n == 10 and name.lower() == b"keep-alive":
                self.keep_alive = _keep_alive_timeout(value)
        self._length = length or None
        if status == 101:
            self.tunnel = True
            if ex is not None:
                ex.tunnel = True
        if ex is not None:
            ex._response(status, self._reason, headers)
        if ex is not None and ex.method == b"HEAD" and not self.tunnel:
            self._head_keep_alive = self.parser.should_keep_alive()
            raise _HeadDone()

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        ex = self.exchange
        if ex is not None:
            ex.receiver.upstream_data(data)

    def on_message_complete(self) -> None:
        if self._info:
            self._info = False
            return
        if self.tunnel:
            return
        self._complete(self.parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        self._in_body = False
        ex = self.exchange
        self.exchange = None
        if ex is None:
            self.transport.loseConnection()
            return
        ex.conn = None
        self._unregister_body_producer()
        if keep_alive and ex.body_ended and not self.lost:
            if self.paused:
                self.paused = False
                self.transport.resumeProducing()
            self.pool._release(self)
        else:
            self.pool._busy.discard(self)
            self.transport.loseConnection()
        ex._finished(self._trailers)

    # --- transport ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        ex = self.exchange
        if self.tunnel:
            if ex is not None:
                ex.receiver.upstream_data(data)
            return
        if ex is None:
            # nothing was asked: a broken or closing server
            self.transport.abortConnection()
            return
        if not self._in_body:
            if not self._begun and ex.method != b"HEAD":
                parsed = parse_whole(data)
                if parsed is not None:
                    self._whole(ex, parsed)
                    return
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > 2 * MAX_RESPONSE_HEADER_BYTES:
                self._broken("response headers too large")
                return
            if ex.method != b"HEAD":
                end = head_end(data)
                if end:
                    self._head_then_body(ex, data, end)
                    self._size_reads(len(data))
                    return
        else:
            raw = self._raw
            if raw.left or (self._length is not None and self._start_raw()):
                rest = raw.take(data)
                if rest:
                    # bytes after the response, which nothing asked for
                    self.dataReceived(rest)
                elif raw.left >= SPLICE_MIN and self._try_splice():
                    return
                self._size_reads(len(data))
                return
            if len(data) >= READ_GROW_AT:
                self._size_reads(len(data))
        self._feed(data)

    def _size_reads(self, n: int) -> None:
        """
        After a read of C{n} bytes of a response: a read that filled the
        connection's read size doubles it (up to L{MAX_READ}), and while
        a Content-Length body bypasses the parser its rest is read whole
        when it is a little more than that size (L{body_read_size}).
        Transports without a C{bufferSize} (in-memory) are left alone.
        """
        t = self.transport
        current = getattr(t, "bufferSize", None)
        if current is None:
            return
        self._reads = size = grown_size(self._reads or current, n)
        left = self._raw.left
        if left:
            size = body_read_size(size, left)
        if current != size:
            t.bufferSize = size

    def _feed(self, data: bytes | memoryview, whole: bytes = b"") -> None:
        """
        Give C{data} to the parser (C{whole}: the read C{data} starts, if
        it is only a part of it).
        """
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = (whole or data)[e.args[0]:]
            ex = self.exchange
            if rest and ex is not None:
                ex.receiver.upstream_data(bytes(rest))
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadDone):
                self.parser = httptools.HttpResponseParser(self)
                self._complete(self._head_keep_alive)
            elif isinstance(e.__context__, _BadResponse):
                self._broken(str(e.__context__))
            else:
                self._broken(f"error handling response: {e.__context__!r}")
        except httptools.HttpParserError as e:
            self._broken(f"malformed response from target: {e}")

    def _head_then_body(self, ex: UpstreamExchange, data: bytes, end: int) -> None:
        """
        A read that starts with a head (ending at C{end}) and goes on with
        its Content-Length body: the parser gets the head alone, the
        body's part of the read bypasses it as it is (no copy).
        """
        view = memoryview(data)
        if not self._begun:
            e = parse_head(data[:end - 4])
            if e is not None and e[3]:
                self._head_parsed(ex, e, view[end:])
                return
        self._feed(view[:end], data)
        if self.lost or self.tunnel:
            # failed (the rest is dropped), or a tunnel (the rest went in)
            return
        if (self.exchange is ex and self._in_body and self._length is not None
                and self._start_raw()):
            rest = self._raw.take(view[end:])
            if rest:
                self.dataReceived(rest)
            elif self._raw.left >= SPLICE_MIN:
                self._try_splice()
            return
        self.dataReceived(data[end:])

    def _parsed_at_once(self, reason: bytes, headers: Any, body_seen: int,
                        ka: bool | None) -> None:
        """
        The state the parser's callbacks would have left after a final
        response head with a Content-Length, for a head parsed without it
        (C{body_seen} of its body bytes already in hand).
        """
        self._begun = True
        self._reason = reason
        self._headers = headers
        self._trailers = None
        self._framed = True
        self._info = False
        self._in_body = True
        self._length = None
        self._body_seen = body_seen
        if ka is not None:
            self.keep_alive = ka

    def _head_parsed(self, ex: UpstreamExchange, parsed: tuple[Any, ...],
                     body: memoryview) -> None:
        """
        A head parsed at once (L{parse_head}), the start of its body in
        C{body}: the receiver hears what the parser's callbacks would have
        told it, the body goes on without the parser.
        """
        status, reason, headers, length, ka = parsed
        self._parsed_at_once(reason, headers, 0, ka)
        self._head_bytes = self._raw_head_bytes = 0
        try:
            ex._response(status, reason, headers)
        except Exception as e:
            # as the parser reports a failing callback
            self._broken(f"error handling response: {e!r}")
            return
        if self.exchange is not ex:
            return  # cancelled
        # (an HTTP/1.1 head without Connection: close)
        self._raw_keep_alive = True
        self._raw_unparsed = True
        self._raw.start(length, getattr(ex.receiver, "takes_views", False))
        rest = self._raw.take(body)
        if rest:
            self.dataReceived(rest)
        elif self._raw.left >= SPLICE_MIN:
            self._try_splice()

    def _whole(self, ex: UpstreamExchange, parsed: tuple[Any, ...]) -> None:
        """
        A whole response parsed at once (L{parse_whole}): the receiver hears
        what the parser's callbacks would have told it, in the same order.
        """
        status, reason, headers, body, ka = parsed
        self._parsed_at_once(reason, headers, len(body), ka)
        try:
            ex._response(status, reason, headers)
            if body:
                ex = self.exchange  # type: ignore[assignment]
                if ex is not None:
                    ex.receiver.upstream_data(body)
            self._complete(True)
        except Exception as e:
            # as the parser reports a failing callback
            self._broken(f"error handling response: {e!r}")

    def _start_raw(self) -> bool:
        """
        The response's head was parsed, its Content-Length body is not
        complete yet: the rest bypasses the parser (which copies every
        piece it delivers) from now on; C{False} if it cannot.
        """
        length, self._length = self._length, None
        try:
            left = int(length) - self._body_seen  # type: ignore[arg-type]
        except ValueError:
            return False
        ex = self.exchange
        if left <= 0 or ex is None or ex.method == b"HEAD":
            return False
        self._raw.start(left, getattr(ex.receiver, "takes_views", False))
        self._raw_keep_alive = self.parser.should_keep_alive()
        self._raw_unparsed = False
        return True

    def _raw_piece(self, data: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.receiver.upstream_data(data)

    def _raw_ended(self) -> None:
        if self._raw_unparsed:
            self._raw_unparsed = False
        else:
            # a fresh parser for the connection's next response
            self.parser = httptools.HttpResponseParser(self)
        if self.exchange is not None:
            self._complete(self._raw_keep_alive)

    def _raw_failed(self, e: Exception) -> None:
        # as the parser reports a failing callback
        self._broken(f"error handling response: {e!r}")

    # --- the body's rest by splice ----------------------------------------------

    def _try_splice(self) -> bool:
        """
        The rest of a Content-Length body (at least L{SPLICE_MIN} bytes, all
        still in the target's socket) goes to the client's socket by
        splice (L{mproxy.http.splice}) when both ends are plain TCP
        sockets and the receiver passes the body on unchanged (its
        C{splice_transport()} gives the client's transport once everything
        written to it is in its socket); C{False}: it goes on as before.
        """
        splicer = self.pool.splicer
        ex = self.exchange
        if splicer is None or ex is None or self.lost or self.tunnel:
            return False
        t = self.transport
        if type(t) not in DIRECT_TYPES or t.disconnecting or t._aborting:
            return False
        target = getattr(ex.receiver, "splice_transport", None)
        if target is None:
            return False
        sink = target()
        if sink is None:
            return False
        relay = splicer.start(t, sink, self._raw.left, _SpliceHandler(self, ex))
        if relay is None:
            return False
        self._splice = relay
        return True

    def _stop_splice(self) -> None:
        relay = self._splice
        if relay is not None:
            self._splice = None
            relay.stop()

    def _abandon(self) -> UpstreamExchange | None:
        """
        Abort this connection (never re-used) and detach its exchange,
        which is returned for its caller to fail.
        """
        ex = self.exchange
        self.exchange = None
        self.lost = True
        self.transport.abortConnection()
        if ex is not None:
            ex.conn = None
        return ex

    def _broken(self, message: str) -> None:
        self._stop_splice()
        ex = self._abandon()
        if ex is not None:
            ex._fail(502, message)

    def connectionLost(self, reason: Failure = Failure(_error.ConnectionDone())) -> None:
        self._stop_splice()
        self.lost = True
        self.armed = False
        t = self.timer
        if t is not None:
            self.timer = None
            if t.active():
                t.cancel()
        self.pool._lost(self)
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        ex.conn = None
        if self.tunnel:
            ex._finished(None)
            return
        if self._in_body:
            if not self._framed and reason.check(_error.ConnectionDone):
                # a close-delimited body ends with a clean close; a reset
                # (or any other error) may have cut it short
                ex._finished(self._trailers)
            else:
                ex._fail(502, "target closed the connection mid-response")
            return
        if not ex.responded and not self._info and not self._begun:
            ex._fail(502, "target closed the connection: " + reason.getErrorMessage(),
                     CLOSED, self.reused)
            return
        ex._fail(502, "target closed the connection: " + reason.getErrorMessage())


@implementer(ISpliceHandler)
class _SpliceHandler:
    """
    What a connection hears from the splice relay of its response's body
    (L{_Connection._try_splice}), for exchange C{ex}: the receiver's
    C{spliced(n)} counts the bytes sent, the client's socket filling up
    pauses the exchange as a full client transport does (the receiver's
    C{pauseProducing}, which stops reading from the target and starts its
    send timeout), its end completes the response as the last body piece
    would, a target failing mid-body is a broken response (502: the client
    connection is aborted), a client failing aborts the target connection
    and, through the receiver's C{splice_broken()}, the client's.
    """

    __slots__ = ("conn", "ex")

    def __init__(self, conn: _Connection, ex: UpstreamExchange) -> None:
        self.conn = conn
        self.ex = ex

    def sent(self, n: int) -> None:
        self.ex.receiver.spliced(n)

    def stalled(self) -> None:
        self.ex.receiver.pauseProducing()

    def flowing(self) -> None:
        self.ex.receiver.resumeProducing()

    def ended(self) -> None:
        conn = self.conn
        conn._splice = None
        conn._raw.left = 0
        t = conn.transport
        if t.bufferSize > HEAD_READ:
            # the next response's head, and no more than a small body
            # with it: a large body's rest is spliced
            t.bufferSize = HEAD_READ
        conn._raw_ended()

    def source_failed(self, message: str) -> None:
        conn = self.conn
        conn._splice = None
        conn._broken(message)

    def sink_failed(self, message: str) -> None:
        conn = self.conn
        conn._splice = None
        ex = conn._abandon()
        if ex is not None:
            ex.receiver.splice_broken()


class _ConnectFactory(ClientFactory):
    """
    One connect, made for C{exchange}.  When that request is served by
    another connection first, the connect goes on for another waiting
    request (which takes it over: C{adopted}) or as the pool's spare
    (C{exchange} is C{None}), for the next request or the idle set.
    """

    noisy = False
    connector: Any = None
    #: not connected nor failed yet (counted in the pool's connects)
    pending = True
    #: C{exchange} took this connect over: it was not made for it
    adopted = False

    def __init__(self, pool: UpstreamPool, exchange: UpstreamExchange) -> None:
        self.pool = pool
        self.exchange: UpstreamExchange | None = exchange

    def buildProtocol(self, addr: Any) -> _Connection:
        pool = self.pool
        if self.pending:
            self.pending = False
            pool._connecting -= 1
        c = _Connection(pool)
        ex = c._pending = self.exchange
        if ex is None:
            pool._spare.pop(self, None)
        # the connector keeps its factory as long as the connection lasts:
        # it must not keep the connection's first request alive with it
        self.exchange = None
        self.connector = None
        return c

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.pending:
            return
        self.pending = False
        self.connector = None
        pool = self.pool
        pool._connecting -= 1
        ex = self.exchange
        self.exchange = None
        if ex is None:
            # a spare connect: no request is waiting for it
            pool._spare.pop(self, None)
            pool._connect_next()
            return
        ex.connector = None
        if not ex.done and self.adopted and not pool.closed:
            # a connect the request took over, not its own: it gets one
            # for the rest of its connect timeout
            left = (ex.timeout or 30) - (pool.reactor.seconds() - ex.since)
            if left > 0:
                pool._waiting[ex] = pool._connect(ex, left)
                return
        pool._waiting.pop(ex, None)
        pool._connect_next()
        if ex.done:
            return
        if reason.check(_error.TimeoutError):
            ex._fail(504, f"timed out connecting to {pool.address}", NOT_CONNECTED)
        else:
            ex._fail(502, f"unable to connect to {pool.address}: {reason.getErrorMessage()}",
                     NOT_CONNECTED)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass


@implementer(IUpstreamPool)
class UpstreamPool:
    """
    Keep-alive connections to one target.

    @ivar address: C{host:port}, for messages.
    """

    def __init__(self, reactor: Any, host: str, port: int, *, max_idle: int = 100,
                 idle_reuse_limit: float = IDLE_REUSE_LIMIT,
                 max_connecting: int = MAX_CONNECTING) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_idle = max_idle
        self.idle_reuse_limit = idle_reuse_limit
        self.max_connecting = max_connecting
        self.closed = False
        self.batcher = batcher_for(reactor)
        #: relays Content-Length bodies' rests by splice (None: not here)
        self.splicer = splicer_for(reactor)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        #: requests waiting for a connection, oldest first, each with the
        #: connect it waits for (C{None}: none yet, L{_unconnected})
        self._waiting: OrderedDict[UpstreamExchange, _ConnectFactory | None] = OrderedDict()
        #: the waiting requests without a connect, oldest first
        self._unconnected: OrderedDict[UpstreamExchange, None] = OrderedDict()
        #: connects whose request was served by another connection
        self._spare: OrderedDict[_ConnectFactory, None] = OrderedDict()
        #: connects in progress
        self._connecting = 0
        self._queue_timer: Any = None

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                receiver: Any, *, body_length: int = 0, timeout: float = 30.0,
                codings: bytes = b"", fresh: bool = False,
                replay: UpstreamExchange | None = None) -> UpstreamExchange:
        """
        Start a request; see the module docstring.
        """
        end = b"\r\n"
        if body_length < 0:
            if codings:
                end = b"Transfer-Encoding: " + codings + b", chunked\r\n\r\n"
            else:
                end = b"Transfer-Encoding: chunked\r\n\r\n"
        head = b"%s %s HTTP/1.1\r\n%s%s" % (method, target, header_lines(headers), end)
        ex = UpstreamExchange(self, method, head, receiver, body_length, timeout)
        if replay is not None:
            ex._take_over(replay)
        self._dispatch(ex, fresh)
        return ex

    def _dispatch(self, ex: UpstreamExchange, fresh: bool = False) -> None:
        idle = self._idle
        if idle and not fresh:
            now = self.reactor.seconds()
            while idle:
                conn = idle.pop()
                if conn.lost:
                    continue
                if conn.idle_until < now:
                    conn.transport.loseConnection()
                    continue
                conn.start(ex, reused=True)
                return
        if self.closed:
            ex._fail(502, "target removed")
            return
        if fresh:
            self._connect(ex, ex.timeout or 30)
            return
        ex.since = self.reactor.seconds()
        spare = self._spare
        if spare:
            # a connect made for a request already served: take it over
            # rather than start one more
            f, _ = spare.popitem(last=False)
            self._adopt(f, ex)
        elif self._connecting < self.max_connecting:
            self._waiting[ex] = self._connect(ex, ex.timeout or 30)
        else:
            # enough connects are under way: the first of them made, or of
            # the busy connections released, serves it
            self._waiting[ex] = None
            self._unconnected[ex] = None
            if self._queue_timer is None:
                self._queue_timer = self.reactor.callLater(ex.timeout or 30,
                                                           self._queue_expired)

    def _connect(self, ex: UpstreamExchange, timeout: float) -> _ConnectFactory:
        self._connecting += 1
        f = _ConnectFactory(self, ex)
        ex.connector = f.connector = self.reactor.connectTCP(self.host, self.port, f,
                                                             timeout=timeout)
        return f

    def _adopt(self, f: _ConnectFactory, ex: UpstreamExchange) -> None:
        """
        C{ex} waits for the connect C{f}, made for another request.
        """
        f.exchange = ex
        f.adopted = True
        ex.connector = f.connector
        self._waiting[ex] = f

    def _free(self, f: _ConnectFactory) -> None:
        """
        The request the connect C{f} was for is served (or gone): the
        oldest request waiting without a connect takes it over, else it
        goes on as a spare.
        """
        f.exchange = None
        unconnected = self._unconnected
        while unconnected:
            ex, _ = unconnected.popitem(last=False)
            if not ex.done and ex in self._waiting:
                self._adopt(f, ex)
                return
        self._spare[f] = None

    def _unwait(self, ex: UpstreamExchange) -> bool:
        """
        C{ex} no longer waits (abandoned); C{True} if the connect it waited
        for goes on for another request.
        """
        if ex not in self._waiting:
            return False
        f = self._waiting.pop(ex)
        if f is None:
            self._unconnected.pop(ex, None)
            return False
        if self._unconnected:
            self._free(f)
            return True
        return False

    def _connect_next(self) -> None:
        """
        Connects for the oldest requests waiting without one, as far as
        L{max_connecting} allows (any number once the pool is closed: no
        connection is handed on then).
        """
        unconnected = self._unconnected
        waiting = self._waiting
        now = -1.0
        while unconnected and (self._connecting < self.max_connecting or self.closed):
            ex, _ = unconnected.popitem(last=False)
            if ex.done or ex not in waiting:
                continue
            if now < 0:
                now = self.reactor.seconds()
            left = (ex.timeout or 30) - (now - ex.since)
            if left <= 0:
                del waiting[ex]
                ex._fail(504, f"timed out connecting to {self.address}", NOT_CONNECTED)
                continue
            waiting[ex] = self._connect(ex, left)

    def _queue_expired(self) -> None:
        """
        Requests that waited their whole connect timeout without getting a
        connect fail as a connect timing out would.
        """
        self._queue_timer = None
        unconnected = self._unconnected
        waiting = self._waiting
        now = self.reactor.seconds()
        while unconnected:
            ex = next(iter(unconnected))
            if ex.done or ex not in waiting:
                del unconnected[ex]
                continue
            deadline = ex.since + (ex.timeout or 30)
            if deadline > now:
                self._queue_timer = self.reactor.callLater(deadline - now, self._queue_expired)
                return
            del unconnected[ex]
            del waiting[ex]
            ex._fail(504, f"timed out connecting to {self.address}", NOT_CONNECTED)

    def _release(self, conn: _Connection, reused: bool = True) -> None:
        """
        C{conn} is free (C{reused}: after a response; else newly made): the
        oldest request still waiting for a connection takes it, else it
        goes to the idle set if there is room.
        """
        self._busy.discard(conn)
        if self.closed or conn.lost:
            conn.transport.loseConnection()
            return
        limit = self.idle_reuse_limit
        ka = conn.keep_alive
        if ka:
            ka -= max(KEEP_ALIVE_MIN_MARGIN, ka * KEEP_ALIVE_MARGIN)
            if ka <= 0:
                conn.transport.loseConnection()
                return
            if ka < limit:
                limit = ka
        waiting = self._waiting
        while waiting:
            ex, f = waiting.popitem(last=False)
            if f is None:
                self._unconnected.pop(ex, None)
            else:
                # its connect goes on, for whoever needs a connection next
                ex.connector = None
                self._free(f)
            if not ex.done:
                conn.start(ex, reused)
                return
        if len(self._idle) >= self.max_idle:
            conn.transport.loseConnection()
            return
        conn.idle_until = self.reactor.seconds() + limit
        self._idle.append(conn)

    def _lost(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def waiting_count(self) -> int:
        """
        Requests waiting for a connection (that a released one would serve).
        """
        return len(self._waiting)

    @property
    def connecting_count(self) -> int:
        """
        Connects in progress.
        """
        return self._connecting

    @property
    def spare_count(self) -> int:
        """
        Connects in progress whose request was served by another connection.
        """
        return len(self._spare)

    def close_idle(self) -> None:
        """
        Close every idle keep-alive connection and stop the spare connects
        (busy connections, and the connects of waiting requests, stay).
        """
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.transport.loseConnection()
        spare, self._spare = self._spare, OrderedDict()
        for f in spare:
            c, f.connector = f.connector, None
            if c is not None:
                try:
                    c.stopConnecting()
                except _error.NotConnectingError:
                    pass

    def close(self) -> None:
        """
        Close idle connections now and busy ones when their exchange ends;
        no new connections are made.
        """
        self.closed = True
        self.close_idle()
        self._connect_next()


class PoolRegistry:
    """
    C{registry(host, port) -> UpstreamPool}; remembers the pools it made
    (weakly) so that L{close_idle} reaches all of them.
    """

    def __init__(self, reactor: Any, **pool_options: Any) -> None:
        import weakref

        self.reactor = reactor
        self.pool_options = pool_options
        self._pools: weakref.WeakSet[UpstreamPool] = weakref.WeakSet()

    def __call__(self, host: str, port: int) -> UpstreamPool:
        pool = UpstreamPool(self.reactor, host, port, **self.pool_options)
        self._pools.add(pool)
        return pool

    def close_idle(self) -> None:
        for pool in list(self._pools):
            pool.close_idle()


__all__ = ["UpstreamPool", "UpstreamExchange", "UpstreamError", "PoolRegistry",
           "NOT_CONNECTED", "CLOSED"]

