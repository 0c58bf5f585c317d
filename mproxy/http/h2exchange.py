# -*- test-case-name: tests.test_h2 -*-
"""
L{H2Request}: one HTTP/2 stream of an L{mproxy.http.h2.H2Channel} as the
exchange the proxy drives (the HTTP/2 counterpart of
L{mproxy.http.request.FastRequest}, whose Twisted C{Request} face it
shares, so that ordinary resources work too).

What the stream does for the proxy:

    - The request body is delivered as it arrives (L{set_body_consumer}),
      with backpressure: while the consumer is paused (L{body_producer}),
      or before one is set, received DATA is held and not acknowledged on
      the stream (the connection's window is given back at receipt), so
      the client's stream window closes and it stops sending.  Before the
      stream is dispatched, the channel collects a small body itself (see
      L{mproxy.http.h2.PREBUFFER}).
    - The response head is an HPACK header list (names lowercased,
      connection-specific fields dropped, credentials never indexed), sent
      with the first body bytes or, for a response without a body, as one
      HEADERS frame that ends the stream.  Body bytes are queued on the
      channel, which sends them as the flow-control windows allow; while a
      stream's window is full its producer (the relay) is paused.
    - L{abort} resets the stream (RST_STREAM), not the connection.

    req = H2Request(channel, stream_id, method, uri, raw_headers)
    channel.streams[stream_id] = req
"""

from __future__ import annotations

from typing import Any, Callable

from zope.interface import implementer

from mproxy.http.interfaces import ITunnelExchange
from mproxy.http.request import FastRequest

__all__ = ["H2Request"]

_NO_BODY_CODES = frozenset((204, 304))


class _StreamBodyProducer:
    """
    Pauses and resumes the delivery (and the acknowledgement) of one
    stream's request body.
    """

    __slots__ = ("request",)

    def __init__(self, request: "H2Request") -> None:
        self.request = request

    def pauseProducing(self) -> None:
        self.request._body_paused = True

    def resumeProducing(self) -> None:
        r = self.request
        r._body_paused = False
        r._deliver()

    def stopProducing(self) -> None:
        self.request._body_paused = True


@implementer(ITunnelExchange)
class H2Request(FastRequest):
    """
    A request received on one stream of an L{H2Channel} (see the module
    docstring).
    """

    _response_headers: list[tuple[bytes, bytes]] = []
    _head_sent = False
    #: the relay (or another producer) paused while the send window is full
    _producing = False
    _body_paused = False
    #: received request body not yet delivered: (data, flow-controlled length)
    _held: list[tuple[bytes, int]] | None = None
    _held_bytes = 0
    _ended_delivered = False
    _reset = False

    def __init__(self, channel: Any, stream_id: int, method: bytes, uri: bytes,
                 raw_headers: list[tuple[bytes, bytes]]) -> None:
        FastRequest.__init__(self, channel, method, uri, b"HTTP/2.0", raw_headers)
        self.stream_id = stream_id
        # the stream writes through its channel, never to the TLS transport
        self.transport = None
        # (read for every request: faster as the instance's own)
        self._reset = False
        self._head_sent = False

    def __repr__(self) -> str:
        return f"<H2Request {self.stream_id} {self.method!r} {self.uri!r}>"

    # --- request body -----------------------------------------------------------

    def body_received(self, data: bytes, flow_length: int) -> None:
        """
        DATA arrived for this (dispatched) stream.
        """
        if self.finished or self._reset:
            self.channel.acknowledge(self.stream_id, flow_length)
            return
        if self._on_data is not None and not self._body_paused and not self._held:
            self.channel.acknowledge(self.stream_id, flow_length)
            self._on_data(data)
            return
        if self._held is None:
            self._held = []
        self._held.append((data, flow_length))
        self._held_bytes += len(data)

    def body_complete(self) -> None:
        self.body_done = True
        if self._on_end is not None and not self._body_paused and not self._held:
            self._end_body()

    def _end_body(self) -> None:
        if not self._ended_delivered:
            self._ended_delivered = True
            on_end = self._on_end
            assert on_end is not None
            on_end()

    def set_body_consumer(self, on_data: Callable[[bytes], None],
                          on_end: Callable[[], None],
                          on_error: Callable[[int, str], None]) -> None:
        self._on_data = on_data
        self._on_end = on_end
        self._on_error = on_error
        self._deliver()

    def _deliver(self) -> None:
        """
        Pass held body data to the consumer (acknowledging it) while it is
        not paused; then the end, if it arrived.
        """
        on_data = self._on_data
        if on_data is None:
            return
        held = self._held
        ack = 0
        while held and not self._body_paused and not self.finished:
            data, n = held.pop(0)
            self._held_bytes -= len(data)
            ack += n
            on_data(data)
        if ack:
            self.channel.acknowledge(self.stream_id, ack)
        if not held and self.body_done and self.body_length and not self._body_paused:
            self._end_body()

    def release_held(self) -> None:
        """
        The stream is over: drop the held body data.
        """
        self._held = None
        self._held_bytes = 0

    _body_producer: _StreamBodyProducer | None = None

    @property
    def body_producer(self) -> _StreamBodyProducer:
        p = self._body_producer
        if p is None:
            p = self._body_producer = _StreamBodyProducer(self)
        return p

    def send_continue(self) -> None:
        """
        Answer C{Expect: 100-continue}: we are about to read the body.
        """
        if self.expect_continue and not self.started:
            self.expect_continue = False
            if not self.body_done:
                self.channel.send_informational(self.stream_id, [(b":status", b"100")])

    # --- response -----------------------------------------------------------------

    def send_informational(self, code: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def close_after_response(self) -> None:
        pass

    def start_response(self, code: int, reason: bytes | None,
                       headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.started = True
        self.code = code
        if self.extra_headers:
            headers = headers + self.extra_headers
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            self._no_body = True
        self._response_headers = headers

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write() after finish()")
        if self._disconnected:
            return
        if not self.started:
            self._generic_start()
        if not data:
            return
        self.sentLength += len(data)
        if not self._head_sent:
            self._send_head(False)
        if self._no_body or self._reset:
            return
        self.channel.queue_data(self.stream_id, data)

    def _send_head(self, end: bool) -> None:
        self._head_sent = True
        headers, self._response_headers = self._response_headers, []
        self.channel.send_head(self.stream_id, self.code, headers, end)

    def finish(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.finished or self._disconnected:
            return
        if not self.started:
            self._generic_start()
        self.finished = 1
        self._lost_handler = None
        if self._producer is not None:
            self.unregisterProducer()
        if not self._reset:
            if not self._head_sent:
                self._send_head(True)
                self.channel.stream_ended(self.stream_id, False)
            else:
                self.channel.stream_ended(self.stream_id, True)
        n = self._notifications
        if n:
            self._notifications = None
            for d in n:
                d.callback(None)

    def abort(self) -> None:
        """
        Reset the stream (a response already started cannot be completed).
        """
        if not self.finished:
            self.finished = 1
            self._lost_handler = None
            self.channel.reset_stream(self.stream_id)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._disconnected:
            producer.stopProducing()
            return
        self._producer = producer
        self._producing = True
        if self.channel.remaining_window(self.stream_id) <= 0:
            self.window_blocked()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producing = False

    def window_blocked(self) -> None:
        """
        The stream's send window (less what is queued) is used up.
        """
        p = self._producer
        if p is not None and self._producing:
            self._producing = False
            p.pauseProducing()

    def window_opened(self) -> None:
        """
        The stream's send window grew.
        """
        p = self._producer
        if p is not None and not self._producing:
            if self.channel.remaining_window(self.stream_id) > 0:
                self._producing = True
                p.resumeProducing()

    def take_over(self, on_data: Callable[[bytes], None]) -> None:
        raise RuntimeError("HTTP/2 streams are not upgraded")

    def tunnel_write(self, data: bytes) -> None:
        raise RuntimeError("HTTP/2 streams are not upgraded")

    def close_connection(self) -> None:
        self.abort()

    def stream_reset(self, reason: Any) -> None:
        """
        The client reset the stream, or the connection is gone.
        """
        self._reset = True
        self.connectionLost(reason)
