"""
Listening sockets bound with the C{socket} module alone (no Twisted): one
C{SO_REUSEPORT} group per address, a socket per worker, and which worker
slot owns which socket (L{socket_owners}); and the start-up error a port
that cannot be bound gives.  Light on purpose:
C{mproxy run} binds the workers' sockets with it before it imports the
rest of itself (L{mproxy.workers.prestart}).
"""

from __future__ import annotations

import errno
import os
import socket as _socket
from typing import Any, Callable, Sequence

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


def _bind_one(family: int, address: str, port: int, kind: int,
              reuseport: bool = False, listen: bool = True) -> _socket.socket:
    s = _socket.socket(family, kind)
    try:
        if kind == _socket.SOCK_STREAM:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        if family == _socket.AF_INET6 and address == "::":
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
        s.bind((address, port))
        if kind == _socket.SOCK_STREAM and listen:
            s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _bind_group(family: int, address: str, port: int, kind: int,
                count: int) -> list[_socket.socket]:
    """
    C{count} listening sockets on one address, in one C{SO_REUSEPORT} group
    when C{kind} is TCP (the kernel spreads new connections over them by
    hash; each worker accepts on its own).

    Before the group is bound, a socket without C{SO_REUSEPORT} is bound to
    the address and closed again: that fails as it always did when anything
    listens there (another server on the same port, or our dual-stack
    socket that already takes IPv4), where a socket with C{SO_REUSEPORT}
    would quietly join another process's group of the same user.
    """
    if kind != _socket.SOCK_STREAM:
        return [_bind_one(family, address, port, kind)]
    if port != 0:
        _bind_one(family, address, port, kind, listen=False).close()
    group: list[_socket.socket] = []
    try:
        for _ in range(max(1, count)):
            s = _bind_one(family, address, port, kind, reuseport=True)
            group.append(s)
            port = s.getsockname()[1]
    except BaseException:
        for s in group:
            s.close()
        raise
    return group


def join_group(sock: Any, count: int) -> list[_socket.socket]:
    """
    C{count} more listening sockets in the C{SO_REUSEPORT} group of the
    listening socket C{sock} (on its address and port).

    @raise OSError: they cannot be bound (C{sock} has no C{SO_REUSEPORT},
        or was bound by another user); none is left open.
    """
    address, port = sock.getsockname()[:2]
    group: list[_socket.socket] = []
    try:
        for _ in range(count):
            group.append(_bind_one(sock.family, address, port, _socket.SOCK_STREAM,
                                   reuseport=True))
    except BaseException:
        for s in group:
            s.close()
        raise
    return group


def bind_sockets(bind: str, port: int, kind: int = _socket.SOCK_STREAM,
                 count: int = 1) -> list[_socket.socket]:
    """
    Listening sockets on C{port} (0: a free one) at C{bind}, or at C{::}
    (dual-stack) and C{0.0.0.0} where the first does not already take IPv4:
    C{count} TCP sockets per address, in one C{SO_REUSEPORT} group (see
    L{_bind_group}), the groups one after the other.

    @raise OSError: the last error when no socket could be bound.
    """
    if bind:
        address = bind.strip("[]")
        family = _socket.AF_INET6 if ":" in address else _socket.AF_INET
        return _bind_group(family, address, port, kind, count)
    out: list[_socket.socket] = []
    error: OSError | None = None
    candidates = ([(_socket.AF_INET6, "::")] if _socket.has_ipv6 else []) + [
        (_socket.AF_INET, "0.0.0.0")]
    for family, address in candidates:
        try:
            group = _bind_group(family, address, port, kind, count)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and out:
                continue  # the dual-stack socket has IPv4 too
            error = e
            continue
        out += group
        if port == 0:
            port = group[0].getsockname()[1]
    if not out:
        assert error is not None
        raise error
    return out


def local_address(fd: int) -> Any:
    """
    C{(family, address)} of socket C{fd}, or C{None} when it is not one.
    """
    try:
        sock = _socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return int(sock.family), sock.getsockname()
    except OSError:
        return None
    finally:
        sock.close()


def socket_owners(sockets: Sequence[tuple[int, int]], workers: int,
                  address_of: Callable[[int], Any] = local_address) -> list[int]:
    """
    The worker slot owning each of the listening C{sockets} (C{(fd,
    family)}, in order), C{-1} for one shared by all: the sockets on one
    address are a group, and a group of at least C{workers} sockets gives
    its C{i}th to slot C{i % workers} (a slot may own several, after an
    upgrade to fewer workers); a smaller one (one inherited socket) is
    shared.
    """
    keys = [address_of(fd) for fd, _family in sockets]
    keys = [(i,) if k is None else k for i, k in enumerate(keys)]
    sizes: dict[Any, int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    seen: dict[Any, int] = {}
    out = []
    for k in keys:
        i = seen.get(k, 0)
        seen[k] = i + 1
        out.append(i % workers if workers > 0 and sizes[k] >= workers else -1)
    return out
