# -*- test-case-name: tests.test_workers -*-
"""
A worker process: the data plane only.  It serves HTTP and HTTPS (and, in
the worker that got the UDP socket, HTTP/3) on the listening sockets it
inherited, routing with a L{mproxy.replica.Replica} of the supervisor's
services, terminating TLS with the certificates the supervisor sends
(L{mproxy.workers.certs.CertificateMirror}), and reports back over its
channel (L{mproxy.workers.commands}): drains, ejections, in-flight counts,
metrics, and log lines when it cannot write them itself.

Nothing of the control plane runs here: no state file, no health checks
(the supervisor's results arrive with L{SetHealth}), no ACME.

A worker whose channel closes without L{Retire} (its supervisor died)
retires itself: it stops accepting, lets in-flight requests finish for the
grace period, and exits; so does one sent SIGTERM or SIGINT.

C{python -m mproxy.workers SETTINGS_JSON} runs one (L{main}); the
supervisor's L{mproxy.workers.pool} starts them.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.protocols import amp
from twisted.python import log
from twisted.python.failure import Failure

from mproxy.balancer import LoadBalancer
from mproxy.replica import Replica, drain_all
from mproxy.router import Router
from mproxy.state import ServiceRecord, Slot
from mproxy.target import Drained
from mproxy.workers import commands as c
from mproxy.workers.settings import WorkerSettings
from mproxy.workers.sockets import adopt_listening


def metric_families(registry: Any) -> list[Any]:
    """
    The C{mproxy_*} families of a registry as plain lists (the answer to
    L{GetMetrics}).
    """
    out = []
    for family in registry.collect():
        if not family.name.startswith("mproxy_"):
            continue
        out.append([family.name, family.type, family.documentation,
                    [[s.name, s.labels, s.value] for s in family.samples]])
    return out


class WorkerServer:
    """
    The worker's data plane.  C{send(command, **arguments)} sends a command
    to the supervisor (its channel's C{callRemote}).

    @ivar ports: the listening ports, once L{serve} ran.
    """

    def __init__(self, reactor: Any, settings: WorkerSettings, logger: Any,
                 send: Callable[..., Any], exit: Callable[[], None] | None = None) -> None:
        from mproxy.http.proxy import build_http_factory
        from mproxy.http.upstream import PoolRegistry
        from mproxy.tls.sni import ServerTLS, https_factory
        from mproxy.workers.certs import CertificateMirror, HelloGate

        self.reactor = reactor
        self.settings = settings
        self.logger = logger
        self.send = send
        self.exit = exit or reactor.stop
        self.router = Router()
        self.pools = PoolRegistry(reactor)
        self.replica = Replica(self.router, reactor, self._balancer)
        self.certs = CertificateMirror(self._root_service, self._ask_certificate,
                                       fetch=self._fetch_certificate)
        #: whether a service has on-demand TLS (a handshake may wait for
        #: the supervisor's certificate)
        self.on_demand = False
        self.metrics = None
        if settings.metrics:
            from mproxy.metrics import Metrics

            self.metrics = Metrics()
        common = dict(
            http_port=settings.http_port, https_port=settings.https_port, pools=self.pools,
            metrics=self.metrics, challenges=self.certs.challenges,
            header_timeout=settings.header_timeout, idle_timeout=settings.idle_timeout,
        )
        self.site = build_http_factory(reactor, self.router, logger, **common)
        self.secure = build_http_factory(reactor, self.router, logger, secure=True, **common)
        tls = ServerTLS(self.certs.select, self.certs.challenges, logger=logger)
        self.https = HelloGate(https_factory(tls, self.secure), self.certs.wait_for, reactor,
                               lambda: self.on_demand)
        self.http3: Any = None
        self.ports: list[Any] = []
        self.retiring = False
        #: whether the inherited sockets were taken over (or let go of)
        self.served = False
        #: the slot the supervisor gave it when it began serving
        self.slot = settings.slot

    # routing

    def _root_service(self, server_name: str) -> Any:
        """
        C{(name, options)} of the service serving C{/} for a TLS name.
        """
        service = self.router.root_service_for(server_name)
        return None if service is None else (service.name, service.options)

    def _balancer(self, slot: Slot) -> LoadBalancer:
        # no logger: the supervisor logs each health transition once
        lb = LoadBalancer(slot.writers, slot.readers, self.reactor, self.pools, None)
        for t in lb.targets:
            t.eject = self._reporting_eject(t, t.eject)  # type: ignore[method-assign]
        return lb

    def _reporting_eject(self, target: Any, eject: Callable[[str], bool]) -> Callable[[str], bool]:
        def reporting(error: str) -> bool:
            ejected = eject(error)
            if ejected:
                self.send(c.Eject, address=target.address, error=error,
                          key=self.replica.key_of(target))
            return ejected

        return reporting

    def set_services(self, seq: int, records: list[dict[str, Any]], health: dict[str, bool],
                     drain_timeout: float, targets: dict[str, Any] | None = None) -> int:
        """
        Switch to C{records}; drain what they replaced (reported with
        L{Drained}); returns the requests in flight on what was replaced.
        """
        replaced = self.replica.apply([ServiceRecord.from_json(r) for r in records], health,
                                      targets)
        self.on_demand = any(s.options.tls_on_demand_url
                             for s in self.router.services.values())
        draining = sum(lb.inflight() for lb in replaced)
        for lb in replaced:
            lb.stop_health_checks()

        def drained(d: Drained) -> None:
            self.send(c.Drained, seq=seq, requests=d.requests, cut=d.cut)

        drain_all(replaced, drain_timeout).addCallback(drained)
        return draining

    def set_health(self, address: str, healthy: bool, key: str | None = None) -> None:
        self.replica.set_health(address, healthy, key)

    def drain_service(self, name: str, timeout: float) -> Deferred[Drained]:
        from mproxy.balancer import gather_drains

        service = self.router.services.get(name)
        if service is None:
            return succeed(Drained())
        return gather_drains([lb.drain(timeout) for lb in service.balancers()])

    def inflight(self) -> dict[str, int]:
        return {name: sum(lb.inflight() for lb in s.balancers())
                for name, s in self.router.services.items()}

    def metric_families(self) -> list[Any]:
        if self.metrics is None:
            return []
        return metric_families(self.metrics.registry)

    # certificates

    def _ask_certificate(self, server_name: str) -> None:
        self.send(c.AskCertificate, server_name=server_name)

    def _fetch_certificate(self, server_name: str) -> Deferred[Any]:
        d = self.send(c.FetchCertificate, server_name=server_name)
        return d.addCallbacks(lambda answer: answer["pem"], lambda f: None)

    # serving

    def serve(self, http3: bool = False) -> None:
        """
        Accept on the inherited sockets (the UDP one too with C{http3},
        else it is closed here): this worker's own sockets taken whole at
        each wake-up (no other worker takes from them as it does), other
        workers' helped with (L{mproxy.workers.sockets.HelpingPort}), a
        socket shared by all one connection per wake-up.
        """
        self.served = True
        factories = {"http": self.site, "https": self.https}
        for kind, sockets in self.settings.sockets.items():
            for fd, family, *owner in sockets:
                # an inherited socket may be blocking (systemd's are not, a
                # test's may be): accept() must never block the reactor
                os.set_blocking(fd, False)
                slot = owner[0] if owner else -1
                self.ports.append(adopt_listening(
                    self.reactor, fd, family, factories[kind],
                    acceptors=self.settings.acceptors if slot < 0 else 1,
                    helping=0 <= slot != self.slot))
                os.close(fd)
        for fd, family in self.settings.udp:
            if not http3:
                os.close(fd)
                continue
            from mproxy.http.h3 import H3Listener, proxy_handler

            listener = H3Listener(proxy_handler(self.secure.resource), self.reactor,
                                  self.certs.select, logger=self.logger,
                                  idle_timeout=self.secure.idle_timeout)
            self.http3 = listener
            os.set_blocking(fd, False)
            listener.ports.append(self.reactor.adoptDatagramPort(fd, family, listener))
            os.close(fd)

    def _release_unserved(self) -> None:
        """
        Close the inherited sockets this worker never served (a standby
        worker's): once its supervisor is gone, the next server started on
        the same ports must be able to bind them at once, not after this
        process has exited.
        """
        if self.served:
            return
        self.served = True
        for sockets in self.settings.sockets.values():
            for fd, *_rest in sockets:
                _close_quietly(fd)
        for fd, _family in self.settings.udp:
            _close_quietly(fd)

    def set_alt_svc(self, port: int | None) -> None:
        self.secure.resource.alt_svc = (
            None if port is None else [(b"Alt-Svc", b'h3=":%d"; ma=2592000' % port)])

    def retire(self, grace: float) -> Deferred[None]:
        """
        Stop accepting here (the sockets stay open in the other processes),
        let in-flight requests finish for up to C{grace} seconds, exit.
        """
        from twisted.internet.defer import DeferredList, maybeDeferred

        if self.retiring:
            return succeed(None)
        self.retiring = True
        self._release_unserved()
        ports, self.ports = self.ports, []
        d = DeferredList([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)

        def drain(_: object) -> Any:
            drains = [self.site.shutdown(grace), self.secure.shutdown(grace)]
            if self.http3 is not None:
                drains.append(self.http3.shutdown(grace))
            return DeferredList(drains, consumeErrors=True)

        d.addCallback(drain)
        d.addBoth(lambda _: self.exit())
        return d


class WorkerChannel(amp.AMP):
    """
    The worker's end of the channel.
    """

    def __init__(self, server: WorkerServer | None = None) -> None:
        super().__init__()
        self.server = server

    @c.SetServices.responder
    def set_services(self, seq: int, records: Any, health: Any, drain_timeout: float,
                     targets: Any = None) -> dict:
        assert self.server is not None
        return {"draining": self.server.set_services(seq, records, health, drain_timeout,
                                                     targets)}

    @c.SetHealth.responder
    def set_health(self, address: str, healthy: bool, key: str | None = None) -> dict:
        assert self.server is not None
        self.server.set_health(address, healthy, key)
        return {}

    @c.DrainService.responder
    def drain_service(self, service: str, timeout: float) -> Deferred[dict]:
        assert self.server is not None
        d = self.server.drain_service(service, timeout)
        return d.addCallback(lambda r: {"requests": r.requests, "cut": r.cut})

    @c.GetInflight.responder
    def get_inflight(self) -> dict:
        assert self.server is not None
        return {"inflight": self.server.inflight()}

    @c.GetMetrics.responder
    def get_metrics(self) -> dict:
        assert self.server is not None
        return {"families": self.server.metric_families()}

    @c.SetCertificates.responder
    def set_certificates(self, snapshot: Any) -> dict:
        assert self.server is not None
        self.server.certs.update(snapshot)
        return {}

    @c.SetChallenges.responder
    def set_challenges(self, http01: Any, alpn: Any) -> dict:
        assert self.server is not None
        self.server.certs.update_challenges(http01, alpn)
        return {}

    @c.Serve.responder
    def serve(self, slot: int, http3: bool, alt_svc: int) -> dict:
        assert self.server is not None
        self.server.slot = slot
        self.server.serve(http3)
        self.server.set_alt_svc(alt_svc or None)
        return {"pid": os.getpid()}

    @c.Retire.responder
    def retire(self, grace: float) -> dict:
        assert self.server is not None
        self.server.retire(grace)
        return {}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        server = self.server
        if server is not None and not server.retiring:
            if server.ports:
                server.logger.warn("Supervisor gone: retiring", slot=server.slot)
            server.retire(server.settings.grace)


def worker_events(logger: Any, clock: Any, report: Callable[[str], None]) -> Any:
    """
    The worker's C{twisted.logger} observer: as the supervisor's, except
    that running out of file descriptors is reported to the supervisor
    (which logs it once for all workers) instead of logged here.
    """
    from mproxy.logging import TwistedEvents

    class WorkerEvents(TwistedEvents):
        def _exhausted(self, error: str) -> None:
            report(error)

    return WorkerEvents(logger, clock)


#: the most bytes one write(2) to a pipe writes atomically (POSIX: at least 512)
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class FDLines:
    """
    A stream for L{mproxy.logging.JSONLogger} that writes to a descriptor
    shared with the supervisor (and the other workers) whole lines only:
    each C{write(2)} holds complete lines, so lines of different processes
    never mix.

    With C{at_turn_end} (the reactor's C{call_at_turn_end}), the lines of
    one reactor turn are written together when it ends, as few writes as
    fit in L{PIPE_BUF} bytes each (atomic on a pipe); a longer line is
    written alone.  L{write_later} takes a line to be made then, in its
    place among the others: a request's line is built once the turn's
    responses are sent, not before.  L{drain} writes what is pending at
    once: the worker calls it when its reactor has stopped, so no line is
    lost on the way out.  Without C{at_turn_end}, and for lines logged by
    another thread than the one that made it (the reactor's), each line is
    written (or made and written) at once.
    """

    def __init__(self, fd: int, at_turn_end: Callable[[Callable[[], None]], None] | None = None,
                 limit: int = PIPE_BUF) -> None:
        self.fd = fd
        self._at_turn_end = at_turn_end
        self._limit = limit
        #: lines (bytes) and lines to make (callables returning bytes), in order
        self._pending: list[Any] = []
        #: bytes of the pending lines already made
        self._size = 0
        self._thread = threading.get_ident()

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        if self._at_turn_end is None or threading.get_ident() != self._thread:
            self._write_out(data)
            return
        if self._size + len(data) > self._limit:
            self.drain()
            if len(data) > self._limit:
                self._write_out(data)
                return
        if not self._pending:
            self._at_turn_end(self.drain)
        self._pending.append(data)
        self._size += len(data)

    def write_later(self, make: Callable[[], bytes]) -> None:
        """
        Write the line C{make()} returns (encoded, with its newline) in
        this place among the pending lines, made when they are written.
        """
        if self._at_turn_end is None or threading.get_ident() != self._thread:
            self._write_out(make())
            return
        if not self._pending:
            self._at_turn_end(self.drain)
        self._pending.append(make)

    def drain(self) -> None:
        """
        Write the pending lines now (lines still to be made are made
        first; one that fails is left out, and its error logged once the
        others are written).
        """
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        if len(pending) == 1:
            item = pending[0]
            if type(item) is not bytes:
                try:
                    item = item()
                except Exception:
                    log.err(Failure(), "Unable to make a log line")
                    return
            self._write_quietly(item)
            return
        limit = self._limit
        errors: list[Any] = []
        chunk: list[bytes] = []
        size = 0
        for item in pending:
            if type(item) is not bytes:
                try:
                    item = item()
                except Exception:
                    errors.append(Failure())
                    continue
            if chunk and size + len(item) > limit:
                self._write_quietly(b"".join(chunk))
                chunk = []
                size = 0
            chunk.append(item)
            size += len(item)
        if chunk:
            self._write_quietly(chunk[0] if len(chunk) == 1 else b"".join(chunk))
        for failure in errors:
            log.err(failure, "Unable to make a log line")

    def _write_quietly(self, data: bytes) -> None:
        try:
            self._write_out(data)
        except OSError:
            # as a line written at once would be: dropped (the logger
            # drops a line its stream cannot take)
            pass

    def _write_out(self, data: bytes) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def flush(self) -> None:
        pass


class ChannelLines:
    """
    A stream for L{mproxy.logging.JSONLogger} that sends each line to the
    supervisor, which writes it where it logs.
    """

    def __init__(self) -> None:
        self.channel: Any = None
        self._pending: list[str] = []

    def write(self, text: str) -> None:
        line = text.rstrip("\n")
        if self.channel is None:
            self._pending.append(line)
            return
        self.channel.callRemote(c.Log, line=line)

    def connected(self, channel: Any) -> None:
        self.channel = channel
        pending, self._pending = self._pending, []
        for line in pending:
            channel.callRemote(c.Log, line=line)

    def flush(self) -> None:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def import_data_plane() -> None:
    """
    Import what a worker runs, without installing a reactor: a process
    that forks its workers (L{mproxy.workers.prestart}) does it once for
    all of them.
    """
    import twisted.internet.protocol  # noqa: F401
    import twisted.logger  # noqa: F401

    import mproxy.http.proxy  # noqa: F401
    import mproxy.http.upstream  # noqa: F401
    import mproxy.logging  # noqa: F401
    import mproxy.tls.sni  # noqa: F401
    import mproxy.workers.certs  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """
    Run a worker: C{python -m mproxy.workers SETTINGS_JSON}.
    """
    import socket

    from twisted.internet.protocol import Factory

    from mproxy.logging import JSONLogger
    from mproxy.workers.reactor import install

    reactor = install()
    args = sys.argv[1:] if argv is None else argv
    settings = WorkerSettings.from_json(args[0])
    lines: Any = (FDLines(1, getattr(reactor, "call_at_turn_end", None))
                  if settings.log == "fd" else ChannelLines())
    logger = JSONLogger(lines, level="DEBUG" if settings.debug else "INFO")
    from twisted.logger import globalLogBeginner

    channel = WorkerChannel()
    events = worker_events(logger, reactor,
                           lambda error: channel.callRemote(c.Exhausted, error=error))
    globalLogBeginner.beginLoggingTo([events], redirectStandardIO=False)
    server = WorkerServer(reactor, settings, logger, channel.callRemote)
    channel.server = server
    if isinstance(lines, ChannelLines):
        lines.connected(channel)
    reactor.adoptStreamConnection(settings.channel, socket.AF_UNIX,
                                  Factory.forProtocol(lambda: channel))
    os.close(settings.channel)

    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(server.retire, settings.grace)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from mproxy import collector

    collector.resume()
    run_reactor(reactor, lines)


def run_reactor(reactor: Any, lines: Any) -> None:
    """
    Run C{reactor}; once it has stopped (or failed), write the log lines
    still pending in C{lines} (an L{FDLines} holding a turn's lines): a
    forked worker leaves with C{os._exit}, which would drop them.
    """
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        drain = getattr(lines, "drain", None)
        if drain is not None:
            drain()
