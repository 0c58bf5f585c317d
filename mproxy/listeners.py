"""
The listening TCP ports as services of the service tree.

A L{Listener} owns the ports of one kind (HTTP, HTTPS, metrics) for one
factory.  It binds in C{privilegedStartService}, so that under C{twistd} a
port below 1024 is bound before privileges are dropped, and so that a port
that cannot be bound stops start-up at once with a L{StartupError} (twistd
then exits non-zero).  Stopping it closes the ports and then, for an HTTP
site, waits for the graceful drain of the site's connections.

Where the sockets come from is an L{EndpointMaker}: one that binds (C{::}
and C{0.0.0.0}, or the C{--bind} address, L{bind_endpoints}), or one that
adopts a listening socket this process inherited (from systemd, or from a
supervisor, L{adopted_endpoints}), with nothing else changing here.
"""

from __future__ import annotations

import os
import socket as _socket
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure

# StartupError and listen_failure are used from here by the rest of the tree
from mproxy.errors import StartupError
from mproxy.workers.binding import LISTEN_BACKLOG, listen_failure  # noqa: F401

#: A port number (0: any free port) → an endpoint to listen on.
EndpointMaker = Callable[[int], IStreamServerEndpoint]


def bind_endpoints(reactor: Any, bind: str) -> list[EndpointMaker]:
    """
    Endpoint makers for a bind address; all interfaces is C{::} then
    C{0.0.0.0}.
    """
    b = LISTEN_BACKLOG
    if bind:
        if ":" in bind:
            return [lambda port: TCP6ServerEndpoint(reactor, port, b, bind.strip("[]"))]
        return [lambda port: TCP4ServerEndpoint(reactor, port, b, bind)]
    makers: list[EndpointMaker] = []
    if _socket.has_ipv6:
        makers.append(lambda port: TCP6ServerEndpoint(reactor, port, b, "::"))
    makers.append(lambda port: TCP4ServerEndpoint(reactor, port, b, "0.0.0.0"))
    return makers


def adopted_endpoints(reactor: Any, sockets: Sequence[tuple[int, int]]) -> list[EndpointMaker]:
    """
    Endpoint makers serving inherited listening sockets, given as (file
    descriptor, address family) pairs; the port number asked for is the
    socket's own, whatever it is.  The endpoint is given a duplicate (it
    closes what it adopts), so the inherited descriptor stays open and can
    be handed on.
    """

    def maker(fd: int, family: int) -> EndpointMaker:
        return lambda port: AdoptedStreamServerEndpoint(reactor, os.dup(fd), family)

    return [maker(fd, family) for fd, family in sockets]


class BindingService(Service):
    """
    A service that binds its sockets once, when it is first started: in
    C{privilegedStartService} (under twistd, before privileges are
    dropped) or, when its parent starts it without that step, in
    C{startService}.  Subclasses define C{_bind}, which sets C{port}.

    @ivar port: the port number, once bound.
    """

    port: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            self._bind()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._bind()

    def _bind(self) -> None:
        raise NotImplementedError


class Listener(BindingService):
    """
    The ports of one kind (C{what}: "HTTP", "HTTPS", "metrics") serving
    C{factory}, one per endpoint maker.  Without C{--bind} that is C{::}
    (dual-stack where IPv6 exists) and C{0.0.0.0}: the second fails harmlessly
    when the first already took IPv4 too, and the first fails harmlessly where
    IPv6 is disabled (some containers).  Only when every one fails does
    start-up fail.

    @ivar port: the port number bound (the real one when 0 was asked for),
        or C{None} before binding.
    """

    def __init__(
        self,
        what: str,
        factory: Any,
        port: int,
        endpoints: Sequence[EndpointMaker],
        drain: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        self.setName(what.lower())
        self.what = what
        self.factory = factory
        self.requested_port = port
        self.endpoints = list(endpoints)
        self.drain = drain
        self.port: int | None = None
        self._ports: list[Any] = []

    def _bind(self) -> None:
        errors: list[BaseException] = []
        number = self.requested_port
        for make in self.endpoints:
            outcome: list[Any] = []
            make(number).listen(self.factory).addBoth(outcome.append)
            if not outcome:
                raise StartupError(f"listening for {self.what} did not complete at once")
            result = outcome[0]
            if isinstance(result, Failure):
                errors.append(result.value)
                continue
            self._ports.append(result)
            if self.port is None:
                self.port = result.getHost().port
                # An ephemeral port: listen there on the other family too.
                number = self.port
        if self.port is None:
            raise listen_failure(self.what, self.requested_port, errors[-1])

    def filenos(self) -> list[int]:
        """
        The descriptors of the listening sockets.
        """
        return [p.fileno() for p in self._ports]

    def stop_accepting(self) -> None:
        """
        Accept no more connections, leaving the sockets listening: new
        connections wait in their queues (for another process holding the
        sockets).  Closing a port instead would shut down a socket it bound,
        for every process holding it.
        """
        for p in self._ports:
            p.stopReading()

    def abandon(self) -> None:
        """
        Close the ports without waiting (start-up failed elsewhere).
        """
        self.port = None
        ports, self._ports = self._ports, []
        for p in ports:
            p.stopListening()

    def stopService(self) -> Deferred[Any]:
        """
        Close the ports, then (for an HTTP site) wait for its drain.
        """
        super().stopService()
        ports, self._ports = self._ports, []
        d: Deferred[Any] = DeferredList(
            [maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )
        if self.drain is not None:
            drain = self.drain
            d.addCallback(lambda _: drain())
        d.addCallback(lambda _: None)
        return d
