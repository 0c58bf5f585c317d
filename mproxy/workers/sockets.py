"""
The supervisor's listening sockets when workers serve: bound and listening
(so clients can connect from the start, and a port in use stops start-up
with the usual L{StartupError}) but never accepted from in the supervisor;
the workers inherit them.

L{SocketListener} is the stand-in for a L{mproxy.listeners.Listener} of
one kind: the same ports (C{::} and C{0.0.0.0}, or C{--bind}; or the
inherited sockets of socket activation or of an upgrade), the same errors,
C{port}, C{fds} and, for the workers, C{worker_sockets}.

Each address gets one socket per worker, all in one C{SO_REUSEPORT} group:
the kernel spreads new connections over them by hash, and each socket is
owned by one worker slot (L{socket_owners}), which takes the whole queue of
its own socket at each wake-up.  The supervisor holds every socket open, so
connections queued on the socket of a worker that died wait there for its
replacement, which is given the same socket.  Every worker also helps with
the other slots' sockets, taking the connections that have waited there
for a few milliseconds (L{HelpingPort}): a worker that is busy or stuck (or
dead and not yet replaced) does not leave the connections the kernel gave
its socket waiting while another worker idles.

A single inherited socket cannot be made a group (systemd socket
activation passes one per address, and sockets bound here would not
outlive this process as systemd's do): it is shared by all workers, each
taking one connection per wake-up so that a burst is shared between them
(L{OneAcceptPort}).
"""

from __future__ import annotations

import os
import socket as _socket
import struct
from typing import Any, Callable

from twisted.internet import tcp

from mproxy.listeners import BindingService
from mproxy.workers.binding import (
    bind_sockets,
    join_group,
    listen_failure,
    local_address,
    socket_owners,
)


def queued_connections(sock: Any) -> int | None:
    """
    The connections waiting in listening socket C{sock}'s accept queue
    (Linux: C{tcpi_unacked} of a listener's C{TCP_INFO}); C{None} where
    that cannot be read.
    """
    try:
        info = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 104)
    except (AttributeError, OSError):
        return None
    if len(info) < 28:
        return None
    return struct.unpack_from("I", info, 24)[0]


class OneAcceptPort(tcp.Port):
    """
    A listening TCP port that C{acceptors} worker processes take
    connections from: with several (or an unknown number, C{0}: a socket
    shared by all, or another worker's own socket this one helps with), it
    accepts at most one connection each time the reactor finds it readable;
    the only worker accepting on it (its own socket) takes every queued
    connection.

    Twisted's port accepts up to C{numberAccepts} connections per wake-up
    (100 at first, growing while the queue stays full).  With one socket
    shared by several worker processes, every worker is woken for a burst
    (a load generator or a browser opening its connections at once) and the
    first to run takes the whole queue: the others stay idle for as long as
    those keep-alive connections live.  Taking one connection and going back
    to the reactor lets every woken worker take its turn, and a worker busy
    serving the connections it already has takes fewer new ones.  (Taking
    half the queue of two workers per wake-up split a burst of 20 15/5 and
    4/16, one at a time 11/9.)  But one at a time a burst waits a reactor
    turn per connection (50 connections opened at once while 1 MiB
    responses went out: the last one's handshake began about a second after
    its connect, while the client retried its reads), which is why each
    worker has a socket of its own, taken whole.
    """

    acceptors = 0

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        if self.acceptors != 1:
            return 1
        return queued_connections(self.socket) or 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        # tcp.Port grows or shrinks its batch after each wake-up; ours is
        # read from the queue at each one
        pass


#: Seconds a connection waits on another worker's socket before a worker
#: that helps with it takes it: the owner, when it is not busy, takes its
#: queue well within this (so that each worker keeps the connections the
#: kernel gave it, and the keep-alive load stays spread); one busy with a
#: long reactor turn, stuck or dead has its queue taken after this wait.
HELP_AFTER = 0.005


class HelpingPort(OneAcceptPort):
    """
    Another worker's own socket, which this worker helps with: when it is
    readable, the connections queued then are looked at again after
    L{HELP_AFTER} seconds (the port not read meanwhile), and those the
    owner has not taken by then are taken here (at most as many as were
    queued at first: the newer ones are still the owner's to take).
    """

    help_after = HELP_AFTER
    _look: Any = None
    _waiting = 0
    _batch = 1

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return self._batch

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass

    def doRead(self) -> None:
        if self._look is not None:
            return
        self._waiting = queued_connections(self.socket) or 1
        self.stopReading()
        self._look = self.reactor.callLater(self.help_after, self._help)

    def _help(self) -> None:
        self._look = None
        if self.disconnecting or not self.connected:
            return
        queued = queued_connections(self.socket)
        left = min(self._waiting, 1 if queued is None else queued)
        if left > 0:
            self._batch = left
            try:
                super().doRead()
            finally:
                self._batch = 1
        self.startReading()

    def connectionLost(self, reason: Any) -> None:
        if self._look is not None:
            self._look.cancel()
            self._look = None
        super().connectionLost(reason)


def adopt_listening(reactor: Any, fd: int, family: int, factory: Any,
                    acceptors: int = 0, helping: bool = False) -> Any:
    """
    Serve C{factory} on the listening TCP socket C{fd} (not closed: the
    port works on its own duplicate), which C{acceptors} workers accept on
    (C{0}: not known): one connection per wake-up, or with C{acceptors} 1
    the whole queue (L{OneAcceptPort}); with C{helping}, another worker's
    own socket (L{HelpingPort}).
    """
    kind = HelpingPort if helping else OneAcceptPort
    port = kind._fromListeningDescriptor(reactor, fd, family, factory)
    port.acceptors = acceptors
    port.startListening()
    return port


class SocketListener(BindingService):
    """
    The sockets of one kind (C{what}: "HTTP", "HTTPS", "HTTP/3 (UDP)"),
    bound in C{privilegedStartService} (TCP: C{workers} per address, see
    the module docstring), or inherited (C{inherited}: C{[(fd, family,
    port)]}), or bound already by this process (C{bound}: sockets it then
    owns, L{mproxy.workers.prestart}); C{port} may be a callable giving the
    port when it is bound (HTTP/3 binds the port HTTPS got).

    With C{grow} (the sockets an upgrade handed over), an address whose
    group has fewer sockets than C{workers} (the image before ran fewer
    workers) gets more, bound into the same group; where that fails (the
    handed-over sockets are not in a group), its sockets stay shared.

    @ivar port: the port number, once bound.
    @ivar fds: C{[(fd, family), ...]}, every socket (kept across an
        upgrade, in this order).
    @ivar worker_sockets: C{[(fd, family, owner), ...]} for the workers
        (L{socket_owners}).
    """

    def __init__(self, what: str, port: int | Callable[[], int | None], bind: str,
                 inherited: list[tuple[int, int, int]] | None = None,
                 kind: int = _socket.SOCK_STREAM, name: str | None = None,
                 bound: list[_socket.socket] | None = None, workers: int = 1,
                 grow: bool = False,
                 address_of: Callable[[int], Any] = local_address) -> None:
        self.setName(name or what.lower())
        self.what = what
        self.requested_port = port
        self.bind = bind
        self.kind = kind
        self.inherited = inherited or []
        self.workers = workers
        self.grow = grow
        self.address_of = address_of
        self.port: int | None = None
        self.fds: list[tuple[int, int]] = []
        self.worker_sockets: list[tuple[int, int, int]] = []
        self._sockets: list[_socket.socket] = []
        self._bound = bound or []

    def _bind(self) -> None:
        if self.inherited:
            self.fds = [(fd, family) for fd, family, _ in self.inherited]
            self.port = self.inherited[0][2]
            if self.grow and self.kind == _socket.SOCK_STREAM:
                self._grow()
        else:
            if self._bound:
                self._sockets, self._bound = self._bound, []
            else:
                port = self.requested_port
                number = (port() or 0) if callable(port) else port
                count = self.workers if self.kind == _socket.SOCK_STREAM else 1
                try:
                    self._sockets = bind_sockets(self.bind, number, self.kind, count)
                except OSError as e:
                    raise listen_failure(self.what, number, e)
            self.fds = [(s.fileno(), int(s.family)) for s in self._sockets]
            self.port = self._sockets[0].getsockname()[1]
        owners = (socket_owners(self.fds, self.workers, self.address_of)
                  if self.kind == _socket.SOCK_STREAM else [-1] * len(self.fds))
        self.worker_sockets = [(fd, family, owner)
                               for (fd, family), owner in zip(self.fds, owners)]

    def _grow(self) -> None:
        groups: dict[Any, list[int]] = {}
        for fd, _family in self.fds:
            groups.setdefault(self.address_of(fd), []).append(fd)
        for address, fds in groups.items():
            missing = self.workers - len(fds)
            if address is None or missing <= 0:
                continue
            try:
                sock = _socket.socket(fileno=os.dup(fds[0]))
            except OSError:
                continue
            try:
                added = join_group(sock, missing)
            except OSError:
                continue  # not a group: its sockets stay shared
            finally:
                sock.close()
            self._sockets += added
            self.fds += [(s.fileno(), int(s.family)) for s in added]

    def abandon(self) -> None:
        self.port = None
        sockets, self._sockets = self._sockets + self._bound, []
        self._bound = []
        for s in sockets:
            s.close()

    def stopService(self) -> Any:
        super().stopService()
        self.abandon()
