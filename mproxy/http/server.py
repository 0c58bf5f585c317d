# -*- test-case-name: tests.test_http_server -*-
"""
The HTTP listeners' connections: L{FastHTTPChannel} (HTTP/1.1, the proxy's
hot path), L{ProxySite} (the site: timeouts, connection tracking, graceful
shutdown) and, on TLS listeners, the ALPN choice between HTTP/2 and
L{FastHTTPChannel}.

L{FastHTTPChannel} reads requests with a L{mproxy.http.parsing.RequestReader}
and hands each one, as soon as its headers are complete, to the site's root
resource as a L{mproxy.http.request.FastRequest}, the
L{mproxy.http.interfaces.ITunnelExchange} the proxy drives; the request
calls back into the channel only through
L{mproxy.http.interfaces.IRequestChannel}.  Malformed input never reaches a
resource (see L{mproxy.http.parsing}): the client gets a 4xx and the
connection closes.

Timeouts (per connection): C{header_timeout} for a request's header section
(408), C{idle_timeout} between keep-alive requests, C{body_timeout} for a
request body that stalls while we read it (408 through the body consumer),
and a short linger after answering before the body was read.

    site = ProxySite(resource, reactor, *, header_timeout=30, idle_timeout=75,
                     body_timeout=60, secure=False)
    site.shutdown(timeout) -> Deferred  # after the port stopped listening
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http as _http
from twisted.web import server as _server
from zope.interface import implementer

from mproxy.http.batch import batcher_for
from mproxy.http.connection import ConnectionControl
from mproxy.http.interfaces import IRequestChannel
from mproxy.http.parsing import MAX_HEADER_BYTES, MAX_HEADER_COUNT, MAX_URL_LENGTH, RequestReader
from mproxy.http.reads import HEAD_READ, READ_GROW_AT, grow_reads
from mproxy.http.batch import DIRECT_TYPES
from mproxy.http.splice import SPLICE_MIN, ISpliceHandler, splicer_for
from mproxy.http.request import (
    MAX_QUEUED_BODY,
    FastRequest,
    _BodyProducer,
    PeerStrings,
    error_response,
    reason_bytes,
    status_line,
)

__all__ = [
    "FastHTTPChannel", "FastRequest", "ProxySite", "error_response",
    "reason_bytes", "status_line", "MAX_QUEUED_BODY", "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT", "MAX_URL_LENGTH",
]

#: seconds allowed for a request's header section to arrive (slow-loris)
HEADER_TIMEOUT = 30.0
#: seconds an idle keep-alive client connection is kept open
IDLE_TIMEOUT = 75.0
#: seconds a request body may stall (while we are reading) before 408
BODY_TIMEOUT = 60.0
#: seconds a keep-alive connection must have been idle before a graceful
#: shutdown closes it: one that served a request just now may be carrying
#: the client's next request already, which a close would lose
IDLE_CLOSE_QUIET = 1.0


@implementer(IRequestChannel)
class FastHTTPChannel(ConnectionControl, PeerStrings, Protocol):
    """
    One client connection.  Requests are handled one at a time in order;
    pipelined requests wait (their bodies queued, reading paused when the
    queue grows).  Parsing is the L{RequestReader}'s; this class owns the
    connection: dispatch, timeouts, reading pauses, closing (with a linger
    after an early answer) and the switch to a tunnel after a 101.
    """

    requestFactory = FastRequest
    peer: Any = None
    local: Any = None
    is_tls = False
    #: the transport's C{fit_reads(left)}, where it has one (the TLS
    #: transport of mproxy.tls.fasttls): told how many bytes of a request
    #: body are still to come, so that it can read them with the last
    #: full-size read instead of in a small one of their own
    _fit_reads: Callable[[int], None] | None = None
    #: in dataReceived: a body queued past its limit pauses reading only if
    #: it is still queued once the read is handled (its request, dispatched
    #: at the end of the read, usually takes the queue at once)
    _in_read = False
    _queue_full = False

    def __init__(self, site: _server.Site, clock: Any,
                 header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.site = site
        self.clock = clock
        self.batcher = batcher_for(clock)
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.reader = RequestReader(self)
        self._requests: deque[FastRequest] = deque()
        self._paused: set[str] = set()
        self._closing = False
        self._stopped = False  # parsing stopped, data discarded
        self._pending_error: int | None = None
        self._tunnel: Callable[[bytes], None] | None = None
        self._tunnel_req: FastRequest | None = None
        self._awaiting_tunnel = False
        self._upgrade_pending = b""
        self._to_dispatch: FastRequest | None = None
        self._timer: Any = None
        self._linger_call: Any = None
        self._quiet_call: Any = None
        self._idle_since = 0.0
        self.body_producer = _BodyProducer(self)
        # (read for every request or read: an instance's own attributes
        # read faster than the class's defaults)
        self.requestFactory = type(self).requestFactory
        self._in_read = False
        self._queue_full = False

    # --- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        t = self.transport
        self.peer = t.getPeer()
        self.local = t.getHost()
        self.is_tls = ISSLTransport.providedBy(t)
        self._fit_reads = getattr(t, "fit_reads", None)
        self.site._connection_opened(self)
        self._idle_since = self.clock.seconds()
        if self.header_timeout:
            self.set_timer(self.header_timeout)
        # Nagle off from the start, as nginx and Go do: what one reactor
        # iteration writes already leaves in one send, and with Nagle the
        # short last segment of a send waits while an earlier one is
        # unacknowledged, up to the client's delayed ACK (tens of ms: the
        # end of a large body written in several sends)
        self.set_nodelay()

    def _timed_out(self) -> None:
        if self._requests:
            # A request is in progress: only a body that stopped arriving
            # (while we were reading) times out here.
            cur = self.reader.current
            if (cur is not None and not cur.body_done and not cur.finished
                    and self.body_timeout):
                if self._paused:
                    self.set_timer(self.body_timeout)
                    return
                cur.keep_alive = False
                self._stopped = True
                cur.body_failed(408, "request body timed out")
            return
        if self.reader.in_headers:
            self.batcher.write(self.transport, error_response(408))
        self.close()

    def is_idle(self) -> bool:
        return not self._requests and not self.reader.in_headers

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closing = True
        for name in ("_linger_call", "_quiet_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        if self._timer is not None:
            t, self._timer = self._timer, None
            if t.active():
                t.cancel()
        reqs = list(self._requests)
        self._requests.clear()
        for r in reqs:
            r.connectionLost(reason)
        self.site._connection_closed(self)

    def close_when_idle(self) -> None:
        """
        Graceful shutdown: close now if no request is in progress, else
        after the current response.
        """
        if self._tunnel is not None:
            # upgraded connections (WebSockets) may live forever: they are
            # not waited for; the proxy ends them cleanly
            req = self._tunnel_req
            if req is not None and req.on_shutdown is not None:
                req.on_shutdown()
            else:
                self.close()
        elif self.is_idle():
            # Close only once it has been idle for a moment: a request sent
            # meanwhile is answered (with Connection: close) instead of lost.
            quiet = IDLE_CLOSE_QUIET - (self.clock.seconds() - self._idle_since)
            if quiet <= 0:
                self.close()
            elif self._quiet_call is None:
                self._quiet_call = self.clock.callLater(quiet, self._close_if_idle)
        else:
            for r in self._requests:
                r.keep_alive = False

    def _close_if_idle(self) -> None:
        self._quiet_call = None
        if self.is_idle() and not self._closing:
            self.close()

    # --- reading --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel(data)
            return
        if self._awaiting_tunnel and not self._closing:
            # sent after an upgrade request, before the target's answer: the
            # tunnel's first bytes (or dropped if the target refuses)
            self._upgrade_pending += data
            if len(self._upgrade_pending) > MAX_QUEUED_BODY:
                self.pause_reading("upgrade")
            return
        if self._stopped or self._closing:
            return
        if len(data) >= READ_GROW_AT:
            grow_reads(self.transport, len(data))
        self._in_read = True
        try:
            self.reader.feed(data)
            # requests are dispatched once what arrived with them is parsed,
            # so that a body received together with its headers is complete
            req = self._to_dispatch
            if req is not None:
                self._to_dispatch = None
                self._dispatch(req)
        finally:
            self._in_read = False
        if self._queue_full:
            self._queue_full = False
            for r in self._requests:
                if r.queue_full:
                    self.pause_reading("queue")
                    break
        if self.reader.body_left >= SPLICE_MIN:
            self._splice_body()

    def _splice_body(self) -> None:
        """
        The rest of the request body being read (at least L{SPLICE_MIN}
        bytes, all still in the socket) goes to the target's socket by
        splice (L{mproxy.http.splice}) when its consumer offers a plain TCP
        transport for it (L{FastRequest.set_body_consumer}) and this one is
        plain TCP too; else it goes on as pieces.
        """
        req = self.reader.current
        if (req is None or req.finished or req._body_splice is not None or self._closing
                or self._stopped or type(self.transport) not in DIRECT_TYPES):
            return
        target = req._splice_target
        if target is None:
            return
        splicer = splicer_for(self.clock)
        if splicer is None:
            return
        sink = target()
        if sink is None:
            return
        req._body_splice = splicer.start(self.transport, sink, self.reader.body_left,
                                         _BodySplice(self, req, sink))

    # what the RequestReader tells the connection

    def header_started(self) -> None:
        if self.header_timeout and not self._requests:
            self.set_timer(self.header_timeout)

    def request_parsed(self, req: FastRequest) -> None:
        self._requests.append(req)
        if req.body_length and self.body_timeout:
            self.set_timer(self.body_timeout)
        if len(self._requests) == 1:
            self._to_dispatch = req

    def body_queue_full(self) -> None:
        """
        A request's body queued (no consumer yet) past L{MAX_QUEUED_BODY}
        bytes: reading pauses until it is taken (or the request is done).
        """
        if self._in_read:
            self._queue_full = True
        else:
            self.pause_reading("queue")

    def body_arrived(self, left: int = -1) -> None:
        if self.body_timeout:
            self.set_timer(self.body_timeout)
        if left >= 0:
            fit = self._fit_reads
            if fit is not None:
                fit(left)

    def protocol_error(self, status: int, message: str) -> None:
        self._stopped = True
        cur = self.reader.current
        if cur is not None and self._requests and cur is self._requests[0]:
            # the body of the request being served is malformed: its
            # consumer answers (400 or abort) and the connection closes
            cur.keep_alive = False
            cur.body_failed(status, message)
            return
        if self._requests:
            # answer after the responses already owed
            self._pending_error = status
            self.pause_reading("error")
            return
        self._send_error(status)

    def upgrade_started(self, rest: bytes) -> None:
        """
        The reader stopped after a WebSocket handshake's headers; bytes
        after them belong to the tunnel (or, if the target refuses, are
        dropped).
        """
        self._stopped = True
        if self._tunnel is not None:
            if rest:
                self._tunnel(rest)
        else:
            self._awaiting_tunnel = True
            if rest:
                self._upgrade_pending += rest

    def _send_error(self, status: int) -> None:
        # the client may still be sending (an oversized header section, a
        # smuggled body): linger, or its unread bytes make the kernel reset
        # the connection and the client never sees the error
        self.batcher.write(self.transport, error_response(status))
        self.linger()

    # --- dispatch -------------------------------------------------------------

    _dispatching = False
    _redispatch = False

    def _dispatch(self, req: FastRequest) -> None:
        # Pipelined requests answered synchronously would otherwise recurse
        # (finish -> request_done -> dispatch -> render -> finish ...).
        if self._dispatching:
            self._redispatch = True
            return
        self._dispatching = True
        try:
            while True:
                self._redispatch = False
                self._render(req)
                if not self._redispatch or not self._requests or self._closing:
                    return
                req = self._requests[0]
        finally:
            self._dispatching = False

    def _render(self, req: FastRequest) -> None:
        site = self.site
        if site.shutting_down:
            req.keep_alive = False  # the response says Connection: close
        try:
            resource = site.resource
            if not resource.isLeaf:
                resource = site.getResourceFor(req)
            else:
                req.site = site
            body = resource.render(req)
            if isinstance(body, bytes):
                req.write(body)
                req.finish()
        except Exception:
            site.render_failed(req, Failure())

    def request_done(self, req: FastRequest) -> None:
        """
        Called by L{FastRequest.finish}.
        """
        if not self._requests or self._requests[0] is not req:
            return
        self._requests.popleft()
        if req._queue is not None:
            # answered without reading its body (a refusal): what was
            # queued of it is dropped, and reading no longer waits for it
            req._queue = None
            req._queued_bytes = 0
            self.resume_reading("queue")
        if not req.keep_alive or self._closing or self.site.shutting_down:
            if not req.body_done and not self._closing:
                self.linger()
                return
            self.close()
            return
        if self._requests:
            self._dispatch(self._requests[0])
        elif self._pending_error is not None:
            self._send_error(self._pending_error)
        else:
            self._idle_since = self.clock.seconds()
            if self.idle_timeout:
                self.set_timer(self.idle_timeout)

    def start_tunnel(self, req: FastRequest, on_data: Callable[[bytes], None]) -> None:
        self._tunnel = on_data
        self._tunnel_req = req
        self._stopped = True
        self._awaiting_tunnel = False
        pending, self._upgrade_pending = self._upgrade_pending, b""
        if pending:
            on_data(pending)
        self.resume_reading("upgrade")


@implementer(ISpliceHandler)
class _BodySplice:
    """
    What a connection hears from the splice relay of a request body's
    rest (L{FastHTTPChannel._splice_body}): progress keeps the body
    timeout from firing, the target's socket filling up pauses reading
    from the client (as the target connection's producer does), the end
    completes the body as its last piece would; the client's socket
    failing or ending mid-body aborts the client connection (its loss
    abandons the request), the target's aborts the target connection (a
    502, as a target lost mid-request).
    """

    __slots__ = ("channel", "req", "sink")

    def __init__(self, channel: FastHTTPChannel, req: FastRequest, sink: Any) -> None:
        self.channel = channel
        self.req = req
        self.sink = sink

    def sent(self, n: int) -> None:
        self.channel.body_arrived()

    def stalled(self) -> None:
        self.channel.pause_reading("splice")

    def flowing(self) -> None:
        self.channel.resume_reading("splice")

    def ended(self) -> None:
        self.req._body_splice = None
        channel = self.channel
        t = channel.transport
        if t.bufferSize > HEAD_READ:
            # the next request's head, and no more than a small body with
            # it: a large body's rest is spliced
            t.bufferSize = HEAD_READ
        channel.resume_reading("splice")
        channel.reader.body_spliced()

    def source_failed(self, message: str) -> None:
        self.req._body_splice = None
        self.channel.abort()

    def sink_failed(self, message: str) -> None:
        self.req._body_splice = None
        self.channel.resume_reading("splice")
        self.sink.abortConnection()


class ProxySite(_server.Site):
    """
    A L{Site} whose plain-HTTP connections are L{FastHTTPChannel}s.

    @ivar shutting_down: set by L{shutdown}; connections close after their
        current response.
    """

    shutting_down = False
    secure = False

    def __init__(self, resource: Any, reactor: Any, *,
                 header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT,
                 secure: bool = False) -> None:
        super().__init__(resource, reactor=reactor)
        self.reactor = reactor
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.secure = secure
        self.shutting_down = False
        self.connections: set[Any] = set()
        self.on_shutdown: list[Callable[[], None]] = []
        self._shutdown_waiters: list[Any] = []
        self._shutdown_timer: Any = None
        self.on_render_failed: Callable[[Any, Failure], None] | None = None

    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        if self.secure:
            return _NegotiatingProtocol(self)
        return FastHTTPChannel(self, self.reactor, self.header_timeout, self.idle_timeout,
                               self.body_timeout)

    def _connection_opened(self, channel: Any) -> None:
        self.connections.add(channel)

    def _connection_closed(self, channel: Any) -> None:
        self.connections.discard(channel)
        if self.shutting_down and not self.connections:
            self._shutdown_complete()

    def shutdown(self, timeout: float) -> Any:
        """
        Graceful stop (call after the listening port stopped): idle client
        connections close now, busy ones after their current response;
        whatever is still open after C{timeout} seconds is aborted.  The
        C{on_shutdown} callables (e.g. closing idle upstream connections)
        run first.

        @return: a L{Deferred} firing once every connection is closed.
        """
        from twisted.internet.defer import Deferred

        d: Deferred[None] = Deferred()
        self._shutdown_waiters.append(d)
        if not self.shutting_down:
            self.shutting_down = True
            for fn in self.on_shutdown:
                fn()
            for c in list(self.connections):
                c.close_when_idle()
            if self.connections:
                self._shutdown_timer = self.reactor.callLater(timeout, self._shutdown_expired)
        if not self.connections:
            self._shutdown_complete()
        return d

    def _shutdown_expired(self) -> None:
        self._shutdown_timer = None
        for c in list(self.connections):
            c.abort()
        self.connections.clear()
        self._shutdown_complete()

    def _shutdown_complete(self) -> None:
        t, self._shutdown_timer = self._shutdown_timer, None
        if t is not None and t.active():
            t.cancel()
        waiters, self._shutdown_waiters = self._shutdown_waiters, []
        for d in waiters:
            d.callback(None)

    def render_failed(self, request: Any, failure: Failure) -> None:
        cb = self.on_render_failed
        if cb is not None:
            cb(request, failure)
        if request.started or request.finished:
            try:
                request.abort()
            except Exception:
                pass
            return
        body = b"<h1>500 Internal Server Error</h1>"
        request.start_response(500, None, [
            (b"Content-Type", b"text/html; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
        ], len(body))
        request.keep_alive = False
        request.write(body)
        request.finish()


class _NegotiatingProtocol(Protocol):
    """
    For TLS listeners: speaks HTTP/2 (L{mproxy.http.h2.H2Channel}, its
    streams exchanges the proxy drives) when ALPN chose C{h2}, else
    L{FastHTTPChannel}.
    """

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self._channel: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.site._connection_opened(self)

    def _choose(self) -> Any:
        # a TLS transport: its ALPN result (None before TLS 1.2 ALPN)
        proto = self.transport.negotiatedProtocol
        if proto == b"h2" and _http.H2_ENABLED:
            from mproxy.http.h2 import H2Channel

            ch = H2Channel(self.site, self.site.reactor, self.site.idle_timeout)
            ch.makeConnection(self.transport)
        else:
            ch = FastHTTPChannel(self.site, self.site.reactor, self.site.header_timeout,
                                 self.site.idle_timeout, self.site.body_timeout)
            ch.makeConnection(self.transport)
            self.site._connection_closed(ch)
        self._channel = ch
        return ch

    def dataReceived(self, data: bytes) -> None:
        ch = self._channel
        if ch is None:
            ch = self._choose()
        ch.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = 0
        self.site._connection_closed(self)
        if self._channel is not None:
            self._channel.connectionLost(reason)

    def is_idle(self) -> bool:
        ch = self._channel
        return ch is None or ch.is_idle()

    def close_when_idle(self) -> None:
        """
        Graceful shutdown, as the chosen channel does it (HTTP/2: GOAWAY,
        the open streams finish); before any byte, close at once.
        """
        ch = self._channel
        if ch is None:
            self.transport.loseConnection()
        else:
            ch.close_when_idle()

    def abort(self) -> None:
        self.transport.abortConnection()
