# -*- test-case-name: tests.test_proxy -*-
"""
The reverse-proxy resource and the HTTP site factory.

    site = build_http_factory(reactor, router, logger, *,
                              http_port=80, https_port=443, secure=False,
                              pools=None, metrics=None, challenges=None,
                              header_timeout=None, idle_timeout=None,
                              body_timeout=None)

returns a L{mproxy.http.server.ProxySite} (a L{twisted.web.server.Site})
whose root resource is a L{ProxyResource}.  C{site.shutdown(timeout)}
returns a Deferred (see L{ProxySite.shutdown}); when C{pools} (a
L{mproxy.http.upstream.PoolRegistry}) is given its idle connections are
closed first.  C{metrics}, if given, is an
L{mproxy.http.interfaces.IRequestMetrics}: C{enter(service)} /
C{leave(service)} around the time a request is inside a service,
C{observe(service, method, status, seconds)} when it completes (unrouted
requests with service C{""}); requests whose target-view path is one of
the service's C{exclude_metrics_paths} are not counted.  C{challenges} (an
L{mproxy.http.interfaces.IHTTP01Responder}) answers ACME HTTP-01 requests
before routing.

The request path, in L{handle}, step by step (each concern in its own
module):

  1. read the headers (L{mproxy.http.forwarding});
  2. the path routing sees: decoded, dot-segments resolved
     (L{mproxy.http.paths});
  3. ACME HTTP-01 (L{mproxy.http.policy});
  4. route on Host and path (C{router.match}, an
     L{mproxy.http.interfaces.IRouter}); no route is a 404;
  5. TLS-required 503, HTTPS and canonical-host redirects
     (L{mproxy.http.policy});
  6. the forwarding headers (L{mproxy.http.forwarding});
  7. ask the service for a target (C{service.select}: a claim, a refusal,
     or a Deferred while paused);
  8. forward: buffered (L{mproxy.http.buffering}) or streamed, through the
     upstream relay (L{mproxy.http.relay}), which relays the response and
     owns cancellation;
  9. at the end, one C{Request} log line and the metrics
     (L{mproxy.http.call.complete}).

Errors go through L{mproxy.http.responses.fail}.  It works with
L{mproxy.http.server.FastRequest} (fast path, streamed request bodies,
upgrades), with its HTTP/2 counterpart L{mproxy.http.h2exchange.H2Request},
and with any standard L{twisted.web.server.Request} through
L{mproxy.http.generic.GenericExchange}.

Statuses the proxy produces itself: 301 (redirects), 400 (malformed
chunked body), 404 (no route), 408 (request body stalled for 60 s), 413
(buffered request too large), 499 (client went away; log only), 500
(buffered response too large), 502 (target unreachable or broken response;
ERROR C{Error while proxying}), 503 (refusals, TLS request to a non-TLS
service), 504 (target timeout, drain deadline, pause expiry).  A client
that leaves a response unread for C{SEND_TIMEOUT} (60 s) is dropped.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mproxy.http import buffering, forwarding, paths, policy
from mproxy.http.call import ProxyCall, complete
from mproxy.http.cookies import cookie_lookup
from mproxy.http.generic import GenericExchange
from mproxy.http.interfaces import IRefusal
from mproxy.http.relay import Relay
from mproxy.http.request import FastRequest
from mproxy.http.responses import internal_error, send_page
from mproxy.http.server import BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, ProxySite


class ProxyResource(Resource):
    """
    The reverse proxy (see the module docstring).
    """

    isLeaf = True
    #: response headers for every request that arrived over TLS (the
    #: Alt-Svc advertising HTTP/3), or None
    alt_svc: list[tuple[bytes, bytes]] | None = None

    def __init__(self, router: Any, logger: Any, *, clock: Any, http_port: int = 80,
                 https_port: int = 443, metrics: Any = None,
                 challenges: Any = None,
                 now_ns: Callable[[], int] = time.monotonic_ns,
                 wallclock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.router = router
        self.logger = logger
        self.clock = clock
        self.http_port = http_port
        self.https_port = https_port
        self.metrics = metrics
        self.challenges = challenges
        self.now_ns = now_ns
        self.wallclock = wallclock

    def render(self, request: Any) -> Any:
        rq = request if isinstance(request, FastRequest) else GenericExchange(request)
        if self.alt_svc is not None and rq.is_tls:
            rq.extra_headers = self.alt_svc
        handle(ProxyCall(self, rq))
        return NOT_DONE_YET


def handle(call: ProxyCall) -> None:
    """
    The request path (see the module docstring).
    """
    res = call.res
    rq = call.rq
    h = forwarding.read_request_headers(rq.raw_headers, res.logger)
    call.request_id = h.rid or forwarding.new_request_id()
    call.host = h.host or b""
    call.user_agent = h.user_agent
    call.req_ctype = h.ctype
    call.remote_addr = b", ".join(h.xff)
    paths.set_request_path(call)
    if policy.answer_acme(call):
        return
    match = res.router.match(call.host.decode("latin-1"), call.path)
    if match is None:
        send_page(call, 404)
        return
    _routed(call, match)
    if policy.refuse_or_redirect(call):
        return
    forwarding.add_forwarding_headers(call, h, rq.client_strings[0].encode("latin-1"),
                                      int(res.wallclock() * 1000))
    relay = call.relay = Relay(call)
    rq.set_lost_handler(relay.client_lost)
    service: Any = call.service
    try:
        result = service.select(rq.method, call.target_path, cookie_lookup(h.cookies),
                                rq.upgrade)
    except Exception:
        internal_error(Failure(), call)
        return
    if _is_deferred(result):
        call.held = result
        result.addCallback(_selected, call, h)
        result.addErrback(internal_error, call)
        return
    _selected(result, call, h)


# whether a type is a Deferred, per type: isinstance() against Deferred (an
# abstract base class's subclass) runs a Python-level check per call
_DEFERRED_TYPES: dict[type, bool] = {}


def _is_deferred(result: Any) -> bool:
    kind = type(result)
    known = _DEFERRED_TYPES.get(kind)
    if known is None:
        known = _DEFERRED_TYPES[kind] = issubclass(kind, Deferred)
    return known


def _routed(call: ProxyCall, match: Any) -> None:
    """
    The request is inside C{match.service} from now on.
    """
    service = call.service = match.service
    opts = service.options
    call.topts = service.target_options
    if match.prefix != "/" and opts.strip_prefix:
        call.target_path = match.target_path(call.path)
        call.prefix = match.prefix
    else:
        call.target_path = call.path
    metrics = call.res.metrics
    if metrics is not None:
        excluded = opts.exclude_metrics_paths
        if not excluded or call.target_path not in excluded:
            call.metered = True
            metrics.enter(service.name)


def _selected(result: Any, call: ProxyCall, h: forwarding.RequestHeaders) -> None:
    """
    The service answered: forward to the claimed target, or answer the
    refusal.
    """
    was_held = call.held is not None
    call.held = None
    refused = IRefusal.providedBy(result)
    if call.done:
        # the client left while the request was held
        if not refused:
            result.release()
        return
    if refused:
        _refused(call, result, was_held)
        return
    call.claim = result
    call.target = result.target.address
    forwarding.add_target_headers(call, h)
    relay: Any = call.relay
    result.set_canceller(relay.drain_cancel)
    rq = call.rq
    if rq.body_length and call.topts.buffer_requests and not call.upgrade_type:
        buffering.buffer_request(call, lambda: relay.forward(h), relay.body_error)
        return
    up = relay.forward(h)
    if call.done:
        return
    if rq.body_length:
        relay.stream_body(up)


def _refused(call: ProxyCall, refusal: Any, was_held: bool) -> None:
    status = refusal.status
    if status == 200:
        # the health check path of a stopped service, answered by the proxy
        call.status = 200
        call.rq.start_response(200, None, [(b"Content-Length", b"0")], 0)
        call.rq.finish()
        complete(call)
        return
    if was_held and status == 504:
        call.res.logger.warn("Rejecting request due to expired pause",
                             service=call.service.name, path=call.path)  # type: ignore[union-attr]
    elif refusal.unavailable and call.res.metrics is not None:
        call.res.metrics.unavailable(call.service.name)  # type: ignore[union-attr]
    send_page(call, status, refusal.message)


def build_http_factory(reactor: Any, router: Any, logger: Any, *, http_port: int = 80,
                       https_port: int = 443, secure: bool = False, pools: Any = None,
                       metrics: Any = None,
                       header_timeout: float | None = None,
                       idle_timeout: float | None = None,
                       challenges: Any = None,
                       body_timeout: float | None = None) -> ProxySite:
    """
    The site for an HTTP (C{secure=False}) or HTTPS (C{secure=True}: wrap
    it in TLS; ALPN C{h2} gets L{mproxy.http.h2.H2Channel}) listener.
    """
    resource = ProxyResource(router, logger, clock=reactor, http_port=http_port,
                             https_port=https_port, metrics=metrics, challenges=challenges)
    site = ProxySite(
        resource, reactor, secure=secure,
        header_timeout=HEADER_TIMEOUT if header_timeout is None else header_timeout,
        idle_timeout=IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
        body_timeout=BODY_TIMEOUT if body_timeout is None else body_timeout,
    )
    if pools is not None:
        site.on_shutdown.append(pools.close_idle)

    def failed(request: Any, failure: Failure) -> None:
        logger.error("Error while proxying", error=failure.getErrorMessage(),
                     path=request.uri.decode("latin-1"))

    site.on_render_failed = failed
    return site
