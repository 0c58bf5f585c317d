# -*- test-case-name: tests.test_proxy -*-
"""
Pre-route policy: requests the proxy answers before any target is chosen.

    answer_acme(call) -> bool          # before routing
    refuse_or_redirect(call) -> bool   # once the service is known

  - ACME HTTP-01: C{/.well-known/acme-challenge/<token>} with a pending
    challenge is answered (200, text/plain) from the
    L{mproxy.http.interfaces.IHTTP01Responder}, whatever the host.
  - TLS required: a request over TLS to a service without TLS is a 503.
  - Redirects: HTTP to HTTPS (a TLS service with TLS redirect on) and to
    the canonical host are a 301 (L{mproxy.http.redirect.redirect_location}).

Each returns C{True} when it answered the request.
"""

from __future__ import annotations

from mproxy.http.call import ProxyCall
from mproxy.http.redirect import redirect_location
from mproxy.http.responses import send_page, send_redirect, send_response

_HTTP01_PREFIX = b"/.well-known/acme-challenge/"


def answer_acme(call: ProxyCall) -> bool:
    challenges = call.res.challenges
    raw_path = call.rq.path
    if challenges is None or not raw_path.startswith(_HTTP01_PREFIX):
        return False
    body = challenges.http01_response(raw_path)
    if body is None:
        return False
    send_response(call, 200, [(b"Content-Type", b"text/plain")], body)
    return True


def refuse_or_redirect(call: ProxyCall) -> bool:
    rq = call.rq
    opts = call.service.options  # type: ignore[union-attr]
    if rq.is_tls and not opts.tls_enabled:
        send_page(call, 503)
        return True
    # only these can redirect: to HTTPS (a plain request to a TLS service
    # that redirects) or to the canonical host
    if opts.canonical_host or (opts.tls_enabled and opts.tls_redirect and not rq.is_tls):
        res = call.res
        location = redirect_location(
            secure=rq.is_tls, host_header=call.host.decode("latin-1"),
            uri=rq.uri.decode("latin-1"), tls_enabled=opts.tls_enabled,
            tls_redirect=opts.tls_redirect, canonical_host=opts.canonical_host,
            https_port=res.https_port, http_port=res.http_port,
        )
        if location is not None:
            send_redirect(call, location)
            return True
    return False
