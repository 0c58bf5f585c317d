# -*- test-case-name: tests.test_http_server -*-
"""
A lean HTTP/1.1 server channel for the proxy's hot path.

L{FastHTTPChannel} parses with C{httptools} (llhttp) and hands each request,
as soon as its headers are complete, to the L{Site}'s root resource as a
L{FastRequest}.  A L{FastRequest} I{is} a L{twisted.web.server.Request}
(ordinary resources work with it), but it builds header, argument and cookie
objects only when somebody asks for them, streams the request body to a
consumer instead of buffering it, and writes status line, headers and the
first body chunk in one transport write.

The proxy resource talks to it through a small "exchange" API, which
L{mproxy.http.proxy} also implements on top of a standard
L{twisted.web.server.Request} (HTTP/2):

    - C{raw_headers}: C{list[tuple[bytes, bytes]]} as received;
    - C{body_length}: 0 none, n declared length, -1 chunked;
    - C{set_body_consumer(on_data, on_end, on_error)};
    - C{start_response(code, reason, headers, length)};
    - C{write(data)}, C{finish()}, C{abort()};
    - C{set_lost_handler(fn)}; C{body_producer} (IPushProducer).

Public names: L{FastHTTPChannel}, L{FastRequest}, L{ProxySite}.

Malformed input never reaches a resource: garbage, request smuggling
attempts (Content-Length together with Transfer-Encoding, duplicate or bad
Content-Length, bad chunked framing) get a 400, oversized header sections
a 431, an overlong request target a 414; the connection is then closed.

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

import httptools
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http as _http
from twisted.web import server as _server
from zope.interface import alsoProvides

from mproxy.http.batch import batcher_for
from mproxy.http.request import (
    MAX_QUEUED_BODY,
    FastRequest,
    _BodyProducer,
    error_response,
    reason_bytes,
    status_line,
)

__all__ = [
    "FastHTTPChannel", "FastRequest", "ProxySite", "error_response",
    "reason_bytes", "status_line", "MAX_QUEUED_BODY",
]

MAX_URL_LENGTH = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADER_COUNT = 100
#: seconds allowed for a request's header section to arrive (slow-loris)
HEADER_TIMEOUT = 30.0
#: seconds an idle keep-alive client connection is kept open
IDLE_TIMEOUT = 75.0
#: seconds a request body may stall (while we are reading) before 408
BODY_TIMEOUT = 60.0
#: seconds unread request bytes are drained after an early response
LINGER_TIMEOUT = 2.0


class _ParseError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _offers_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            if any(t.strip().lower() == b"websocket" for t in value.split(b",")):
                return True
    return False


class _PrimedCallbacks:
    """
    Parser callbacks for a parser that resumes a request whose upgrade
    offer was dropped: the head it is primed with is not a request (its
    callbacks are ignored); the body and everything after it go to the
    channel.
    """

    priming = True

    def __init__(self, channel: FastHTTPChannel) -> None:
        self.channel = channel

    def on_message_begin(self) -> None:
        if not self.priming:
            self.channel.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.channel.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.channel.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.priming:
            self.channel.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.channel.on_body(data)

    def on_message_complete(self) -> None:
        self.channel.on_message_complete()


class FastHTTPChannel(Protocol):
    """
    One client connection.  Requests are handled one at a time in order;
    pipelined requests wait (their bodies queued, reading paused when the
    queue grows).
    """

    requestFactory = FastRequest
    peer: Any = None
    local: Any = None
    is_tls = False

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
        self._parser = httptools.HttpRequestParser(self)
        self._requests: deque[FastRequest] = deque()
        self._current: FastRequest | None = None  # being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._raw_header_bytes = 0
        self._in_headers = False
        self._paused: set[str] = set()
        self._closing = False
        self._stopped = False  # parsing stopped, data discarded
        self._pending_error: int | None = None
        self._tunnel: Callable[[bytes], None] | None = None
        self._timer: Any = None
        self.body_producer = _BodyProducer(self)

    # --- connection ---------------------------------------------------------

    _client_strings: tuple[str, str] | None = None

    @property
    def client_strings(self) -> tuple[str, str]:
        cs = self._client_strings
        if cs is None:
            peer = self.peer
            cs = self._client_strings = (
                getattr(peer, "host", "") or "", str(getattr(peer, "port", "")))
        return cs

    def connectionMade(self) -> None:
        t = self.transport
        self.peer = t.getPeer()
        self.local = t.getHost()
        self.is_tls = ISSLTransport.providedBy(t)
        self.site._connection_opened(self)
        if self.header_timeout:
            self._timer = self.clock.callLater(self.header_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._requests:
            # A request is in progress: only a body that stopped arriving
            # (while we were reading) times out here.
            cur = self._current
            if (cur is not None and not cur.body_done and not cur.finished
                    and self.body_timeout):
                if self._paused:
                    self._set_timer(self.body_timeout)
                    return
                cur.keep_alive = False
                self._stopped = True
                cur._body_failed(408, "request body timed out")
            return
        if self._in_headers:
            self.batcher.write(self.transport, error_response(408))
        self.close()

    def _set_timer(self, delay: float) -> None:
        t = self._timer
        if not delay:
            if t is not None:
                self._timer = None
                t.cancel()
            return
        if t is not None:
            t.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._timed_out)

    def is_idle(self) -> bool:
        return not self._requests and not self._in_headers

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closing = True
        lc, self._linger_call = self._linger_call, None
        if lc is not None and lc.active():
            lc.cancel()
        if self._timer is not None:
            t, self._timer = self._timer, None
            if t.active():
                t.cancel()
        reqs = list(self._requests)
        self._requests.clear()
        for r in reqs:
            r.connectionLost(reason)
        self.site._connection_closed(self)

    def pause_reading(self, reason: str) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self._closing:
                self.transport.resumeProducing()

    def abort(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    _nodelay = False

    def set_nodelay(self) -> None:
        """
        Disable Nagle for this connection (once): small streamed pieces
        (SSE events) must not wait for the client's ACK.
        """
        if self._nodelay:
            return
        self._nodelay = True
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass

    def close(self) -> None:
        """
        Close once everything written was sent.
        """
        self._closing = True
        self.batcher.flush_transport(self.transport)
        self.transport.loseConnection()

    _linger_call: Any = None

    def _linger(self) -> None:
        """
        Close after answering a request whose body was not read: send our
        FIN but keep reading (and discarding) for a while, so that unread
        request bytes do not make the kernel reset the connection before
        the client has read the response.
        """
        self._closing = True
        self._stopped = True
        t = self.transport
        self.batcher.flush_transport(t)
        half_close = getattr(t, "loseWriteConnection", None)
        if half_close is None:
            t.loseConnection()
            return
        # The client's EOF must not drop what is still to be sent: a
        # lingering connection handles it (readConnectionLost) instead of
        # being closed at once.
        alsoProvides(self, IHalfCloseableProtocol)
        half_close()
        if self._paused:
            self._paused.clear()
            t.resumeProducing()
        self._linger_call = self.clock.callLater(LINGER_TIMEOUT, t.loseConnection)

    def readConnectionLost(self) -> None:
        """
        The client finished sending while we linger: close once our
        response is out.
        """
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def close_when_idle(self) -> None:
        """
        Graceful shutdown: close now if no request is in progress, else
        after the current response.
        """
        if self._tunnel is not None:
            # upgraded connections (WebSockets) may live forever: they are
            # not waited for (reference 1.4); the proxy ends them cleanly
            fn = self._tunnel_req.on_shutdown if self._tunnel_req is not None else None
            if fn is not None:
                fn()
            else:
                self.close()
        elif self.is_idle():
            self.close()
        else:
            for r in self._requests:
                r.keep_alive = False

    def stop_parsing(self) -> None:
        """
        The rest of what the client sends is discarded (the connection
        closes after the current response).
        """
        self._stopped = True

    # --- parsing ------------------------------------------------------------

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
        self._feed(data)
        # requests are dispatched once what arrived with them is parsed, so
        # that a body received together with its headers is complete
        req = self._to_dispatch
        if req is not None:
            self._to_dispatch = None
            self._dispatch(req)

    def _feed(self, data: bytes) -> None:
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                rest = data[e.args[0]:]
                req = self._dropped_upgrade
                if req is None:
                    self._upgrade_data(rest)
                    return
                # go on parsing what follows as HTTP (the body, further
                # requests)
                self._dropped_upgrade = None
                self._restart_parser(req)
                data = rest
                continue
            except _ParseError as e:
                self._protocol_error(e.status, str(e))
            except httptools.HttpParserCallbackError as e:
                ctx = e.__context__
                if isinstance(ctx, _ParseError):
                    self._protocol_error(ctx.status, str(ctx))
                else:
                    self._protocol_error(400, str(e))
            except httptools.HttpParserError as e:
                self._protocol_error(400, str(e))
            else:
                if self._in_headers:
                    self._raw_header_bytes += len(data)
                    if self._raw_header_bytes > MAX_HEADER_BYTES:
                        self._protocol_error(431, "header section too large")
            return

    def _restart_parser(self, req: FastRequest) -> None:
        """
        After a dropped upgrade offer: the parser (which stopped as for an
        upgrade, skipping the body) is replaced by one primed with a head
        carrying only the request's framing, so that it reads the request's
        body and then the requests after it.
        """
        if not req.body_length:
            self._parser = httptools.HttpRequestParser(self)
            return
        primer = _PrimedCallbacks(self)
        self._parser = httptools.HttpRequestParser(primer)
        framing = (b"Transfer-Encoding: chunked\r\n" if req.body_length < 0
                   else b"Content-Length: %d\r\n" % req.body_length)
        self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
        primer.priming = False
        self._current = req

    def on_message_begin(self) -> None:
        self._in_headers = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._raw_header_bytes = 0
        if self.header_timeout and not self._requests:
            self._set_timer(self.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_LENGTH:
            raise _ParseError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        h = self._headers
        h.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if len(h) > MAX_HEADER_COUNT or self._header_bytes > MAX_HEADER_BYTES:
            raise _ParseError(431, "too many or too large headers")

    def on_headers_complete(self) -> None:
        p = self._parser
        self._in_headers = False
        version = b"HTTP/1.1" if p.get_http_version() == "1.1" else b"HTTP/1.0"
        if p.get_http_version() not in ("1.0", "1.1"):
            raise _ParseError(505 if p.get_http_version()[0] >= "2" else 400,
                              "unsupported HTTP version")
        url = self._url
        if not url.startswith(b"/"):
            if url == b"*":
                pass
            else:
                lower = url[:8].lower()
                if lower.startswith(b"http://") or lower.startswith(b"https://"):
                    i = url.find(b"/", url.find(b"//") + 2)
                    url = url[i:] if i >= 0 else b"/"
                else:
                    raise _ParseError(400, "bad request target")
        req = self.requestFactory(self, p.get_method(), url, version, self._headers)
        self._headers = []
        req.keep_alive = p.should_keep_alive()
        te = cl = False
        hosts = 0
        for name, value in req.raw_headers:
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                if cl:
                    raise _ParseError(400, "duplicate Content-Length")
                cl = True
                try:
                    req.body_length = int(value)
                except ValueError:
                    raise _ParseError(400, "bad Content-Length")
            elif n == 17 and name.lower() == b"transfer-encoding":
                if te or value.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                    # only "chunked" (last) frames a request body reliably
                    raise _ParseError(400, "unsupported Transfer-Encoding")
                te = True
            elif n == 6 and name.lower() == b"expect":
                if value.lower() == b"100-continue":
                    req.expect_continue = True
            elif n == 4 and name.lower() == b"host":
                hosts += 1
                if hosts > 1:
                    raise _ParseError(400, "duplicate Host")
        if not hosts and version == b"HTTP/1.1":
            raise _ParseError(400, "missing Host")
        if te:
            if cl:
                raise _ParseError(400, "Content-Length with Transfer-Encoding")
            req.body_length = -1
        if req.body_length:
            req.body_done = False
        self._current = req
        if p.should_upgrade():
            # Only a WebSocket handshake (GET, HTTP/1.1, no body) opens a
            # tunnel.  Any other offer (h2c ...) is dropped and the request
            # served as a normal one: a tunnel in another protocol would
            # carry requests past routing, forwarding headers and logs.
            if (version == b"HTTP/1.1" and req.method == b"GET" and not req.body_length
                    and _offers_websocket(req.raw_headers)):
                req.upgrade = True
            else:
                self._dropped_upgrade = req
                self._current = None  # its body is read by the next parser
        self._requests.append(req)
        if req.body_length and self.body_timeout:
            self._set_timer(self.body_timeout)
        if len(self._requests) == 1:
            self._to_dispatch = req

    def on_body(self, data: bytes) -> None:
        req = self._current
        if req is not None:
            if self.body_timeout:
                self._set_timer(self.body_timeout)
            req._body_data(data)

    def on_message_complete(self) -> None:
        req = self._current
        self._current = None
        if req is not None and not req.body_done:
            req._body_end()

    def _protocol_error(self, status: int, message: str) -> None:
        self._stopped = True
        cur = self._current
        if cur is not None and self._requests and cur is self._requests[0]:
            # the body of the request being served is malformed: its
            # consumer answers (400 or abort) and the connection closes
            cur.keep_alive = False
            cur._body_failed(status, message)
            return
        if self._requests:
            # answer after the responses already owed
            self._pending_error = status
            self.pause_reading("error")
            return
        self._send_error(status)

    def _send_error(self, status: int) -> None:
        # the client may still be sending (an oversized header section, a
        # smuggled body): linger, or its unread bytes make the kernel reset
        # the connection and the client never sees the error
        self.batcher.write(self.transport, error_response(status))
        self._linger()

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
        if not req.keep_alive or self._closing or self.site.shutting_down:
            if not req.body_done and not self._closing:
                self._linger()
                return
            self.close()
            return
        if self._requests:
            self._dispatch(self._requests[0])
        elif self._pending_error is not None:
            self._send_error(self._pending_error)
        elif self.idle_timeout:
            self._set_timer(self.idle_timeout)

    def start_tunnel(self, req: FastRequest, on_data: Callable[[bytes], None]) -> None:
        self._tunnel = on_data
        self._tunnel_req = req
        self._stopped = True
        self._awaiting_tunnel = False
        pending = getattr(self, "_upgrade_pending", b"")
        self._upgrade_pending = b""
        if pending:
            on_data(pending)
        self.resume_reading("upgrade")

    def _upgrade_data(self, rest: bytes) -> None:
        """
        The parser stopped after an upgrade request's headers; bytes after
        them belong to the tunnel (or, if the target refuses, are dropped).
        """
        self._stopped = True
        self._current = None
        if self._tunnel is not None:
            if rest:
                self._tunnel(rest)
        else:
            self._awaiting_tunnel = True
            if rest:
                self._upgrade_pending = getattr(self, "_upgrade_pending", b"") + rest

    _upgrade_pending = b""
    _awaiting_tunnel = False
    _dropped_upgrade: FastRequest | None = None
    _to_dispatch: FastRequest | None = None
    _tunnel_req: FastRequest | None = None


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
        if getattr(request, "started", True) or request.finished:
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
    For TLS listeners: speaks HTTP/2 (Twisted's H2 stack, standard
    requests) when ALPN chose C{h2}, else L{FastHTTPChannel}.
    """

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self._channel: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.site._connection_opened(self)

    def _choose(self) -> Any:
        proto = getattr(self.transport, "negotiatedProtocol", None)
        if proto == b"h2" and _http.H2_ENABLED:
            from twisted.web._http2 import H2Connection

            ch = H2Connection(self.site.reactor)
            ch.requestFactory = _server.Request
            ch.site = self.site
            ch.factory = self.site
            ch.timeOut = self.site.idle_timeout
            ch.callLater = self.site.reactor.callLater
            ch.makeConnection(self.transport)
            try:
                self.transport.registerProducer(ch, True)
            except RuntimeError:
                pass
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
        if ch is None:
            return True
        f = getattr(ch, "is_idle", None)
        return f() if f is not None else not getattr(ch, "streams", None)

    def close_when_idle(self) -> None:
        ch = self._channel
        if ch is not None and hasattr(ch, "close_when_idle"):
            ch.close_when_idle()
            return
        if ch is not None and getattr(ch, "conn", None) is not None:
            # HTTP/2: GOAWAY, then close once the open streams are done
            try:
                ch.conn.close_connection()
                self.transport.write(ch.conn.data_to_send())
            except Exception:
                pass
        self._close_h2_when_done()

    def _close_h2_when_done(self) -> None:
        if self.is_idle():
            self.transport.loseConnection()
        elif self.connected:
            self.site.reactor.callLater(0.1, self._close_h2_when_done)

    def abort(self) -> None:
        self.transport.abortConnection()
