# -*- test-case-name: tests.test_retry -*-
"""
What happens when a request could not be delivered to its target.

    handled = after_failure(call, error)   # error: an UpstreamError

Passive ejection: a connection to the target that could not be made
(refused, unreachable, connect timeout), or a new connection closed or reset
before any byte of the response, takes the target out of rotation at once
(L{IProxiedTarget.eject}); its health checks bring it back.  A response,
whatever its status, is never a failure, and a re-used keep-alive connection
that the target closed is not held against it (it is how idle connections
end).

Then the request is sent again, when nothing of it can have had an effect
or doing it twice is harmless (L{may_resend}):

  - the connection could not be made: always, any method;
  - the connection was closed or reset before any byte of the response: for
    idempotent methods (L{IDEMPOTENT}) and requests carrying an
    C{Idempotency-Key} header;

and only when the proxy still has the body: none, buffered
(C{--buffer-requests}: sent again from the spool), or streamed but never
sent (the connect failed: what was queued goes to the new connection; the
rest follows).  A response that has started is never sent again.  The new
attempt always uses a new connection, on another healthy target when there
is one (L{IProxiedService.retry}).

With a retry timeout of 0, a request is sent again once at most.  With one,
it may be sent again until the timeout has passed since its first failed
attempt (at most L{MAX_ATTEMPTS} attempts in all), waiting for a target to
become healthy when none is; when the wait runs out it gets the 503 page.
Each resend is logged (C{Retrying request}) and counted, and the request's
log line has C{attempts} and C{tried} (every target tried, in order).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mproxy.http import forwarding
from mproxy.http.call import ProxyCall
from mproxy.http.interfaces import IRefusal
from mproxy.http.responses import internal_error, send_page
from mproxy.http.spool import SpoolSender
from mproxy.http.upstream import CLOSED, NOT_CONNECTED

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

#: attempts a request gets at most, however long its retry timeout
MAX_ATTEMPTS = 10


def has_idempotency_key(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, _ in headers:
        if len(name) == 15 and name.lower() == b"idempotency-key":
            return True
    return False


def may_resend(call: ProxyCall, error: Any) -> bool:
    """
    Whether the request may be sent again after C{error} (see the module
    docstring).
    """
    kind = error.kind
    rq = call.rq
    if rq.started or call.tunnel:
        return False
    if kind == NOT_CONNECTED:
        # Nothing was sent; a streamed body is still queued in the exchange.
        return True
    if kind != CLOSED:
        return False
    if rq.method not in IDEMPOTENT and not has_idempotency_key(rq.raw_headers):
        return False
    # The body went to the closed connection: only a buffered one is still here.
    return not rq.body_length or call.req_spool is not None


def _eject(call: ProxyCall, error: Any) -> None:
    if error.kind == CLOSED and error.reused:
        return
    claim: Any = call.claim
    target = claim.target
    if target.eject(error.message):
        res = call.res
        service: Any = call.service
        res.logger.warn("Target ejected", service=service.name, target=target.address,
                        error=error.message)
        if res.metrics is not None:
            res.metrics.ejected(service.name, target.address)


def after_failure(call: ProxyCall, error: Any) -> bool:
    """
    The exchange with the claimed target failed with C{error} (an
    L{mproxy.http.upstream.UpstreamError}): eject the target if the failure
    says it is unreachable, and send the request again if allowed.  Returns
    C{True} when the request goes on (sent again, waiting for a target, or
    answered); C{False} leaves the failure to the caller.
    """
    if not error.kind or call.claim is None:
        return False
    _eject(call, error)
    if not may_resend(call, error):
        return False
    topts = call.topts
    res = call.res
    tried = call.tried
    if tried is None:
        tried = call.tried = []
    timeout = topts.retry_timeout
    now = res.clock.seconds()
    if timeout:
        if len(tried) + 1 >= MAX_ATTEMPTS:
            return False
        if call.retry_deadline is None:
            call.retry_deadline = now + timeout
        wait = max(0.0, call.retry_deadline - now)
    else:
        if tried:
            return False
        wait = 0.0
    old_up: Any = call.up
    streamed = bool(call.rq.body_length) and call.req_spool is None
    if streamed and not old_up.body_ended:
        # More of the body is still to come from the client: it can only
        # follow a new exchange made now, not after a wait.
        wait = 0.0
    service: Any = call.service
    claim: Any = call.claim
    tried.append(call.target)
    res.logger.info("Retrying request", service=service.name, path=call.path,
                    target=call.target, error=error.message, attempt=len(tried) + 1)
    if res.metrics is not None:
        res.metrics.retried(service.name)
    # Let go of the failed attempt.
    call.claim = None
    call.up = None
    claim.set_canceller(None)
    claim.release()
    sender = call.req_sender
    if sender is not None:
        call.req_sender = None
        sender.stopProducing()
    try:
        result = service.retry(claim, tried, wait)
    except Exception:
        internal_error(Failure(), call)
        return True
    if isinstance(result, Deferred):
        call.held = result
        result.addCallback(_resend, call, old_up if streamed else None)
        result.addErrback(internal_error, call)
        return True
    _resend(result, call, old_up if streamed else None)
    return True


def _resend(result: Any, call: ProxyCall, replay: Any) -> None:
    """
    The service gave a new claim (send the request again on a new
    connection) or a refusal (the 503 page).
    """
    call.held = None
    if IRefusal.providedBy(result):
        if call.done:
            return
        if result.unavailable and call.res.metrics is not None:
            call.res.metrics.unavailable(call.service.name)  # type: ignore[union-attr]
        send_page(call, result.status, result.message)
        return
    if call.done:
        # the client left while the request waited
        result.release()
        return
    relay: Any = call.relay
    h = relay.h
    forwarding.remove_target_headers(call, h)
    call.claim = result
    call.target = result.target.address
    forwarding.add_target_headers(call, h)
    result.set_canceller(relay.drain_cancel)
    spool = call.req_spool
    up = relay.forward(h, fresh=True, replay=replay)
    if call.done or spool is None:
        return
    spool.rewind()
    sender = call.req_sender = SpoolSender(spool, up.write_body, up.end_body)
    up.set_body_producer(sender)
    sender.start()
