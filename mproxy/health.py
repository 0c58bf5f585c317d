"""
Health checks: GET a path on a target at a fixed interval, within a timeout;
any 2xx is healthy.

The probe itself is injected (L{ProbeFunction}); L{http_probe} is the real one,
on a L{HostnameEndpoint}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RedirectAgent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers

from mproxy.spec import HealthCheckConfig
from mproxy.target import TargetState

if TYPE_CHECKING:
    from mproxy.target import Target

USER_AGENT = b"mproxy"

ProbeFunction = Callable[["Target", HealthCheckConfig], "Deferred[int]"]


class UnexpectedStatus(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"unexpected status ({code})")
        self.code = code


def health_url(host: str, port: int, config: HealthCheckConfig) -> str:
    """
    The URL a health check GETs: the target's host, the health-check port when
    set, and the path joined onto the root.
    """
    if config.port:
        port = config.port
    h = f"[{host}]" if ":" in host else host
    path = "/" + config.path.lstrip("/")
    return f"http://{h}:{port}{path}"


def describe_failure(f: Failure) -> str:
    if f.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed):
        # The HTTP client wraps the real reasons (a timeout's cancellation
        # among them).
        reasons = f.value.reasons
        if any(r.check(TimeoutError, CancelledError) for r in reasons):
            return "request timed out"
        if reasons:
            return describe_failure(reasons[0])
    if f.check(TimeoutError, CancelledError, ConnectingCancelledError):
        return "request timed out"
    if f.check(UnexpectedStatus):
        return str(f.value)
    if f.check(DNSLookupError):
        # Twisted's message already starts with "DNS lookup failed: ".
        msg = str(f.value).strip().rstrip(".")
        return msg if msg.startswith("DNS lookup failed") else f"DNS lookup failed: {msg}"
    if f.check(ConnectError):
        msg = str(f.value).strip().rstrip(".")
        return msg or f.value.__class__.__name__
    msg = str(f.value).strip()
    return msg or f.value.__class__.__name__


class _EndpointFactory:
    def __init__(self, reactor: object, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def endpointForURI(self, uri: object) -> HostnameEndpoint:
        return HostnameEndpoint(
            self._reactor,
            uri.host,  # type: ignore[attr-defined]
            uri.port,  # type: ignore[attr-defined]
            timeout=max(1, int(self._timeout + 0.999)),
        )


def http_probe(reactor: object) -> ProbeFunction:
    """
    The production probe: an HTTP/1.1 GET through a L{HostnameEndpoint},
    following up to 10 redirects, body read and discarded.  Fires with the
    final status code.
    """

    def probe(target: "Target", config: HealthCheckConfig) -> Deferred[int]:
        agent = RedirectAgent(
            Agent.usingEndpointFactory(reactor, _EndpointFactory(reactor, config.timeout)),
            redirectLimit=10,
        )
        headers = Headers({b"user-agent": [USER_AGENT]})
        if config.host:
            headers.setRawHeaders(b"host", [config.host.encode("idna")])
        url = health_url(target.host, target.port, config).encode("ascii")
        d = agent.request(b"GET", url, headers)

        def got(response: object) -> Deferred[int]:
            code: int = response.code  # type: ignore[attr-defined]
            body = readBody(response)  # type: ignore[arg-type]
            body.addCallback(lambda _: code)
            return body

        d.addCallback(got)
        return d

    return probe


class HealthChecker:
    """
    Checks one target: a probe at once, then one per interval; a probe still
    running when the next is due delays it.  Each probe must finish within the
    configured timeout.
    """

    def __init__(
        self,
        target: "Target",
        config: HealthCheckConfig,
        clock: IReactorTime,
        probe: ProbeFunction,
        report: Callable[["Target", bool, str], None],
        stop_when_healthy: bool = False,
    ) -> None:
        self.target = target
        self.config = config
        self.clock = clock
        self.probe = probe
        self.report = report
        self.stop_when_healthy = stop_when_healthy
        self._call: object | None = None
        self._inflight: Deferred[int] | None = None
        self.running = False

    def start(self) -> None:
        if self.stop_when_healthy and self.target.healthy:
            # Already healthy (restored state): nothing left to find out, and
            # a failed probe must not take the only target out of rotation.
            return
        self.running = True
        self._tick()

    def stop(self) -> None:
        self.running = False
        if self._call is not None and self._call.active():  # type: ignore[attr-defined]
            self._call.cancel()  # type: ignore[attr-defined]
        self._call = None
        d, self._inflight = self._inflight, None
        if d is not None:
            d.cancel()

    def _schedule(self) -> None:
        if self.running:
            self._call = self.clock.callLater(self.config.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        if not self.running:
            return
        try:
            d = self.probe(self.target, self.config)
        except Exception:
            d = Deferred()
            d.errback()
        d.addTimeout(self.config.timeout, self.clock)
        self._inflight = d

        def ok(code: int) -> None:
            if not 200 <= code < 300:
                raise UnexpectedStatus(code)

        d.addCallback(ok)
        d.addCallbacks(self._success, self._failure)

    def _success(self, _: object) -> None:
        self._inflight = None
        if not self.running:
            return
        # Report first: becoming healthy may complete a deploy's health wait,
        # which stops listening for results.
        self.report(self.target, True, "")
        if not self.running:
            return
        if self.target.state is not TargetState.DRAINING:
            self.target.set_state(TargetState.HEALTHY)
        if self.stop_when_healthy:
            self.running = False
            return
        self._schedule()

    def _failure(self, f: Failure) -> None:
        self._inflight = None
        if not self.running:
            return
        if self.target.state is TargetState.HEALTHY:
            self.target.set_state(TargetState.UNHEALTHY)
        self.report(self.target, False, describe_failure(f))
        self._schedule()
