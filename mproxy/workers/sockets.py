"""
The supervisor's listening sockets when workers serve: bound and listening
(so clients can connect from the start, and a port in use stops start-up
with the usual L{StartupError}) but never accepted from in the supervisor;
the workers inherit them.

L{SocketListener} is the stand-in for a L{mproxy.listeners.Listener} of
one kind: the same ports (C{::} and C{0.0.0.0}, or C{--bind}; or the
inherited sockets of socket activation), the same errors, C{port} and
C{fds} for the workers.

L{adopt_listening} is how a worker accepts from such a shared socket: one
connection per wake-up (L{OneAcceptPort}), so that a burst of new
connections is shared between the workers instead of taken whole by the
first one the kernel wakes; a worker that accepts alone takes the whole
queue.
"""

from __future__ import annotations

import socket as _socket
import struct
from typing import Any, Callable

from twisted.internet import tcp

from mproxy.listeners import BindingService
from mproxy.workers.binding import bind_sockets, listen_failure


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
    A listening TCP port shared by C{acceptors} worker processes: with
    several (or an unknown number, C{0}), it accepts at most one connection
    each time the reactor finds it readable; the only worker accepting on
    it takes every queued connection.

    Twisted's port accepts up to C{numberAccepts} connections per wake-up
    (100 at first, growing while the queue stays full).  With one socket
    shared by several worker processes, every worker is woken for a burst
    (a load generator or a browser opening its connections at once) and the
    first to run takes the whole queue: the others stay idle for as long as
    those keep-alive connections live.  Taking one connection and going back
    to the reactor lets every woken worker take its turn, and a worker busy
    serving the connections it already has takes fewer new ones.  (Taking
    half the queue of two workers per wake-up split a burst of 20 15/5 and
    4/16, one at a time 11/9.)  A worker alone has no one to share with,
    and one at a time its burst waited a reactor turn per connection (50
    connections opened at once while 1 MiB responses went out: the last
    one's handshake began about a second after its connect, while the
    client retried its reads).
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


def adopt_listening(reactor: Any, fd: int, family: int, factory: Any,
                    acceptors: int = 0) -> Any:
    """
    Serve C{factory} on the listening TCP socket C{fd} (not closed: the
    port works on its own duplicate), which C{acceptors} workers accept on
    (C{0}: not known): one connection per wake-up, or with C{acceptors} 1
    the whole queue (L{OneAcceptPort}); like C{reactor.adoptStreamPort}
    otherwise.
    """
    port = OneAcceptPort._fromListeningDescriptor(reactor, fd, family, factory)
    port.acceptors = acceptors
    port.startListening()
    return port


class SocketListener(BindingService):
    """
    The sockets of one kind (C{what}: "HTTP", "HTTPS", "HTTP/3 (UDP)"),
    bound in C{privilegedStartService}, or inherited (C{inherited}:
    C{[(fd, family, port)]}), or bound already by this process (C{bound}:
    sockets it then owns, L{mproxy.workers.prestart}); C{port} may be a
    callable giving the port when it is bound (HTTP/3 binds the port HTTPS
    got).

    @ivar port: the port number, once bound.
    @ivar fds: C{[(fd, family), ...]} for the workers.
    """

    def __init__(self, what: str, port: int | Callable[[], int | None], bind: str,
                 inherited: list[tuple[int, int, int]] | None = None,
                 kind: int = _socket.SOCK_STREAM, name: str | None = None,
                 bound: list[_socket.socket] | None = None) -> None:
        self.setName(name or what.lower())
        self.what = what
        self.requested_port = port
        self.bind = bind
        self.kind = kind
        self.inherited = inherited or []
        self.port: int | None = None
        self.fds: list[tuple[int, int]] = []
        self._sockets: list[_socket.socket] = []
        self._bound = bound or []

    def _bind(self) -> None:
        if self.inherited:
            self.fds = [(fd, family) for fd, family, _ in self.inherited]
            self.port = self.inherited[0][2]
            return
        if self._bound:
            self._sockets, self._bound = self._bound, []
        else:
            port = self.requested_port
            number = (port() or 0) if callable(port) else port
            try:
                self._sockets = bind_sockets(self.bind, number, self.kind)
            except OSError as e:
                raise listen_failure(self.what, number, e)
        self.fds = [(s.fileno(), int(s.family)) for s in self._sockets]
        self.port = self._sockets[0].getsockname()[1]

    def abandon(self) -> None:
        self.port = None
        sockets, self._sockets = self._sockets + self._bound, []
        self._bound = []
        for s in sockets:
            s.close()

    def stopService(self) -> Any:
        super().stopService()
        self.abandon()
