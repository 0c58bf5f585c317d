"""
The supervisor's listening sockets when workers serve: bound and listening
(so clients can connect from the start, and a port in use stops start-up
with the usual L{StartupError}) but never accepted from in the supervisor;
the workers inherit them.

L{SocketListener} is the stand-in for a L{mproxy.listeners.Listener} of
one kind: the same ports (C{::} and C{0.0.0.0}, or C{--bind}; or the
inherited sockets of socket activation), the same errors, C{port} and
C{fds} for the workers.
"""

from __future__ import annotations

import socket as _socket
from typing import Any, Callable

from mproxy.listeners import BindingService
from mproxy.workers.binding import bind_sockets, listen_failure


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
