# -*- test-case-name: tests.test_proxy -*-
"""
L{GenericExchange}: the exchange API of L{mproxy.http.request.FastRequest}
on top of any standard L{twisted.web.server.Request}, so that the proxy
resource also serves requests from Twisted's own HTTP/1.1 and HTTP/2
channels (the body was buffered by Twisted already; upgrades are not
offered there).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mproxy.http.interfaces import IExchange
from mproxy.http.request import address_strings, reason_bytes


@implementer(IExchange)
class GenericExchange:
    """
    The exchange API of L{FastRequest} on top of a standard
    L{twisted.web.server.Request} (HTTP/2, or HTTP/1.1 through Twisted's own
    channel).  The body was buffered by Twisted already; upgrades are not
    offered.
    """

    upgrade = False
    expect_continue = False
    started = False
    finished = False
    #: headers added to every response (L{ProxyResource.alt_svc})
    extra_headers: list[tuple[bytes, bytes]] = []
    _lost: Callable[[], None] | None = None
    _watching = False

    def __init__(self, request: Any) -> None:
        self.r = request
        self.method = request.method
        uri = request.uri
        self.uri = uri
        q = uri.find(b"?")
        self.path, self.query = (uri, b"") if q < 0 else (uri[:q], uri[q + 1:])
        proto = request.clientproto
        self.clientproto = b"HTTP/2.0" if proto.startswith(b"HTTP/2") else proto
        self.raw_headers = [
            (k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs
        ]
        self.client = request.getClientAddress()
        self.client_strings = address_strings(self.client)
        self.is_tls = bool(request.isSecure())
        content = request.content
        n = 0
        if content is not None:
            content.seek(0, 2)
            n = content.tell()
            content.seek(0)
        self.body_length = n
        self.rewrite_length = True
        self.sentLength = 0
        self.code = 200

    _on_data: Callable[[bytes], None] | None = None
    _on_end: Callable[[], None] | None = None
    _paused = False
    _pumping = False
    _body_sent = False

    def set_body_consumer(self, on_data: Callable[[bytes], None], on_end: Callable[[], None],
                          on_error: Callable[[int, str], None]) -> None:
        """
        Feed the (already buffered) body in chunks, as fast as the consumer
        takes it (L{body_producer} is paused while it is full).
        """
        self._on_data = on_data
        self._on_end = on_end
        self._pump()

    def _pump(self) -> None:
        if self._pumping or self._body_sent or self._on_data is None:
            return
        self._pumping = True
        try:
            content = self.r.content
            while not self._paused:
                chunk = content.read(65536) if content is not None and self.body_length else b""
                if not chunk:
                    self._body_sent = True
                    assert self._on_end is not None
                    self._on_end()
                    return
                self._on_data(chunk)
        finally:
            self._pumping = False

    # body_producer: paused while the target cannot take more of the body

    @property
    def body_producer(self) -> Any:
        return self

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._paused = True

    def send_continue(self) -> None:
        pass

    def send_informational(self, code: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    _close = False

    def close_after_response(self) -> None:
        self._close = True

    def start_response(self, code: int, reason: bytes | None,
                       headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        r = self.r
        self.started = True
        if self.extra_headers:
            headers = headers + self.extra_headers
        if self._close:
            headers.append((b"Connection", b"close"))
        self.code = code
        r.setResponseCode(code, reason or reason_bytes(code))
        h = Headers()
        for name, value in headers:
            h.addRawHeader(name, value)
        r.responseHeaders = h
        r.defaultContentType = None

    def write(self, data: bytes) -> None:
        if data and not self.finished:
            self.sentLength += len(data)
            self.r.write(data)

    def finish(self, trailers: Any = None) -> None:
        if not self.finished:
            self.finished = True
            if self._producer:
                self.unregisterProducer()
            try:
                self.r.finish()
            except RuntimeError:
                pass

    def abort(self) -> None:
        """
        Abort the request's stream or connection.  The channels standard
        requests reach the proxy on (Twisted's HTTP/2 streams, the
        in-memory channel of L{mproxy.http.localget}) can abort.
        """
        self.finished = True
        self.r.channel.abortConnection()

    def set_lost_handler(self, fn: Callable[[], None] | None) -> None:
        self._lost = fn
        if self._watching:
            return
        self._watching = True

        def lost(_: Failure) -> None:
            if not self.finished:
                self.finished = True
                handler, self._lost = self._lost, None
                if handler is not None:
                    handler()

        self.r.notifyFinish().addErrback(lost)

    _producer = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        try:
            self.r.registerProducer(producer, True)
            self._producer = True
        except (ValueError, RuntimeError, AttributeError):
            pass

    def unregisterProducer(self) -> None:
        self._producer = False
        try:
            self.r.unregisterProducer()
        except (ValueError, RuntimeError, AttributeError):
            pass
