"""
The service tree: what C{twistd mproxy} and C{mproxy run} both run.

L{build_service} assembles one L{MproxyService} (a L{MultiService}) from a
L{ServerConfig} and an injected reactor.  Nothing is opened or read while
building, except that the listening sockets this process inherited (systemd
socket activation, L{mproxy.activation}) are looked at: the listeners serve
them instead of binding their ports.  Starting it restores the state file, then binds the TCP ports
(C{privilegedStartService}), then listens on the control socket and starts
the other children (C{startService}); a failure at any step raises (so twistd
exits non-zero) and fails L{MproxyService.ready}, which otherwise fires once
the server is serving.  Under C{mproxy run} with workers, the HTTP and HTTPS
sockets are bound, and the first workers started, before this is built
(L{mproxy.workers.prestart}): a bad state file then stops start-up after
they listened, the workers ending with it.
"""

from __future__ import annotations

import os
from typing import Any, MutableMapping

from attrs import evolve
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from mproxy.activation import (
    InheritedSockets,
    inherited_sockets,
    startup_environment,
    upgrade_sockets,
)
from mproxy.config import SHUTDOWN_GRACE, ServerConfig
from mproxy.control.server import ControlFactory
from mproxy.controller import Controller
from mproxy.controlsocket import ControlSocketService
from mproxy.errors import MproxyError
from mproxy.fileutil import remove_stale_temporary_files
from mproxy.health import http_probe
from mproxy.listeners import Listener, StartupError, adopted_endpoints, bind_endpoints
from mproxy.logging import JSONLogger
from mproxy.router import Router
from mproxy.signals import install_stop_signals, install_upgrade_signal
from mproxy.state import STATE_FILENAME, ServiceRecord, StateStore
from mproxy.upgrade import Upgrades



class MproxyService(MultiService):
    """
    The whole server.  Its children, in start order: the certificate
    service, the HTTP, HTTPS and (with C{--metrics-port}) metrics listeners,
    and the control socket.  Stopping stops them all (each listener closes
    its ports and then drains its connections; the control socket's file is
    removed), then the health checks.

    With C{config.workers} (C{--workers}), this process is the supervisor:
    it binds the HTTP and HTTPS sockets (L{mproxy.workers.sockets}) without
    serving them, and that many worker processes
    (L{mproxy.workers.pool.WorkerPool}, a child service stopped before the
    sockets close) serve them; the controller drives them as its data
    plane, certificates and challenges are sent to them, and the metrics
    endpoint sums theirs.  "Server started" is logged once every worker
    serves.

    @ivar log_observer: a C{twisted.logger} observer that a twistd
        application this service is added to logs through, or C{None}.
    """

    def __init__(
        self,
        reactor: Any,
        config: ServerConfig,
        logger: JSONLogger,
        inherited: InheritedSockets | None = None,
        prestarted: Any = None,
    ) -> None:
        super().__init__()
        self.setName("mproxy")
        self.reactor = reactor
        self.inherited = inherited
        #: the sockets and first workers C{mproxy run} started before
        #: building this (L{mproxy.workers.prestart}), or C{None}
        self.prestarted = prestarted
        if inherited is not None:
            config = with_inherited_ports(config, inherited)
        self.config = config
        self.logger = logger
        self.log_observer: Any = None
        self.failure: BaseException | None = None
        self.pool: Any = None
        self.router = Router()
        self.store = StateStore(os.path.join(config.state_dir, STATE_FILENAME))
        from mproxy.http.localget import local_getter
        from mproxy.http.upstream import PoolRegistry
        from mproxy.tls.wiring import build_certificate_service

        self.pools = PoolRegistry(reactor)
        # on-demand TLS policies that are paths ask the service itself
        local_get = local_getter(
            reactor, self.router, logger,
            http_port=config.http_port, https_port=config.https_port,
        )
        challenges = None
        if config.workers:
            from mproxy.workers.certs import NotifyingChallenges

            challenges = NotifyingChallenges(reactor)
        self.certificates = build_certificate_service(
            reactor, config, self.router, logger, local_get=local_get, challenges=challenges
        )
        self.certificates.setName("certs")
        self.certificates.setServiceParent(self)
        self.metrics = None
        if config.metrics_port:
            from mproxy.metrics import Metrics

            self.metrics = Metrics()
        from mproxy.http import custompages

        if config.workers:
            self.pool = self._build_pool(challenges)
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
            dataplane=self.pool,
        )
        if self.metrics is not None:
            self.metrics.watch_targets(self.controller.target_health)
        self.upgrades = Upgrades(
            reactor, self, logger, handover=inherited.handover if inherited else None
        )
        self.http3: Any = None
        if config.workers:
            self.sites = []
            self.listeners = self._build_socket_listeners()
        else:
            self.sites = self._build_sites()
            self.listeners = self._build_listeners()
        for listener in self.listeners:
            listener.setServiceParent(self)
        if self.pool is not None:
            self.pool.setServiceParent(self)
        self.control = ControlSocketService(
            reactor, config.socket, ControlFactory(self.controller, logger, self.upgrades),
            logger, inherited=inherited.control if inherited else None,
        )
        self.control.setServiceParent(self)
        self._unhook_sighup: Any = None
        self._unhook_sigusr2: Any = None
        self.stop_signals: Any = None
        self._prepared = False
        self.ready: Deferred[None] = Deferred()

    def _build_sites(self) -> list[Any]:
        """
        The HTTP and HTTPS sites (the proxy resource over the router).
        """
        from mproxy.http.proxy import build_http_factory

        cfg = self.config
        common = dict(
            http_port=cfg.http_port, https_port=cfg.https_port, pools=self.pools,
            metrics=self.metrics, challenges=self.certificates.challenges,
            header_timeout=cfg.http_header_timeout, idle_timeout=cfg.http_idle_timeout,
        )
        site = build_http_factory(self.reactor, self.router, self.logger, **common)
        secure = build_http_factory(
            self.reactor, self.router, self.logger, secure=True, **common
        )
        return [site, secure]

    def _build_listeners(self) -> list[Any]:
        from mproxy.tls.wiring import https_server_factory

        cfg = self.config
        endpoints = self._endpoints
        site, secure = self.sites
        listeners = [
            Listener("HTTP", site, cfg.http_port, endpoints("http"),
                     drain=lambda: site.shutdown(SHUTDOWN_GRACE)),
            Listener("HTTPS", https_server_factory(self.certificates, secure),
                     cfg.https_port, endpoints("https"),
                     drain=lambda: secure.shutdown(SHUTDOWN_GRACE)),
        ]
        if cfg.http3:
            from mproxy.http.h3 import HTTP3Service

            https = listeners[1]
            inherited = self.inherited.get("http3") if self.inherited is not None else ()
            self.http3 = HTTP3Service(
                self.reactor, secure, self.certificates.select, self.logger, bind=cfg.bind,
                https_port=lambda: https.port, grace=SHUTDOWN_GRACE,
                inherited=[(s.fd, s.family) for s in inherited])
            listeners.append(self.http3)
        if self.metrics is not None:
            listeners.append(
                Listener("metrics", metrics_site(self.metrics), cfg.metrics_port,
                         endpoints("metrics"))
            )
        return listeners

    def _build_pool(self, challenges: Any) -> Any:
        """
        The workers (started with the service), told of ejections, asking
        for on-demand certificates, writing their log lines through ours
        when they cannot share our stdout.
        """
        from mproxy.workers.certs import CertificateWatch
        from mproxy.workers.pool import WorkerPool

        logger = self.logger

        def write_line(line: str) -> None:
            try:
                logger._stream.write(line + "\n")
                logger._stream.flush()
            except (OSError, ValueError):
                pass

        from mproxy.logging import TwistedEvents

        # workers out of file descriptors: one line per window for all of them
        exhaustion = TwistedEvents(logger, self.reactor)
        pool = WorkerPool(
            self.reactor, logger, None, self.config.workers, grace=SHUTDOWN_GRACE, spares=1,
            on_eject=lambda address, error, key: self.controller.eject(address, error, key),
            on_ask_certificate=lambda name: self.certificates.select(name),
            write_line=write_line,
            on_exhausted=exhaustion._exhausted,
        )
        pool.setName("workers")
        challenges.push = pool.set_challenges
        self.certificate_watch = CertificateWatch(self.reactor, self.certificates,
                                                  pool.set_certificates)
        pool.after_apply.append(self.certificate_watch.check)
        return pool

    def _build_socket_listeners(self) -> list[Any]:
        from mproxy.workers.sockets import SocketListener

        cfg = self.config

        def inherited(kind: str) -> list[tuple[int, int, int]]:
            found = self.inherited.get(kind) if self.inherited is not None else ()
            return [(s.fd, s.family, s.port) for s in found]

        bound = self.prestarted.sockets if self.prestarted is not None else {}

        def grow(kind: str) -> bool:
            # an upgrade's sockets may get more members in their groups;
            # those of socket activation are systemd's, one per address
            handed = self.inherited is not None and self.inherited.handover is not None
            return handed and kind not in self.activated_kinds

        https = SocketListener("HTTPS", cfg.https_port, cfg.bind, inherited("https"),
                               bound=bound.get("https"), workers=cfg.workers,
                               grow=grow("https"))
        listeners: list[Any] = [
            SocketListener("HTTP", cfg.http_port, cfg.bind, inherited("http"),
                           bound=bound.get("http"), workers=cfg.workers, grow=grow("http")),
            https]
        if cfg.http3:
            import socket

            listeners.append(SocketListener("HTTP/3 (UDP)", lambda: https.port, cfg.bind,
                                            inherited("http3"), kind=socket.SOCK_DGRAM,
                                            name="http3", bound=bound.get("http3")))
        if self.metrics is not None:
            from mproxy.workers.metrics import PooledMetricsResource

            listeners.append(
                Listener("metrics", metrics_site(self.metrics, PooledMetricsResource(
                    self.metrics, self.pool.metric_families)), cfg.metrics_port,
                    self._endpoints("metrics"))
            )
        return listeners

    def _start_workers(self) -> Deferred[Any]:
        """
        Start the first generation of workers on the bound sockets.
        """
        import sys

        from mproxy.workers.pool import ProcessSpawner
        from mproxy.workers.prestart import PrestartedSpawner, worker_settings

        cfg = self.config
        by_name = {s.name: s for s in self.listeners}
        http, https = by_name["http"], by_name["https"]
        h3 = by_name.get("http3")
        stream = self.logger._stream
        try:
            log_to_fd = stream in (sys.stdout, sys.__stdout__) and stream.fileno() == 1
        except (AttributeError, OSError, ValueError):
            log_to_fd = False
        settings = worker_settings(cfg, http.port, https.port, SHUTDOWN_GRACE)
        spawner: Any = ProcessSpawner(
            self.reactor, {"http": http.worker_sockets, "https": https.worker_sockets},
            h3.fds if h3 is not None else [], settings, log_to_fd)
        if self.prestarted is not None:
            # the first generation is the workers started with the sockets
            spawner = PrestartedSpawner(self.reactor, self.prestarted, spawner)
        self.pool.spawner = spawner
        if h3 is not None:
            self.pool.alt_svc = h3.port
        self.certificate_watch.start()
        # after an upgrade: the old image's workers are adopted, and retired
        # once these serve
        return self.upgrades.start_generation(self.pool)

    def _endpoints(self, kind: str) -> list[Any]:
        """
        Where the listener of C{kind} serves: its inherited sockets when
        there are any, else the ports it binds.
        """
        inherited = self.inherited.get(kind) if self.inherited is not None else ()
        if inherited:
            return adopted_endpoints(self.reactor, [(s.fd, s.family) for s in inherited])
        return bind_endpoints(self.reactor, self.config.bind)

    @property
    def activated_kinds(self) -> tuple[str, ...]:
        """
        The kinds of listening socket that came from socket activation,
        when this image started or in the image an upgrade came from.
        """
        if self.inherited is None:
            return ()
        if self.inherited.handover is not None:
            return self.inherited.handover.activated
        return tuple(sorted(self.inherited.by_kind))

    def listening_sockets(self) -> list[tuple[str, int]]:
        """
        (kind, descriptor) of every listening socket: C{http}, C{https},
        C{metrics}, and C{http3} (UDP).
        """
        sockets = []
        for listener in self.listeners:
            if isinstance(listener, Listener):
                sockets += [(str(listener.name), fd) for fd in listener.filenos()]
            else:  # the workers' sockets (mproxy.workers.sockets)
                sockets += [(str(listener.name), fd) for fd, _family in listener.fds]
        if self.http3 is not None:
            sockets += [("http3", port.fileno()) for port in self.http3.listener.ports]
        return sockets

    def drain_for_upgrade(self, timeout: float) -> Deferred[Any]:
        """
        Before re-executing for an upgrade: accept nothing more (the sockets
        stay open and listening, for the new image), and drain the
        connections as a stop does, up to C{timeout} seconds.  With workers
        there is nothing to drain here (the metrics endpoint aside): they
        serve on through the exec, and the new image retires them.
        """
        from twisted.internet.defer import DeferredList

        for listener in self.listeners:
            if isinstance(listener, Listener):
                listener.stop_accepting()
        drains = [site.shutdown(timeout) for site in self.sites]
        if self.pool is not None:
            # the workers serve on through the exec (their channels are
            # handed over); the new image retires them once its own serve
            self.certificate_watch.stop()
        if self.http3 is not None:
            drains.append(self.http3.listener.shutdown(timeout))
        self.controller.shutdown()
        return DeferredList(drains, consumeErrors=True)

    def save_state(self) -> None:
        """
        Write the state file as the services are now.
        """
        records = sorted(
            (ServiceRecord.of(s) for s in self.router.services.values()), key=lambda r: r.name
        )
        self.store.save(records)

    @property
    def bound(self) -> dict[str, int]:
        """
        The port number each listener got, by name ("http", "https",
        "metrics").
        """
        return {str(s.name): s.port for s in self.listeners if s.port is not None}

    def setServiceParent(self, parent: Any) -> None:
        # Under twistd the parent is the application: twistd logs through
        # the application's observer when it has one.
        if self.log_observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """
        Restore the state file (a bad one stops start-up before anything
        listens), then bind the TCP ports (before twistd drops privileges).

        @raise StateError: the state file cannot be used.
        @raise StartupError: a port cannot be bound.
        """
        try:
            remove_stale_temporary_files(self.config.state_dir, self.logger)
            self.controller.restore()
            self._prepared = True
            super().privilegedStartService()
        except BaseException as e:
            self._failed(e)
            raise

    def startService(self) -> None:
        """
        Listen on the control socket and start the children; C{ready} fires
        (and "Server started" is logged) once the reactor runs.  Runs
        L{privilegedStartService} first if nobody did.

        @raise StateError: the state file cannot be used.
        @raise StartupError: a port or the control socket cannot be used.
        """
        if not self._prepared:
            self.privilegedStartService()
        try:
            os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
            super().startService()
        except BaseException as e:
            self._failed(e)
            raise
        self._install_sighup()
        workers = None
        if self.pool is not None:
            # here, not while privileged: under twistd --uid workers run as that user
            try:
                workers = self._start_workers()
            except BaseException as e:
                self._failed(e)
                raise
        # Serving begins when the reactor runs (it accepts nothing before):
        # say so then, once its signal handlers are in place, so whoever
        # waits for the line may stop the server at once.
        self.reactor.callWhenRunning(self._serving, workers)

    def _serving(self, workers: Deferred[Any] | None = None) -> None:
        if not self.running:
            return
        if workers is not None:
            # once every worker serves
            workers.addCallbacks(lambda _: self._serving(), self._workers_failed)
            return
        try:
            self.stop_signals = install_stop_signals(self.reactor, self.logger)
            if self.stop_signals is not None:  # a reactor with signal handlers
                self._unhook_sigusr2 = install_upgrade_signal(
                    self.reactor, self.upgrades, self.logger)
        except ValueError:  # not the main thread: the reactor has no handlers either
            self.stop_signals = None
        if self.inherited is not None:
            self.logger.info(
                "Serving inherited sockets",
                **{kind: [s.port for s in sockets]
                   for kind, sockets in sorted(self.inherited.by_kind.items())},
            )
        bound = self.bound
        self.logger.info(
            "Server started",
            http=bound.get("http"),
            https=bound.get("https"),
            socket=self.config.socket,
            state=self.store.path,
        )
        if self.metrics is not None:
            self.logger.info("Metrics enabled", port=bound.get("metrics"))
        self.ready.callback(None)
        self.upgrades.serving()

    def _workers_failed(self, failure: Any) -> None:
        """
        The first workers could not start: stop, failing start-up.
        """
        error = StartupError(f"the worker processes did not start: {failure.getErrorMessage()}")
        self.failure = error
        self.logger.error("Unable to start", error=str(error))
        if not self.ready.called:
            self.ready.errback(error)
        self.reactor.stop()

    def _failed(self, error: BaseException) -> None:
        """
        Start-up failed: close what was opened, log why, fail C{ready}.
        """
        self.running = 0
        for listener in self.listeners:
            listener.abandon()
        self.control.abandon()
        self.controller.shutdown()
        if self.pool is not None:
            self.certificate_watch.stop()
            for generation in list(self.pool.generations):
                self.pool.retire(generation, 0)
        if self.prestarted is not None:
            self.prestarted.abandon()
        message = str(error) if isinstance(error, MproxyError) else repr(error)
        self.logger.error("Unable to start", error=message)
        if not self.ready.called:
            self.ready.errback(error)

    def _install_sighup(self) -> None:
        from mproxy.tls.wiring import install_sighup_reload

        try:
            self._unhook_sighup = install_sighup_reload(
                self.reactor, self.certificates.reload_static
            )
        except (ValueError, OSError):  # not the main thread, or no SIGHUP here
            self._unhook_sighup = None

    def stopService(self) -> Deferred[Any]:
        """
        Stop accepting, let in-flight requests finish (up to
        L{SHUTDOWN_GRACE} seconds), close the control socket (removing its
        file), then stop health checks.
        """
        if self._unhook_sighup is not None:
            self._unhook_sighup()
            self._unhook_sighup = None
        if self._unhook_sigusr2 is not None:
            self._unhook_sigusr2()
            self._unhook_sigusr2 = None
        d: Deferred[Any] = maybeDeferred(MultiService.stopService, self)

        def finish(_: object) -> None:
            self.controller.shutdown()
            if self.pool is not None:
                self.certificate_watch.stop()
            self.logger.info("Server stopped")

        d.addCallback(finish)
        return d


def metrics_site(metrics: Any, resource: Any = None) -> Any:
    """
    The Prometheus site of C{--metrics-port} (C{resource}: the one that
    adds the workers' metrics).
    """
    from twisted.web.server import Site

    from mproxy.metrics import MetricsResource

    site = Site(resource if resource is not None else MetricsResource(metrics))
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def with_inherited_ports(config: ServerConfig, inherited: InheritedSockets) -> ServerConfig:
    """
    The configuration with the port of each inherited kind set to its
    socket's (redirects to HTTPS and the on-demand policy's local requests
    use them); an inherited metrics socket turns metrics on.
    """
    changes = {
        f"{kind}_port": port
        for kind in ("http", "https", "metrics")
        if (port := inherited.port(kind)) is not None
    }
    return evolve(config, **changes)


def build_service(
    reactor: Any,
    config: ServerConfig,
    logger: JSONLogger | None = None,
    environ: MutableMapping[str, str] | None = None,
    prestarted: Any = None,
) -> MproxyService:
    """
    The service tree for C{config}; it serves the listening sockets this
    process was started with, when C{environ} (by default the process's
    environment as it started, L{startup_environment}) says there are some:
    handed over by the image before an upgrade, or by systemd; or else the
    sockets and first workers of C{prestarted}
    (L{mproxy.workers.prestart.prestart}).

    @raise StartupError: the inherited sockets cannot be used.
    """
    logger = logger or JSONLogger(level="DEBUG" if config.debug else "INFO")
    environ = startup_environment() if environ is None else environ
    inherited = upgrade_sockets(environ) or inherited_sockets(environ)
    return MproxyService(reactor, config, logger, inherited, prestarted)
