# -*- test-case-name: tests.test_http_server -*-
"""
L{FastRequest}: the request object of L{mproxy.http.server.FastHTTPChannel}
and the response-writing helpers it shares with the channel.

A L{FastRequest} is the L{mproxy.http.interfaces.ITunnelExchange} the proxy
drives: it streams the request body to a consumer (L{_StreamedBody}) and
writes status line, headers and the first body chunk in one transport
write.  It also I{is} a L{twisted.web.server.Request}, so that ordinary
resources work with it; those attributes are built only when asked
(L{mproxy.http.compat.TwistedRequestFace}).  It reaches its connection only
through L{mproxy.http.interfaces.IRequestChannel}.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.web import http as _http
from twisted.web import server as _server
from zope.interface import implementer

from mproxy.http.batch import DIRECT_TYPES, SEND_NOW
from mproxy.http.compat import TwistedRequestFace
from mproxy.http.interfaces import ITunnelExchange

#: request body bytes queued before anybody consumes them, before reading pauses
MAX_QUEUED_BODY = 65536

_NO_BODY_CODES = frozenset((204, 304))
_STATUS_LINES: dict[int, bytes] = {}


def status_line(code: int, reason: bytes | None = None) -> bytes:
    """
    C{HTTP/1.1 <code> <reason>\\r\\n}, cached for standard reasons.
    """
    if reason is None:
        line = _STATUS_LINES.get(code)
        if line is None:
            line = _STATUS_LINES[code] = b"HTTP/1.1 %d %s\r\n" % (code, reason_bytes(code))
        return line
    return b"HTTP/1.1 %d %s\r\n" % (code, reason)


def reason_bytes(code: int) -> bytes:
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return _http.RESPONSES.get(code, b"Unknown Status")


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    C{name: value\r\n} for each header (the joins run in C: no
    concatenation per header).
    """
    if not headers:
        return b""
    return b"\r\n".join(map(b": ".join, headers)) + b"\r\n"


def error_response(code: int) -> bytes:
    """
    A complete C{Connection: close} response for protocol errors.
    """
    reason = reason_bytes(code)
    body = b"<h1>%d %s</h1>" % (code, reason)
    return (
        status_line(code)
        + b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
        + body
    )


class _BodyProducer:
    """
    Pauses and resumes reading from the client for one reason: the request
    body's consumer (the upstream connection) is full.
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def pauseProducing(self) -> None:
        self._channel.pause_reading("body")

    def resumeProducing(self) -> None:
        self._channel.resume_reading("body")

    def stopProducing(self) -> None:
        pass


implementer(IPushProducer)(_BodyProducer)


def address_strings(address: Any) -> tuple[str, str]:
    """
    An IP address's host and port as strings, for logs (C{("", "")} for
    other kinds of address).
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, str(address.port)
    return "", ""


class PeerStrings:
    """
    A connection's C{client_strings}: its peer's (C{self.peer}) address
    and port as strings, computed the first time a request asks.
    """

    _client_strings: tuple[str, str] | None = None

    @property
    def client_strings(self) -> tuple[str, str]:
        cs = self._client_strings
        if cs is None:
            cs = self._client_strings = address_strings(self.peer)
        return cs


def _hex(n: int) -> bytes:
    return b"%x\r\n" % n


class _StreamedBody:
    """
    The request body as L{FastRequest} delivers it: queued (reading paused
    past L{MAX_QUEUED_BODY}) until a consumer is set, then passed on as it
    arrives; the channel reports it with L{body_received},
    L{body_complete} and L{body_failed}.
    """

    channel: Any
    finished: Any
    started: bool
    body_length: int
    body_done: bool
    transport: Any
    _on_data: Callable[[bytes], None] | None = None
    _on_end: Callable[[], None] | None = None
    _on_error: Callable[[int, str], None] | None = None
    #: the consumer's C{splice_target()}: the target's transport, when the
    #: body's rest may go to its socket by splice (see
    #: L{mproxy.http.server.FastHTTPChannel}), else C{None}
    _splice_target: Callable[[], Any] | None = None
    #: the body's rest on its way by splice
    _body_splice: Any = None
    _queue: list[bytes] | None = None
    _queued_bytes = 0
    _body_error: tuple[int, str] | None = None
    expect_continue = False

    def body_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
            return
        if self.finished:
            return
        if self._queue is None:
            self._queue = []
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self.queue_full:
            self.channel.body_queue_full()

    @property
    def queue_full(self) -> bool:
        """
        The body is queued (no consumer has taken it yet) past
        L{MAX_QUEUED_BODY} bytes.
        """
        return self._queue is not None and self._queued_bytes > MAX_QUEUED_BODY

    def body_complete(self) -> None:
        self.body_done = True
        if self._on_end is not None:
            self._on_end()

    def body_failed(self, status: int, message: str) -> None:
        self._body_error = (status, message)
        if self._on_error is not None:
            self._on_error(status, message)

    def set_body_consumer(self, on_data: Callable[[bytes], None],
                          on_end: Callable[[], None],
                          on_error: Callable[[int, str], None]) -> None:
        """
        Deliver the request body (already de-chunked) from now on; queued
        data is delivered at once.  C{on_error(status, message)} reports a
        malformed body.
        """
        self._on_data = on_data
        self._on_end = on_end
        self._on_error = on_error
        q = self._queue
        if q:
            self._queue = None
            self._queued_bytes = 0
            for chunk in q:
                on_data(chunk)
            self.channel.resume_reading("queue")
        if self._body_error is not None:
            on_error(*self._body_error)
        elif self.body_done and self.body_length:
            on_end()

    def send_continue(self) -> None:
        """
        Answer C{Expect: 100-continue}: we are about to read the body.
        """
        if self.expect_continue and not self.started:
            self.expect_continue = False
            if not self.body_done:
                self.channel.batcher.write(self.transport, b"HTTP/1.1 100 Continue\r\n\r\n")

    @property
    def body_producer(self) -> _BodyProducer:
        return self.channel.body_producer


#: no headers added (a request's C{extra_headers}, shared: never changed)
_NO_HEADERS: list[tuple[bytes, bytes]] = []


@implementer(ITunnelExchange)
class FastRequest(TwistedRequestFace, _StreamedBody, _server.Request):
    """
    A request received by L{FastHTTPChannel}.

    Twisted's C{Request} API works (headers are materialised lazily); the
    proxy uses the cheaper exchange API described in the module docstring.
    """

    _lost_handler: Callable[[], None] | None = None
    #: for an upgraded (tunnelled) request: ends the tunnel when the server
    #: shuts down, which does not wait for tunnels
    on_shutdown: Callable[[], None] | None = None
    _head: bytes | None = None
    _chunked_out = False
    _no_body = False
    _producer: Any = None
    _tunnel: Any = None
    upgrade = False
    #: headers added to every response (L{ProxyResource.alt_svc})
    extra_headers: list[tuple[bytes, bytes]] = _NO_HEADERS
    site = None
    sitepath: list[bytes] = []
    queued = 0

    def __init__(self, channel: Any, method: bytes, uri: bytes,
                 version: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.channel = channel
        self.transport = channel.transport
        self.client = channel.peer
        self.host = channel.local
        self.method = method
        self.uri = uri
        self.clientproto = version
        self.raw_headers = raw_headers
        self.body_length = 0
        self.body_done = True
        self.keep_alive = True
        self.started = False
        self.finished = 0
        self.code = 200
        self.code_message = b"OK"
        self.sentLength = 0
        self.prepath = []
        q = uri.find(b"?")
        if q < 0:
            self.path = uri
            self.query = b""
        else:
            self.path = uri[:q]
            self.query = uri[q + 1:]
        self.is_tls = channel.is_tls
        #: the peer's address and port as strings (for logs), computed
        #: once per connection
        self.client_strings: tuple[str, str] = channel.client_strings
        # (read for every request: an instance's own attributes read
        # faster than the classes' defaults)
        self._disconnected = False
        self.upgrade = False
        self._no_body = False
        self._chunked_out = False
        self._notifications = None
        self._queue = None
        self.extra_headers = _NO_HEADERS

    # --- response -----------------------------------------------------------

    def send_informational(self, code: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started or self.clientproto != b"HTTP/1.1":
            return
        self.channel.batcher.write(
            self.transport,
            status_line(code) + header_lines(headers) + b"\r\n"
        )

    def start_response(self, code: int, reason: bytes | None,
                       headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """
        Prepare the response head.  It is sent with the first L{write} or by
        L{finish}.  C{headers} must not contain framing or connection
        headers; C{length} is the body length if known (it must match a
        Content-Length header in C{headers}).
        """
        self.started = True
        self.code = code
        if self.extra_headers:
            headers = headers + self.extra_headers
        if code == 101:
            self._no_body = True
            self.keep_alive = False
            self._head = status_line(code, reason) + header_lines(headers) + b"\r\n"
            return
        if self.method == b"HEAD" or code in _NO_BODY_CODES or code < 200:
            self._no_body = True
        elif length is None:
            # a streamed response (SSE, chunked): pieces go out as written
            # (the connection has Nagle off since it started)
            if self.clientproto == b"HTTP/1.1":
                self._chunked_out = True
            else:
                self.keep_alive = False
        if not self.body_done or self.upgrade:
            # the rest of the body (or the refused upgrade's stream) cannot
            # be skipped reliably: close after this response
            self.keep_alive = False
        end = b"\r\n"
        if self._chunked_out:
            end = b"Transfer-Encoding: chunked\r\n" + end
        if not self.keep_alive:
            end = b"Connection: close\r\n" + end
        elif self.clientproto != b"HTTP/1.1":
            end = b"Connection: keep-alive\r\n" + end
        self._head = status_line(code, reason) + header_lines(headers) + end

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write() after finish()")
        if self._disconnected:
            return
        if not self.started:
            self._generic_start()
        if self._no_body:
            data = b""
        batcher = self.channel.batcher
        bwrite = batcher.write
        head = self._head
        if len(data) >= SEND_NOW:
            # a large chunk: sent with its framing, without joining them
            self.sentLength += len(data)
            if self._chunked_out:
                pieces: tuple[bytes, ...] = (_hex(len(data)), data, b"\r\n")
            else:
                pieces = (data,)
            if head is not None:
                self._head = None
                pieces = (head,) + pieces
            batcher.write_pieces(self.transport, pieces)
        elif head is not None:
            self._head = None
            if data:
                self.sentLength += len(data)
                if self._chunked_out:
                    bwrite(self.transport, head + _hex(len(data)) + data + b"\r\n")
                else:
                    bwrite(self.transport, head + data)
            else:
                bwrite(self.transport, head)
        elif data:
            self.sentLength += len(data)
            if self._chunked_out:
                bwrite(self.transport, _hex(len(data)) + data + b"\r\n")
            else:
                bwrite(self.transport, data)

    def splice_transport(self) -> Any:
        """
        The client's plain TCP transport, if the rest of this response's
        body may be written to its socket directly (by splice, see
        L{mproxy.http.splice}): the head and everything written before
        are in the socket (what was pending is sent now), the body is
        framed by its length (not chunked, not suppressed) and the
        connection is open; else C{None} (the body goes on through
        L{write}).
        """
        if (self._head is not None or self._chunked_out or self._no_body or self.finished
                or self._disconnected):
            return None
        t = self.transport
        if type(t) not in DIRECT_TYPES or not self.channel.batcher.sent_out(t):
            return None
        return t

    def spliced(self, n: int) -> None:
        """
        C{n} body bytes went to the client's socket by splice.
        """
        self.sentLength += n

    def set_splice_target(self, target: Callable[[], Any]) -> None:
        """
        C{target()} gives the plain TCP transport the rest of a
        Content-Length body may be spliced to (once everything written to
        it is in its socket), or C{None}; the connection asks it while the
        body's consumer takes it as it arrives.
        """
        self._splice_target = target

    def stop_body_splice(self) -> None:
        """
        The request body's splice, if one runs, is abandoned (the client's
        transport reads for itself again).
        """
        relay = self._body_splice
        if relay is not None:
            self._body_splice = None
            relay.stop()
            # (reading may have been paused for the target's full socket)
            self.channel.resume_reading("splice")

    def finish(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.finished or self._disconnected:
            return
        if self._body_splice is not None:
            # answered before the body's end: what is left of it is read
            # (and dropped) by the connection
            self.stop_body_splice()
        if not self.started:
            self._generic_start()
        end = b""
        if self._chunked_out:
            if trailers:
                end = b"0\r\n" + header_lines(trailers) + b"\r\n"
            else:
                end = b"0\r\n\r\n"
        bwrite = self.channel.batcher.write
        head = self._head
        if head is not None:
            self._head = None
            bwrite(self.transport, head + end)
        elif end:
            bwrite(self.transport, end)
        self.finished = 1
        # never called once finished (see connectionLost); dropped so that
        # the request does not keep its handler's owner alive in a cycle
        self._lost_handler = None
        if self._producer is not None:
            self.unregisterProducer()
        self.channel.request_done(self)
        n = self._notifications
        if n:
            self._notifications = None
            for d in n:
                d.callback(None)

    def abort(self) -> None:
        """
        Abort the client connection (a response already started cannot be
        completed).
        """
        if not self.finished:
            self.channel.abort()

    def set_lost_handler(self, fn: Callable[[], None] | None) -> None:
        self._lost_handler = fn

    def close_after_response(self) -> None:
        self.keep_alive = False

    def set_shutdown_handler(self, fn: Callable[[], None]) -> None:
        self.on_shutdown = fn

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._disconnected:
            producer.stopProducing()
            return
        self._producer = producer
        self.transport.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    def take_over(self, on_data: Callable[[bytes], None]) -> None:
        """
        After a 101 response: every byte the client sends from now on is
        given to C{on_data}; L{write} sends raw bytes.
        """
        self._tunnel = on_data
        self.channel.start_tunnel(self, on_data)

    def tunnel_write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self.channel.batcher.write(self.transport, data)

    def close_connection(self) -> None:
        """
        Close the client connection once what was written is sent (ends a
        tunnel).
        """
        self.channel.close()

    def connectionLost(self, reason: Any) -> None:
        if self.finished:
            return
        self._disconnected = True
        self.stop_body_splice()
        if self._producer is not None:
            self._producer = None
        fn = self._lost_handler
        if fn is not None:
            self._lost_handler = None
            fn()
        n = self._notifications
        if n:
            self._notifications = None
            for d in n:
                d.errback(reason)
