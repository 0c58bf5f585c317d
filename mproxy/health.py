"""
Health checks: GET a path on a target at a fixed interval, within a timeout;
any 2xx is a passing check.

Every target is checked for as long as it is deployed, a lone one too.  Its
state follows the checks:

  - C{adding} (a deploy waits for it): the first passing check makes it
    C{healthy}; failures leave it C{adding};
  - C{healthy}: it becomes C{unhealthy} after L{UNHEALTHY_AFTER}
    consecutive failed checks (so with the default 1 s interval a dead target
    is out of rotation within about 2 s; a single slow or lost check does not
    take it out);
  - C{unhealthy} (failed checks, or ejected by the data plane when a
    connection to it was refused, reset or timed out): one passing check
    makes it C{healthy} again.

The probe itself is injected (L{ProbeFunction}); L{http_probe} is the real one,
on a L{HostnameEndpoint} (a target given as an IP address is connected to
directly: no name lookup, which Twisted runs in a thread, every interval).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
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

#: consecutive failed checks that make a healthy target unhealthy
UNHEALTHY_AFTER = 2


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

    def endpointForURI(self, uri: object) -> Any:
        host: bytes = uri.host  # type: ignore[attr-defined]
        port: int = uri.port  # type: ignore[attr-defined]
        timeout = max(1, int(self._timeout + 0.999))
        text = host.decode("ascii", "replace")
        if isIPAddress(text):
            return TCP4ClientEndpoint(self._reactor, text, port, timeout=timeout)
        if isIPv6Address(text):
            return TCP6ClientEndpoint(self._reactor, text, port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=timeout)


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
    Checks one target, for as long as it runs: a probe at once, then one per
    interval; a probe still running when the next is due delays it.  Each
    probe must finish within the configured timeout.  It moves the target
    between states as the module docstring says.
    """

    def __init__(
        self,
        target: "Target",
        config: HealthCheckConfig,
        clock: IReactorTime,
        probe: ProbeFunction,
        report: Callable[["Target", bool, str], None],
    ) -> None:
        self.target = target
        self.config = config
        self.clock = clock
        self.probe = probe
        self.report = report
        self.failures = 0
        self._call: object | None = None
        self._inflight: Deferred[int] | None = None
        self.running = False

    def start(self) -> None:
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
        self.failures = 0
        self.report(self.target, True, "")
        if not self.running:
            return
        if self.target.state is not TargetState.DRAINING:
            self.target.set_state(TargetState.HEALTHY)
        self._schedule()

    def _failure(self, f: Failure) -> None:
        self._inflight = None
        if not self.running:
            return
        self.failures += 1
        error = describe_failure(f)
        target = self.target
        target.last_error = error
        if target.state is TargetState.HEALTHY and self.failures >= UNHEALTHY_AFTER:
            target.set_state(TargetState.UNHEALTHY, error)
        self.report(target, False, error)
        self._schedule()
