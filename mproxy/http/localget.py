# -*- test-case-name: tests.test_localget -*-
"""
The local on-demand TLS policy check (C{--tls-on-demand-url /path}, a
path rather than a URL): a synthetic C{GET <path>?host=H} with C{Host: H}
run in memory through the service's own handler chain, i.e. the real
L{mproxy.http.proxy.ProxyResource} (pause, stop, load balancing, error
pages, target forwarding), answered as C{(status, body)}.

    local_get = local_getter(reactor, router, logger, http_port=80, https_port=443)
    certs = build_certificate_service(reactor, config, router, local_get=local_get)

The request never touches a socket, so nothing outside the process can pass
for it.  Like the reference's internal probe it is:
  - sent to the named service whatever its hosts and paths are;
  - never redirected (the service is seen with C{tls_redirect} off, so the
    target gets C{X-Forwarded-Proto: http});
  - not logged as a request and not counted in metrics (its own
    L{ProxyResource} has a logger that drops C{Request} records and no
    metrics); errors while proxying are still logged.
The 2 s timeout is the caller's (L{mproxy.tls.ondemand.OnDemandChecker});
cancelling the Deferred abandons the request and its upstream exchange.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Callable

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.python.failure import Failure
from twisted.web.http import Request
from zope.interface import implementer

from mproxy.http.interfaces import IProxiedService, IRouteMatch, IRouter

__all__ = ["local_getter"]

BODY_LIMIT = 4096  # the policy check reports at most 256 bytes of a denial


class _QuietLogger:
    """
    The server's logger without per-request C{Request} records.
    """

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def log(self, level: str, msg: str, **attrs: Any) -> None:
        if msg != "Request":
            self._logger.log(level, msg, **attrs)

    def debug(self, msg: str, **attrs: Any) -> None:
        self.log("DEBUG", msg, **attrs)

    def info(self, msg: str, **attrs: Any) -> None:
        self.log("INFO", msg, **attrs)

    def warn(self, msg: str, **attrs: Any) -> None:
        self.log("WARN", msg, **attrs)

    def error(self, msg: str, **attrs: Any) -> None:
        self.log("ERROR", msg, **attrs)


@implementer(IProxiedService)
class _Internal:
    """
    A service as the internal request sees it: TLS redirect off.
    """

    def __init__(self, service: IProxiedService) -> None:
        self._service = service
        self.name = service.name

    @property
    def options(self) -> Any:
        return attrs.evolve(self._service.options, tls_redirect=False)

    @property
    def target_options(self) -> Any:
        return self._service.target_options

    def select(self, method: bytes, path: str, cookie: Callable[[bytes], bytes | None],
               websocket: bool) -> Any:
        return self._service.select(method, path, cookie, websocket)

    def retry(self, failed: Any, tried: Any, wait: float) -> Any:
        return self._service.retry(failed, tried, wait)


@implementer(IRouter)
class _OneService:
    """
    A router that sends every request to one service (if it still exists).
    """

    def __init__(self, router: Any, name: str) -> None:
        self.router = router
        self.name = name

    def match(self, host: str, path: str) -> Any:
        service = self.router.services.get(self.name)
        if service is None:
            return None
        return _WholeService(_Internal(service))


@implementer(IRouteMatch)
class _WholeService:
    """
    A match of the whole service (prefix C{/}: the path is the target's).
    """

    prefix = "/"

    def __init__(self, service: IProxiedService) -> None:
        self.service = service

    def target_path(self, path: str) -> str:
        return path


class _Channel:
    """
    Just enough of an HTTP channel for a L{twisted.web.http.Request}: the
    response is collected in memory and fires C{done} with C{(status,
    body)}.
    """

    factory = None  # no access log
    transport = None

    def __init__(self, local_port: int) -> None:
        self.local_port = local_port
        self.done: Deferred[tuple[int, bytes]] = Deferred(self._cancel)
        self.status = 0
        self.body = bytearray()
        self.request: Request | None = None

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.local_port)

    def isSecure(self) -> bool:
        return False

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        self.status = int(code)

    def write(self, data: bytes) -> None:
        room = BODY_LIMIT - len(self.body)
        if room > 0:
            self.body += data[:room]

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def requestDone(self, request: Request) -> None:
        if not self.done.called:
            self.done.callback((self.status, bytes(self.body)))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.abortConnection()

    def abortConnection(self) -> None:
        """
        The proxy gave up on the response (e.g. the target broke off).
        """
        self._lose(Failure(ConnectionAborted()))
        if not self.done.called:
            self.done.errback(ConnectionAborted("the internal request was aborted"))

    def _cancel(self, _: Deferred[Any]) -> None:
        # timeout: the "client" goes away, so the proxy cancels the exchange
        self._lose(Failure(ConnectionDone("internal request cancelled")))

    def _lose(self, reason: Failure) -> None:
        request, self.request = self.request, None
        if request is not None and not request.finished:
            request.connectionLost(reason)


def local_getter(
    clock: Any,
    router: Any,
    logger: Any,
    *,
    http_port: int = 80,
    https_port: int = 443,
) -> Callable[[str, str, str], Deferred[tuple[int, bytes]]]:
    """
    The C{local_get(service_name, path_and_query, host)} that
    L{mproxy.tls.ondemand.OnDemandChecker} wants; see the module docstring.
    """
    quiet = _QuietLogger(logger)

    def local_get(service: str, path_and_query: str, host: str) -> Deferred[tuple[int, bytes]]:
        # here, not above: a supervisor with workers serves no HTTP itself,
        # and need not import the proxy before it asks
        from mproxy.http.proxy import ProxyResource

        resource = ProxyResource(
            _OneService(router, service), quiet, clock=clock,
            http_port=http_port, https_port=https_port,
        )
        channel = _Channel(http_port)
        request = Request(channel)  # type: ignore[arg-type]
        channel.request = request
        request.method = b"GET"
        request.uri = path_and_query.encode("utf-8")
        request.path = request.uri.partition(b"?")[0]
        request.clientproto = b"HTTP/1.0"  # no chunked framing in the collected body
        request.content = BytesIO()
        request.requestHeaders.setRawHeaders(b"host", [host.encode("utf-8")])
        request.requestHeaders.setRawHeaders(b"user-agent", [b"mproxy (on-demand TLS check)"])
        resource.render(request)
        return channel.done

    return local_get
