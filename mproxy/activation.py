"""
Listening sockets handed to mproxy when it starts (systemd socket activation):
which are there, and what each serves.

systemd passes them as file descriptors 3, 4, ... with C{LISTEN_FDS} (how
many), C{LISTEN_PID} (the process they are for) and C{LISTEN_FDNAMES} (their
C{FileDescriptorName=}, colon-separated).  mproxy serves a socket named
C{http}, C{https} or C{metrics} as that listener instead of binding the port
itself; a kind with no socket is bound from its options as usual.  Several
sockets may share a name (an IPv4 and an IPv6 one).

L{inherited_sockets} reads (and removes) the variables and checks every
descriptor is a listening TCP socket, so a wrong unit file stops start-up
with a message saying what to fix.
"""

from __future__ import annotations

import fcntl
import os
import socket as _socket
from typing import Any, Callable, MutableMapping

from attrs import frozen

from mproxy.listeners import StartupError

#: What an inherited socket may serve, by its name.
KINDS = ("http", "https", "metrics")

#: The first inherited descriptor.
FIRST_FD = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@frozen
class InheritedSocket:
    """
    One inherited listening socket.
    """

    fd: int
    family: int  # socket.AF_INET or socket.AF_INET6
    port: int


@frozen
class InheritedSockets:
    """
    The inherited sockets by kind (C{http}, C{https}, C{metrics}).
    """

    by_kind: dict[str, tuple[InheritedSocket, ...]]

    def get(self, kind: str) -> tuple[InheritedSocket, ...]:
        return self.by_kind.get(kind, ())

    def port(self, kind: str) -> int | None:
        """
        The port the sockets of C{kind} listen on (that of the first).
        """
        sockets = self.get(kind)
        return sockets[0].port if sockets else None


def describe_socket(fd: int) -> InheritedSocket:
    """
    Look at descriptor C{fd} (without taking it over).

    @raise StartupError: it is not a listening TCP socket.
    """
    try:
        s = _socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise StartupError(f"inherited file descriptor {fd} is not a socket: {e.strerror or e}")
    try:
        if s.family not in (_socket.AF_INET, _socket.AF_INET6) or s.type != _socket.SOCK_STREAM:
            raise StartupError(
                f"inherited file descriptor {fd} is not a TCP socket "
                "(ListenStream= with an address or port)"
            )
        if not s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
            raise StartupError(f"inherited file descriptor {fd} is not listening")
        return InheritedSocket(fd, int(s.family), int(s.getsockname()[1]))
    finally:
        s.close()


def set_close_on_exec(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def startup_environment() -> dict[str, str]:
    """
    The socket-activation variables this process started with (once: a
    second call finds none), taken out of the process environment too.
    """
    import mproxy

    found = dict(mproxy._startup_listen_env)
    mproxy._startup_listen_env.clear()
    for name in _VARIABLES:
        os.environ.pop(name, None)
    return found


def inherited_sockets(
    environ: MutableMapping[str, str],
    getpid: Callable[[], int] = os.getpid,
    describe: Callable[[int], InheritedSocket] = describe_socket,
    keep_from_children: Callable[[int], Any] = set_close_on_exec,
    first_fd: int = FIRST_FD,
) -> InheritedSockets | None:
    """
    The sockets passed to this process, or C{None} when none were.  The
    variables are removed from C{environ} (so a process started later does
    not take them for its own), and the descriptors are not inherited by
    processes started later unless handed over explicitly.

    @raise StartupError: the variables do not make sense, a socket has a
        name that is not a kind mproxy serves, or a descriptor is not a
        listening TCP socket.
    """
    if "LISTEN_FDS" not in environ:
        return None
    values = {name: environ.pop(name, None) for name in _VARIABLES}
    pid, count_text, names_text = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if pid is None or pid.strip() != str(getpid()):
        return None  # meant for another process (the one that started us)
    try:
        count = int(count_text or "")
    except ValueError:
        raise StartupError(f"LISTEN_FDS={count_text!r} is not a number of sockets")
    if count <= 0:
        return None
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        raise StartupError(
            f"{count} inherited socket(s) but LISTEN_FDNAMES names {len(names)}: name each "
            "socket FileDescriptorName=http, https or metrics in its .socket unit"
        )
    by_kind: dict[str, list[InheritedSocket]] = {}
    for offset, name in enumerate(names):
        fd = first_fd + offset
        if name not in KINDS:
            raise StartupError(
                f"inherited socket {fd} is named {name!r}: name each socket "
                "FileDescriptorName=http, https or metrics in its .socket unit"
            )
        inherited = describe(fd)
        keep_from_children(fd)
        by_kind.setdefault(name, []).append(inherited)
    return InheritedSockets({k: tuple(v) for k, v in by_kind.items()})
