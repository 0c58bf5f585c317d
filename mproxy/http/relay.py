# -*- test-case-name: tests.test_proxy -*-
"""
The upstream relay: one request's exchange with its target.

    relay = Relay(call)
    relay.forward(headers)   # start the upstream exchange (call.up)

A L{Relay} is the L{IUpstreamReceiver} of the upstream exchange: it relays
the target's response head (L{mproxy.http.forwarding.response_headers}),
body and trailers to the client, holds buffered responses
(L{mproxy.http.buffering}), and turns a 101 into a byte tunnel.  It is the
L{IPushProducer} the client connection pauses when its socket is full: the
upstream is paused with it, and a client that reads nothing for
L{SEND_TIMEOUT} seconds is dropped.  It also owns cancellation: the client
going away (L{Relay.client_lost}: the upstream exchange is abandoned, 499),
a drain's deadline (L{Relay.drain_cancel}: 504, or a WebSocket close frame
1001) and a broken request body (L{Relay.body_error}: 400/408).

A failed exchange goes to L{mproxy.http.retry} first (ejection, sending the
request again); errors end in L{mproxy.http.responses.fail}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mproxy.http import buffering, retry
from mproxy.http.call import ProxyCall, cancel_stall_timer, complete, log_headers
from mproxy.http.forwarding import RequestHeaders, informational_headers, response_headers
from mproxy.http.interfaces import IUpstreamExchange, IUpstreamReceiver
from mproxy.http.paths import target_uri
from mproxy.http.request import FastRequest
from mproxy.http.responses import abort, fail

#: seconds a client may leave a response unread (its socket full) before
#: the exchange is abandoned
SEND_TIMEOUT = 60.0

#: RFC 6455 close frame, code 1001 "going away", unmasked
WEBSOCKET_GOING_AWAY = b"\x88\x02\x03\xe9"


@implementer(IUpstreamReceiver, IPushProducer)
class Relay:
    """
    See the module docstring.
    """

    __slots__ = ("call", "h")

    def __init__(self, call: ProxyCall) -> None:
        self.call = call
        self.h: RequestHeaders | None = None

    def forward(self, h: RequestHeaders, fresh: bool = False,
                replay: IUpstreamExchange | None = None) -> IUpstreamExchange:
        """
        Send the request to the claimed target (C{fresh}, C{replay}: see
        L{IUpstreamPool.request}).
        """
        call = self.call
        rq = call.rq
        self.h = h
        call.up = up = call.claim.target.pool.request(  # type: ignore[union-attr]
            rq.method, target_uri(call), h.out, self, body_length=rq.body_length,
            timeout=call.topts.target_timeout, codings=h.codings, fresh=fresh,
            replay=replay,
        )
        return up

    def stream_body(self, up: IUpstreamExchange) -> None:
        """
        Stream the request body to the target as it arrives (to whichever
        exchange is current: a request sent again goes on in a new one).
        """
        rq = self.call.rq
        up.set_body_producer(rq.body_producer)
        rq.send_continue()
        if type(rq) is FastRequest:
            rq.set_splice_target(self._body_splice_target)
        rq.set_body_consumer(self._body_data, self._body_end, self.body_error)

    def _body_splice_target(self) -> Any:
        """
        The target's transport the request body's rest may be spliced to
        (a streamed body, not buffered, going to a plain TCP connection),
        else C{None}.
        """
        call = self.call
        up: Any = call.up
        if up is None or call.done or call.req_spool is not None:
            return None
        return up.body_splice_transport()

    def _body_data(self, data: bytes) -> None:
        up = self.call.up
        if up is not None:
            up.write_body(data)

    def _body_end(self) -> None:
        up = self.call.up
        if up is not None:
            up.end_body()

    # --- IUpstreamReceiver ------------------------------------------------------

    def upstream_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        call = self.call
        if status == 100 or call.done:
            return
        call.rq.send_informational(status, informational_headers(headers))

    def upstream_response(self, status: int, reason: bytes,
                          headers: list[tuple[bytes, bytes]]) -> None:
        call = self.call
        if call.done:
            return
        r = response_headers(call, headers)
        if r.bad_length:
            self._target_failed(502, "invalid Content-Length from target")
            return
        out = r.out
        topts = call.topts
        if topts.log_response_headers:
            log_headers(call, "resp_", topts.log_response_headers, out)
        call.status = status
        if status == 101:
            self._start_tunnel(reason, out, r.upgrade)
            return
        if buffering.hold_response(call, status, reason or None, out, r.length):
            return
        rq = call.rq
        rq.start_response(status, reason or None, out, r.length)
        rq.registerProducer(self, True)

    def _start_tunnel(self, reason: bytes, out: list[tuple[bytes, bytes]],
                      upgrade: bytes) -> None:
        call = self.call
        if not call.upgrade_type or upgrade.lower() != call.upgrade_type:
            self._target_failed(502, "target switched to an unexpected protocol")
            return
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgrade))
        call.tunnel = True
        call.claim.mark_upgraded()  # type: ignore[union-attr]
        rq = call.rq
        up: Any = call.up
        rq.start_response(101, reason or None, out, None)
        rq.tunnel_write(b"")
        rq.set_shutdown_handler(self.drain_cancel)  # 1001 and close, as at a drain deadline
        rq.take_over(up.write_raw)
        rq.registerProducer(self, True)
        up.set_tunnel_producer(rq.body_producer)

    @property
    def takes_views(self) -> bool:
        """
        Large response body pieces may be memoryviews: an HTTP/1.1 client's
        request writes them with L{mproxy.http.batch.WriteBatcher}, which
        takes them (HTTP/2 and HTTP/3 streams get C{bytes}).
        """
        return type(self.call.rq) is FastRequest

    def splice_transport(self) -> Any:
        """
        The client's TCP transport, when the rest of the body may go to its
        socket by splice (L{mproxy.http.splice}): a response relayed as it
        comes (not buffered, not a tunnel) to an HTTP/1.1 connection's
        request, which says whether its transport can take it; else
        C{None}.
        """
        call = self.call
        if call.done or call.tunnel or call.resp_spool is not None:
            return None
        rq = call.rq
        if type(rq) is not FastRequest:
            return None
        return rq.splice_transport()

    def spliced(self, n: int) -> None:
        self.call.rq.spliced(n)

    def splice_broken(self) -> None:
        """
        The client's socket failed under a spliced body: the client
        connection is aborted (its loss ends the request).
        """
        self.call.rq.abort()

    def upstream_data(self, data: bytes) -> None:
        call = self.call
        if call.done:
            return
        if call.tunnel:
            call.rq.tunnel_write(data)
        elif call.resp_spool is not None:
            buffering.buffer_response_data(call, data)
        else:
            call.rq.write(data)

    def upstream_done(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        call = self.call
        if call.done:
            return
        if call.resp_spool is not None:
            buffering.send_held_response(call)
            return
        rq = call.rq
        if call.tunnel:
            rq.close_connection()
        else:
            rq.finish(trailers if call.trailers_ok else None)
        complete(call)

    def upstream_failed(self, error: Any) -> None:
        call = self.call
        if call.done:
            return
        if error.kind and retry.after_failure(call, error):
            return
        self._target_failed(error.status, error.message)

    def _target_failed(self, status: int, message: str) -> None:
        call = self.call
        call.res.logger.error("Error while proxying", target=call.target, path=call.path,
                              error=message)
        fail(call, status)

    # --- IPushProducer towards the client: the upstream, plus a send timeout

    def pauseProducing(self) -> None:
        call = self.call
        up = call.up
        if up is not None:
            up.pauseProducing()
        if call.stall_timer is None and not call.done:
            call.stall_timer = call.res.clock.callLater(SEND_TIMEOUT, self._client_stalled)

    def resumeProducing(self) -> None:
        call = self.call
        cancel_stall_timer(call)
        up = call.up
        if up is not None:
            up.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _client_stalled(self) -> None:
        """
        The client has not read anything for SEND_TIMEOUT seconds.
        """
        call = self.call
        call.stall_timer = None
        if call.done:
            return
        call.res.logger.info("Client stopped reading", path=call.path, target=call.target)
        abort(call)

    # --- cancellation -----------------------------------------------------------

    def body_error(self, status: int, message: str) -> None:
        """
        The client's request body is malformed (bad chunked framing, 400) or
        stopped arriving (408).
        """
        call = self.call
        if call.done:
            return
        if status == 408:
            call.res.logger.info("Request body timed out", path=call.path)
        else:
            call.res.logger.info("Malformed chunked request", path=call.path, error=message)
        fail(call, status)

    def client_lost(self) -> None:
        """
        The client hung up: abandon the upstream request; log 499 unless a
        response was already under way.
        """
        call = self.call
        if call.done:
            return
        up = call.up
        if up is not None:
            if call.tunnel:
                up.close()
            else:
                up.cancel()
        if not call.rq.started:
            call.status = 499
        # A request held by a paused service is not cancelled: the service's
        # Deferred still fires, and a claim it brings is released at once.
        complete(call)

    def drain_cancel(self) -> None:
        """
        A drain's deadline passed while this request was in flight (or the
        server shuts down under a tunnel).
        """
        call = self.call
        if call.done:
            return
        rq = call.rq
        if call.tunnel:
            up: Any = call.up
            up.cancel()
            rq.tunnel_write(WEBSOCKET_GOING_AWAY)
            rq.close_connection()
            complete(call)
            return
        if not rq.started:
            call.res.logger.info("Request cancelled due to draining", path=call.path,
                                 target=call.target)
        fail(call, 504)
