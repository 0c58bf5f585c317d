"""
L{ProxyHarness}: mproxy's control plane and data plane in memory, for
synchronous tests of deploy tooling.

It assembles what the server runs (a L{Router}, the L{Controller} with the
real HTTP health probe and upstream pools, the proxy site) on one
L{MemoryReactorClock}, over a L{MemoryNetwork} where in-memory upstream
apps (L{MemoryUpstream}) listen.  Nothing happens between calls: every
harness method pumps the network and runs what is due before it returns
(L{ProxyHarness.flush}), and time moves only with L{ProxyHarness.advance}.
So a deploy's Deferred has fired when its health checks passed at once, a
response's Deferred has fired unless an upstream holds the request, and
C{successResultOf}/C{assertNoResult} say which.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import Agent, readBody
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.server import Site
from zope.interface import implementer

from mproxy.controller import Controller
from mproxy.deploy import DeployResult
from mproxy.health import http_probe
from mproxy.http import custompages
from mproxy.http.proxy import build_http_factory
from mproxy.http.upstream import PoolRegistry
from mproxy.logging import JSONLogger, ListLogger
from mproxy.router import Router
from mproxy.spec import (
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DeployRequest,
    ServiceOptions,
    TargetOptions,
)
from mproxy.state import StateStore
from mproxy.testing._network import MemoryNetwork
from mproxy.testing._upstream import UpstreamApp

#: where the proxy listens, and where test requests come from
PROXY_ADDRESS = "10.0.0.1"
CLIENT_ADDRESS = "192.0.2.10"
HTTP_PORT = 80

#: rounds of pumping after which L{ProxyHarness.flush} gives up
MAX_ROUNDS = 10000


@frozen
class Response:
    """
    A response the proxy sent to a harness request, body read whole.
    """

    code: int
    phrase: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of header C{name}, or C{None}.
        """
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


@implementer(IBodyProducer)
class _Body:
    """
    A request body produced at once (no cooperator, so nothing is left for
    a real reactor to do).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _ToProxy:
    """
    Every request URL leads to the proxy's HTTP port, from the client host.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"the harness speaks plain HTTP, not {uri.scheme!r}")
        return TCP4ClientEndpoint(self.reactor, PROXY_ADDRESS, HTTP_PORT,
                                  bindAddress=(CLIENT_ADDRESS, 0))


class MemoryUpstream:
    """
    An upstream app on the harness's network, at C{address} (C{name:port},
    what deploys name).  By default an L{UpstreamApp} (C{app}): C{/up} is its
    health check, other paths answer with its name.
    """

    def __init__(self, harness: ProxyHarness, name: str, port: int, app: Any) -> None:
        self.harness = harness
        self.name = name
        self.port = port
        self.app = app
        self.address = f"{name}:{port}"

    @property
    def healthy(self) -> bool:
        return bool(self.app.healthy)

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self.app.healthy = value

    @property
    def requests(self) -> int:
        """
        Requests the app got, health checks not counted.
        """
        return int(self.app.requests)

    @property
    def held(self) -> tuple[Any, ...]:
        """
        The requests the app holds now (see L{hold}).
        """
        return tuple(self.app.held)

    def hold(self) -> None:
        """
        Leave every request from now on unanswered (health checks still
        answer) until L{release}.
        """
        self.app.hold()

    def release(self) -> None:
        """
        Answer the held requests, and deliver what follows.
        """
        self.app.release()
        self.harness.flush()

    def stop(self) -> None:
        """
        Stop listening: new connections to the app are refused (its open
        ones stay).
        """
        self.harness.network.stop_listening(self.name, self.port)
        self.harness.flush()


class ProxyHarness:
    """
    The proxy with its control plane, in memory.  See the module docstring.

    @ivar reactor: the L{MemoryReactorClock} everything runs on.
    @ivar network: the L{MemoryNetwork} the proxy, the upstreams and the
        test client share.
    @ivar router: the L{Router} the proxy routes with.
    @ivar controller: the L{Controller} deploys go through; for commands the
        harness has no method for, call it and then L{flush}.
    @ivar site: the proxy's HTTP site.
    @ivar logger: where everything logs (a L{ListLogger} unless given).
    """

    def __init__(self, logger: JSONLogger | None = None, state_path: str | None = None) -> None:
        """
        @param state_path: a state file the controller saves to (and
            L{restore} reads), or C{None} for none.
        """
        self.reactor = MemoryReactorClock()
        self.network = MemoryNetwork(self.reactor, source=PROXY_ADDRESS)
        self.network.add_host("mproxy", PROXY_ADDRESS)
        self.logger: JSONLogger = logger if logger is not None else ListLogger()
        self.router = Router()
        self.pools = PoolRegistry(self.reactor)
        self.controller = Controller(
            self.router,
            self.reactor,
            http_probe(self.reactor),
            StateStore(state_path) if state_path else None,
            self.logger,
            pool_factory=self.pools,
            validate_error_pages=custompages.validate,
        )
        self.site = build_http_factory(
            self.reactor, self.router, self.logger, http_port=HTTP_PORT, pools=self.pools
        )
        self.network.listen(PROXY_ADDRESS, HTTP_PORT, self.site)
        self._agent = Agent.usingEndpointFactory(self.reactor, _ToProxy(self.reactor))
        self._hosts = 0

    # The upstreams

    def upstream(self, name: str, port: int = 3000, app: Any = None) -> MemoryUpstream:
        """
        Start an upstream called C{name} (a host name on the network) on
        C{port}.  C{app} is the resource it serves: by default a new
        L{UpstreamApp} named C{name}; another resource must answer the
        health-check path itself (C{/up} by default).
        """
        if self.network.address_of(name) is None:
            self._hosts += 1
            self.network.add_host(name, f"10.0.1.{self._hosts}")
        if app is None:
            app = UpstreamApp(self.reactor, name)
        site = Site(app, reactor=self.reactor)
        site.displayTracebacks = False
        site.log = lambda request: None  # type: ignore[method-assign]
        self.network.listen(name, port, site)
        return MemoryUpstream(self, name, port, app)

    # The control plane

    def deploy(
        self,
        service: str,
        *targets: MemoryUpstream | str,
        host: str | Sequence[str] = "",
        readers: Sequence[MemoryUpstream | str] = (),
        options: ServiceOptions | None = None,
        target_options: TargetOptions | None = None,
        deploy_timeout: float = DEFAULT_DEPLOY_TIMEOUT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        force: bool = False,
    ) -> Deferred[DeployResult]:
        """
        Deploy C{targets} (upstreams or C{host:port} addresses) as
        C{service}, like C{mproxy deploy}: fires with the L{DeployResult}
        once they passed their health check, traffic switched and the
        targets they replaced drained.

        @param host: the host (or hosts) the service answers; empty for any.
        @param options: the service options; C{host}, when given, replaces
            their hosts.
        """
        options = options if options is not None else ServiceOptions()
        if host:
            options = attrs.evolve(options, hosts=(host,) if isinstance(host, str) else host)
        request = DeployRequest(
            service,
            tuple(_address(t) for t in targets),
            tuple(_address(r) for r in readers),
            options,
            target_options if target_options is not None else TargetOptions(),
            deploy_timeout,
            drain_timeout,
            force,
        )
        return self._flushed(self.controller.deploy(request))

    def restore(self) -> int:
        """
        Restore the services from the state file (see L{Controller.restore}).
        """
        restored = self.controller.restore()
        self.flush()
        return restored

    # The data plane

    def request(
        self,
        method: bytes,
        path: bytes,
        host: str = "localhost",
        headers: dict[bytes, bytes | list[bytes]] | None = None,
        body: bytes | None = None,
    ) -> Deferred[Response]:
        """
        Send a request to the proxy's HTTP port from the client host, with
        C{host} as its Host header; fires with the whole L{Response}.
        """
        raw = Headers()
        for name, value in (headers or {}).items():
            raw.setRawHeaders(name, value if isinstance(value, list) else [value])
        url = b"http://" + host.encode("idna") + path
        producer = _Body(body) if body is not None else None
        d = self._agent.request(method, url, raw, producer)

        def read(response: Any) -> Deferred[Response]:
            got = readBody(response)
            got.addCallback(
                lambda data: Response(response.code, response.phrase, response.headers, data)
            )
            return got

        d.addCallback(read)
        return self._flushed(d)

    # Time

    def flush(self) -> None:
        """
        Run what is due now and deliver every byte in flight, until nothing
        more happens.

        @raise RuntimeError: when that never ends (something keeps busy
            without time passing).
        """
        for _ in range(MAX_ROUNDS):
            self.reactor.advance(0)
            if not self.network.pump() and not self._due():
                return
        raise RuntimeError(f"still busy after {MAX_ROUNDS} rounds without time passing")

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass, stopping at each timer on the way so that what
        it starts is delivered before the next one.
        """
        self.flush()
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls()]
            step = min(due, default=end)
            if step > end:
                step = end
            self._advance_to(step)
            self.flush()
            if step >= end:
                return

    def _advance_to(self, when: float) -> None:
        self.reactor.advance(max(0.0, when - self.reactor.seconds()))
        if self.reactor.seconds() < when:  # floating-point rounding
            self.reactor.rightNow = when
            self.reactor.advance(0)

    def _due(self) -> bool:
        now = self.reactor.seconds()
        return any(c.getTime() <= now for c in self.reactor.getDelayedCalls())

    def _flushed(self, d: Deferred[Any]) -> Deferred[Any]:
        self.flush()
        return d


def _address(target: MemoryUpstream | str) -> str:
    return target.address if isinstance(target, MemoryUpstream) else target
