"""
Listening sockets bound with the C{socket} module alone (no Twisted), and
the start-up error a port that cannot be bound gives.  Light on purpose:
C{mproxy run} binds the workers' sockets with it before it imports the
rest of itself (L{mproxy.workers.prestart}).
"""

from __future__ import annotations

import errno
import socket as _socket

from mproxy.errors import StartupError

#: Twisted's default backlog (50) drops SYNs under a burst of new connections;
#: the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def listen_failure(what: str, port: int, error: BaseException) -> StartupError:
    """
    The start-up error for a port that could not be bound (C{error}: an
    C{OSError}, or Twisted's C{CannotListenError} carrying one); a port
    below 1024 refused for lack of privilege names the way out.
    """
    message = f"cannot listen for {what} on port {port}: {str(error).rstrip('.')}"
    socket_error = getattr(error, "socketError", error)
    if (
        isinstance(socket_error, OSError)
        and socket_error.errno == errno.EACCES
        and 0 < port < 1024
    ):
        message += (
            "; ports below 1024 need root (or CAP_NET_BIND_SERVICE): as a normal "
            "user, run with --http-port 8080 --https-port 8443"
        )
    return StartupError(message)


def _bind_one(family: int, address: str, port: int, kind: int) -> _socket.socket:
    s = _socket.socket(family, kind)
    try:
        if kind == _socket.SOCK_STREAM:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if family == _socket.AF_INET6 and address == "::":
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
        s.bind((address, port))
        if kind == _socket.SOCK_STREAM:
            s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def bind_sockets(bind: str, port: int, kind: int = _socket.SOCK_STREAM) -> list[_socket.socket]:
    """
    Listening sockets on C{port} (0: a free one) at C{bind}, or at C{::}
    (dual-stack) and C{0.0.0.0} where the first does not already take IPv4.

    @raise OSError: the last error when no socket could be bound.
    """
    if bind:
        address = bind.strip("[]")
        family = _socket.AF_INET6 if ":" in address else _socket.AF_INET
        return [_bind_one(family, address, port, kind)]
    out: list[_socket.socket] = []
    error: OSError | None = None
    candidates = ([(_socket.AF_INET6, "::")] if _socket.has_ipv6 else []) + [
        (_socket.AF_INET, "0.0.0.0")]
    for family, address in candidates:
        try:
            s = _bind_one(family, address, port, kind)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and out:
                continue  # the dual-stack socket has IPv4 too
            error = e
            continue
        out.append(s)
        if port == 0:
            port = s.getsockname()[1]
    if not out:
        assert error is not None
        raise error
    return out
