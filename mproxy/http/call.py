# -*- test-case-name: tests.test_proxy -*-
"""
L{ProxyCall}: the state of one proxied request, and L{complete}, its end.

A L{ProxyCall} is a plain record that the steps of the request path
(L{mproxy.http.proxy}) and the upstream relay (L{mproxy.http.relay}) fill
in and read; it has no behaviour of its own.  L{complete} runs exactly once
per request, whatever ended it: it stops the send timer, drops the body
spools, releases the target claim, writes the C{Request} log line
(L{mproxy.http.reqlog}) and reports the request to the metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from mproxy.http import reqlog
from mproxy.http.spool import Spool

if TYPE_CHECKING:
    from mproxy.http.interfaces import IClaim, IExchange, IProxiedService, IUpstreamExchange
    from mproxy.http.proxy import ProxyResource
    from mproxy.http.relay import Relay


class ProxyCall:
    """
    One proxied request.

    @ivar res: the L{ProxyResource} (router, logger, clock, ports, metrics).
    @ivar rq: the client exchange (L{IExchange}).
    @ivar status: the status logged (the response's, or 499).
    @ivar host: the Host header.
    @ivar path: the decoded, dot-segment-free path routing saw.
    @ivar raw_path: the percent-encoded path after dot-segment removal, or
        C{None} when the request's own C{path} had none.
    @ivar target_path: C{path} as the target sees it (prefix stripped).
    @ivar prefix: the stripped prefix (C{""} when nothing was stripped).
    @ivar done: L{complete} ran; every later event is ignored.
    @ivar tunnel: the response was a 101 and the exchange is a byte tunnel.
    @ivar upgrade_type: C{b"websocket"} for a WebSocket handshake.
    @ivar trailers_ok: the client accepts trailers (C{TE: trailers}).
    @ivar held: the service's Deferred while a paused service holds the
        request.
    @ivar stall_timer: the send timer while the client's socket is full.
    @ivar req_spool: the buffered request body.
    @ivar resp_spool: the buffered response body, C{resp_head} its head.
    @ivar metered: counted in the metrics' in-flight gauge.
    @ivar tried: the targets of the earlier attempts, when the request was
        sent again (L{mproxy.http.retry}), else C{None}.
    @ivar retry_deadline: until when (C{clock.seconds()}) it may be sent
        again, from its first failed attempt.
    @ivar req_sender: the producer sending the buffered body.
    """

    __slots__ = (
        "res", "rq", "relay", "start_ns", "host", "path", "raw_path", "target_path",
        "prefix", "request_id", "status", "service", "topts", "target", "claim", "up",
        "resp_ctype", "req_ctype", "user_agent", "remote_addr", "done", "tunnel",
        "upgrade_type", "log_extra", "trailers_ok", "req_spool", "resp_spool", "resp_head",
        "metered", "held", "stall_timer", "tried", "retry_deadline", "req_sender",
    )

    def __init__(self, res: ProxyResource, rq: IExchange) -> None:
        self.res = res
        self.rq: Any = rq
        self.relay: Relay | None = None
        self.start_ns = res.now_ns()
        self.status = 200
        self.service: IProxiedService | None = None
        self.topts: Any = None
        self.target = ""
        self.claim: IClaim | None = None
        self.up: IUpstreamExchange | None = None
        self.resp_ctype = b""
        self.req_ctype = b""
        self.user_agent = b""
        self.remote_addr = b""
        self.request_id = b""
        self.host = b""
        self.path = ""
        self.raw_path: bytes | None = None
        self.target_path = ""
        self.prefix = ""
        self.done = False
        self.tunnel = False
        self.upgrade_type = b""
        self.log_extra: dict[str, str] | None = None
        self.trailers_ok = False
        self.req_spool: Spool | None = None
        self.resp_spool: Spool | None = None
        self.resp_head: Any = None
        self.metered = False
        self.held: Deferred[Any] | None = None
        self.stall_timer: Any = None
        self.tried: list[str] | None = None
        self.retry_deadline: float | None = None
        self.req_sender: Any = None


def log_headers(call: ProxyCall, prefix: str, names: Any,
                headers: list[tuple[bytes, bytes]]) -> None:
    """
    Add C{<prefix><name>} fields for the headers a service logs.
    """
    extra = call.log_extra
    if extra is None:
        extra = call.log_extra = {}
    for name in names:
        lname = name.lower().encode("latin-1")
        values = [v.decode("latin-1") for n, v in headers if n.lower() == lname]
        extra[prefix + name.lower().replace("-", "_")] = ",".join(values)


def cancel_stall_timer(call: ProxyCall) -> None:
    t = call.stall_timer
    if t is not None:
        call.stall_timer = None
        if t.active():
            t.cancel()


def complete(call: ProxyCall) -> None:
    """
    The request is over (see the module docstring); runs once.
    """
    if call.done:
        return
    call.done = True
    cancel_stall_timer(call)
    if call.req_spool is not None:
        call.req_spool.close()
    if call.resp_spool is not None:
        call.resp_spool.close()
    claim = call.claim
    if claim is not None:
        claim.set_canceller(None)
        claim.release()
        if call.topts.log_request_headers:
            log_headers(call, "req_", call.topts.log_request_headers, call.rq.raw_headers)
    res = call.res
    duration = res.now_ns() - call.start_ns
    reqlog.log_request(res.logger, call, duration)
    metrics = res.metrics
    if metrics is not None:
        service = call.service
        if service is None:
            metrics.observe("", call.rq.method.decode("latin-1"), call.status, duration / 1e9)
        elif call.metered:
            metrics.leave(service.name)
            metrics.observe(service.name, call.rq.method.decode("latin-1"), call.status,
                            duration / 1e9)
    # Nothing reaches the relay or the upstream exchange through the call
    # from now on (every later event stops at call.done): without these
    # links (call -> relay -> call, call -> exchange -> relay -> call) the
    # request's objects are freed by reference counting as soon as it is
    # over, instead of by the cyclic garbage collector, whose collections
    # (triggered by what is allocated and not yet freed) cost every request.
    call.relay = None
    call.up = None
