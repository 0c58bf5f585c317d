"""
The service tree: what C{twistd mproxy} and C{mproxy run} both run.

L{build_service} assembles one L{MproxyService} (a L{MultiService}) from a
L{ServerConfig} and an injected reactor.  Nothing is opened or read while
building; L{MproxyService.startService} restores the state file and then
listens, in that order, and L{MproxyService.ready} fires when it is serving
(or fails with the reason it could not start).
"""

from __future__ import annotations

import os
import socket as _socket
import stat
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.python import usage

from mproxy.config import SERVER_OPTIONS, ServerConfig, resolve_config
from mproxy.control.server import ControlFactory
from mproxy.controller import Controller
from mproxy.errors import MproxyError
from mproxy.health import http_probe
from mproxy.logging import JSONLogger
from mproxy.router import Router
from mproxy.state import STATE_FILENAME, StateStore

SHUTDOWN_GRACE = 10.0
#: Twisted's default backlog (50) drops SYNs under a burst of new connections;
#: the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class StartupError(MproxyError):
    pass


class Options(usage.Options):
    """
    C{twistd mproxy} options: the same table as C{mproxy run}.
    """

    optParameters = [
        [spec.name, None, None, f"{spec.help} [env MPROXY_{spec.env} or {spec.env}]"]
        for spec in SERVER_OPTIONS
        if not spec.flag
    ]
    optFlags = [[spec.name, None, spec.help] for spec in SERVER_OPTIONS if spec.flag]

    def postOptions(self) -> None:
        explicit: dict[str, Any] = {}
        for spec in SERVER_OPTIONS:
            key = spec.name
            value = self.get(key)
            if spec.flag:
                if value:
                    explicit[spec.attr] = True
            elif value is not None:
                try:
                    explicit[spec.attr] = spec.parse(value)
                except ValueError as e:
                    raise usage.UsageError(f"--{spec.name}: {e}")
        try:
            self.config = resolve_config(explicit)
        except MproxyError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> MproxyService:
    from twisted.internet import reactor

    service = build_service(reactor, options.config)

    def failed(f: Any) -> None:
        # Under twistd there is no caller to hand the error to: log it the
        # same way as `mproxy run` reports it, and stop.
        import sys

        message = str(f.value) if f.check(MproxyError) else f.getErrorMessage()
        sys.stderr.write(f"Error: {message}\n")
        service.logger.error("Unable to start", error=message)
        if reactor.running:
            reactor.stop()

    service.ready.addErrback(failed)
    return service


def _listen_endpoints(reactor: Any, bind: str) -> list[Any]:
    """
    Endpoint makers (port → endpoint) for a bind address; all interfaces is
    C{::} then C{0.0.0.0}.
    """
    b = LISTEN_BACKLOG
    if bind:
        if ":" in bind:
            return [lambda port: TCP6ServerEndpoint(reactor, port, b, bind.strip("[]"))]
        return [lambda port: TCP4ServerEndpoint(reactor, port, b, bind)]
    makers = []
    if _socket.has_ipv6:
        makers.append(lambda port: TCP6ServerEndpoint(reactor, port, b, "::"))
    makers.append(lambda port: TCP4ServerEndpoint(reactor, port, b, "0.0.0.0"))
    return makers


def check_socket_free(path: str) -> None:
    """
    Remove a stale control socket left by a dead server; refuse to steal a
    live one.

    @raise StartupError: when another server answers on C{path}, or the path
        is something other than a socket.
    """
    if len(os.fsencode(path)) > 107:
        raise StartupError(
            f"control socket path {path} is too long for a UNIX socket "
            f"({len(os.fsencode(path))} bytes, at most 107)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise StartupError(f"cannot check control socket {path}: {e.strerror or e}")
    finally:
        s.close()
    raise StartupError(f"another mproxy is already running on control socket {path}")


class MproxyService(MultiService):
    def __init__(self, reactor: Any, config: ServerConfig, logger: JSONLogger) -> None:
        super().__init__()
        self.setName("mproxy")
        self.reactor = reactor
        self.config = config
        self.logger = logger
        self.router = Router()
        self.store = StateStore(os.path.join(config.state_dir, STATE_FILENAME))
        from mproxy.http.upstream import PoolRegistry
        from mproxy.http.localget import local_getter
        from mproxy.tls.wiring import build_certificate_service

        self.pools = PoolRegistry(reactor)
        # on-demand TLS policies that are paths ask the service itself
        local_get = local_getter(
            reactor, self.router, logger,
            http_port=config.http_port, https_port=config.https_port,
        )
        self.certificates = build_certificate_service(
            reactor, config, self.router, logger, local_get=local_get
        )
        self.certificates.setName("certs")
        self.certificates.setServiceParent(self)
        self.metrics = None
        if config.metrics_port:
            from mproxy.metrics import Metrics

            self.metrics = Metrics()
        from mproxy.http import custompages

        self.controller = Controller(
            self.router,
            reactor,
            http_probe(reactor),
            self.store,
            logger,
            pool_factory=self.pools,
            certificates=self.certificates,
            validate_error_pages=custompages.validate,
            deploys=self.metrics,
        )
        self._unhook_sighup: Any = None
        self.ports: list[Any] = []
        self.sites: list[Any] = []
        self.ready: Deferred[None] = Deferred()
        self.bound: dict[str, int] = {}

    def startService(self) -> None:
        super().startService()
        d = self._start()
        d.addCallbacks(self.ready.callback, self.ready.errback)

    @inlineCallbacks
    def _start(self) -> Any:
        cfg = self.config
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self.controller.restore()
        from mproxy.http.proxy import build_http_factory
        from mproxy.tls.wiring import https_server_factory, install_sighup_reload

        common = dict(
            http_port=cfg.http_port, https_port=cfg.https_port, pools=self.pools,
            metrics=self.metrics, challenges=self.certificates.challenges,
            header_timeout=cfg.http_header_timeout, idle_timeout=cfg.http_idle_timeout,
        )
        site = build_http_factory(self.reactor, self.router, self.logger, **common)
        secure_site = build_http_factory(
            self.reactor, self.router, self.logger, secure=True, **common
        )
        self.sites += [site, secure_site]
        yield self._listen("http", cfg.http_port, site)
        yield self._listen(
            "https", cfg.https_port, https_server_factory(self.certificates, secure_site)
        )
        if cfg.http3:
            yield self._listen_http3(secure_site)
        try:
            self._unhook_sighup = install_sighup_reload(
                self.reactor, self.certificates.reload_static
            )
        except (ValueError, OSError):  # not the main thread, or no SIGHUP here
            self._unhook_sighup = None
        if self.metrics is not None:
            yield self._listen_metrics()
        check_socket_free(cfg.socket)
        sock_dir = os.path.dirname(os.path.abspath(cfg.socket))
        os.makedirs(sock_dir, exist_ok=True)
        old_umask = os.umask(0o177)
        try:
            control = yield UNIXServerEndpoint(
                self.reactor, cfg.socket, mode=0o600, wantPID=False
            ).listen(ControlFactory(self.controller, self.logger))
        except Exception as e:
            raise StartupError(f"cannot listen on control socket {cfg.socket}: {e}")
        finally:
            os.umask(old_umask)
        self.ports.append(control)
        self.logger.info(
            "Server started",
            http=self.bound.get("http"),
            https=self.bound.get("https"),
            socket=cfg.socket,
            state=self.store.path,
        )

    @inlineCallbacks
    def _listen(self, what: str, port_number: int, factory: Any) -> Any:
        """
        Listen on every endpoint for the bind address.  Without C{--bind} that
        is C{::} (dual-stack where IPv6 exists) and C{0.0.0.0}: the second
        fails harmlessly when the first already took IPv4 too, and the first
        fails harmlessly where IPv6 is disabled (some containers).
        """
        errors = []
        for make in _listen_endpoints(self.reactor, self.config.bind):
            try:
                port = yield make(port_number).listen(factory)
            except Exception as e:
                errors.append(e)
                continue
            self.ports.append(port)
            if what not in self.bound:
                self.bound[what] = port.getHost().port
                if port_number == 0:
                    # An ephemeral port: listen there on the other family too.
                    port_number = self.bound[what]
        if what not in self.bound:
            raise StartupError(f"cannot listen for {what.upper()} on port {port_number}: {errors[-1]}")

    def _listen_http3(self, secure_site: Any) -> Any:
        from mproxy.http.h3 import serve_http3

        port = self.bound["https"]
        try:
            listener = serve_http3(self.reactor, secure_site, self.certificates.select,
                                   self.logger, bind=self.config.bind, port=port)
        except Exception as e:
            raise StartupError(f"cannot listen for HTTP/3 on UDP port {port}: {e}")
        self.sites.append(listener)

    @inlineCallbacks
    def _listen_metrics(self) -> Any:
        from twisted.web.server import Site

        from mproxy.metrics import MetricsResource

        site = Site(MetricsResource(self.metrics))
        site.log = lambda request: None  # type: ignore[method-assign]
        yield self._listen("metrics", self.config.metrics_port, site)
        self.logger.info("Metrics enabled", port=self.bound.get("metrics"))

    def stopService(self) -> Deferred[Any]:
        """
        Stop accepting, let in-flight requests finish (up to 10 s), stop health
        checks.
        """
        if self._unhook_sighup is not None:
            self._unhook_sighup()
            self._unhook_sighup = None
        ports, self.ports = self.ports, []
        stops = [succeed(p.stopListening()) for p in ports]
        d: Deferred[Any] = DeferredList(stops, consumeErrors=True)

        def drain(_: object) -> Any:
            waits = [s.shutdown(SHUTDOWN_GRACE) for s in self.sites]
            return DeferredList(waits, consumeErrors=True)

        d.addCallback(drain)

        def finish(_: object) -> Any:
            self.controller.shutdown()
            self.logger.info("Server stopped")
            return MultiService.stopService(self)

        d.addCallback(finish)
        return d


def build_service(reactor: Any, config: ServerConfig, logger: JSONLogger | None = None) -> MproxyService:
    logger = logger or JSONLogger(level="DEBUG" if config.debug else "INFO")
    return MproxyService(reactor, config, logger)
