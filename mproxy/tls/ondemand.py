# -*- test-case-name: tests.test_tls_ondemand -*-
"""
On-demand TLS policy (C{--tls-on-demand-url}): ask the application whether a
host may get a certificate before any ACME order is placed for it.

API::

    checker = OnDemandChecker(clock, http_get=None, local_get=None, timeout=2.0)
    d = checker.check(service_name, url, host)
        # fires None when approved (status 200 only);
        # fails with OnDemandDenied("<host> is not allowed to get a certificate
        #   (status: 403, body: \"...\")") otherwise, including timeouts.

    http_get(url: str) -> Deferred[(status: int, body: bytes)]
        # absolute http(s) URLs; must not follow redirects.
        # treq_http_get(reactor) is the default implementation.
    local_get(service_name: str, path_and_query: str, host: str)
        -> Deferred[(status: int, body: bytes)]
        # a synthetic internal GET through the service's own handler chain,
        # Host header = host, never redirected, not logged (the proxy provides it).

Caching and rate limiting of approvals live in
L{mproxy.tls.gate.OnDemandGate}.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from mproxy.tls.interfaces import IOnDemandPolicy

__all__ = ["OnDemandChecker", "OnDemandDenied", "check_url", "treq_http_get"]

BODY_LIMIT = 256


class OnDemandDenied(Exception):
    pass


def check_url(url: str, host: str) -> str:
    """
    C{url} with C{host=<host>} added to its query, parameters re-encoded in
    sorted order (C{/check?host=a.example.com&token=abc}).
    """
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "host"]
    params.append(("host", host))
    params.sort()
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(params), ""))


def treq_http_get(reactor: Any, ca_bundle: str | None = None) -> Callable[[str], Deferred]:
    """
    The default C{http_get}: treq without redirects.  The CA bundle is read
    at once; treq and the HTTP client are imported and made at the first
    request (most servers never make one, and start sooner without them).
    """
    trust = None
    if ca_bundle:
        from twisted.internet.ssl import Certificate

        with open(ca_bundle, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    clients: list[Any] = []

    def client() -> Any:
        if not clients:
            import treq
            from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

            policy = BrowserLikePolicyForHTTPS()
            if trust is not None:
                policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
            clients.append(treq.client.HTTPClient(Agent(reactor, contextFactory=policy)))
        return clients[0]

    def get(url: str) -> Deferred:
        import treq

        d = client().get(url, allow_redirects=False)

        def read(response: Any) -> Deferred:
            body = treq.content(response)
            body.addCallback(lambda data: (response.code, data))
            return body

        return d.addCallback(read)

    return get


@implementer(IOnDemandPolicy)
class OnDemandChecker:
    def __init__(
        self,
        clock: Any,
        http_get: Callable[[str], Deferred] | None = None,
        local_get: Callable[[str, str, str], Deferred] | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.clock = clock
        self.http_get = http_get
        self.local_get = local_get
        self.timeout = timeout

    def check(self, service: str, url: str, host: str) -> Deferred:
        target = check_url(url, host)
        if url.startswith("/"):
            if self.local_get is None:
                return _denied(host, "error: local on-demand checks are not available")
            d = maybeDeferred(self.local_get, service, target, host)
        else:
            if self.http_get is None:
                return _denied(host, "error: no HTTP client for on-demand checks")
            d = maybeDeferred(self.http_get, target)
        d.addTimeout(self.timeout, self.clock)

        def decide(result: tuple[int, bytes]) -> None:
            status, body = result
            if status != 200:
                text = body[:BODY_LIMIT].decode("utf-8", "replace")
                raise OnDemandDenied(
                    f'{host} is not allowed to get a certificate (status: {status}, body: "{text}")'
                )

        def transport_error(failure: Any) -> Any:
            if failure.check(OnDemandDenied):
                return failure
            from twisted.internet.defer import TimeoutError as DeferTimeout

            reason = "timed out" if failure.check(DeferTimeout) else str(failure.value) or repr(failure.value)
            raise OnDemandDenied(f"{host} is not allowed to get a certificate (error: {reason})")

        d.addCallback(decide)
        d.addErrback(transport_error)
        return d


def _denied(host: str, reason: str) -> Deferred:
    from twisted.internet.defer import fail

    return fail(OnDemandDenied(f"{host} is not allowed to get a certificate ({reason})"))
