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

A server that re-executes itself for an upgrade (L{mproxy.upgrade}) hands
its sockets to the new image the same way, in one variable,
C{MPROXY_UPGRADE} (a L{Handover}): the listening sockets by kind (also the
UDP socket of HTTP/3, kind C{http3}), the control socket, and what the new
image needs to finish the upgrade.  L{upgrade_sockets} reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket as _socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator, MutableMapping

from attrs import field, frozen

from mproxy.listeners import StartupError

#: What an inherited socket may serve, by its name.
KINDS = ("http", "https", "metrics")

#: The first inherited descriptor.
FIRST_FD = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: The variable an upgrading server passes its sockets in.
UPGRADE_VARIABLE = "MPROXY_UPGRADE"

#: What a handed-over socket may serve: the TCP kinds, and HTTP/3's UDP.
HANDOVER_KINDS = (*KINDS, "http3")


@frozen
class InheritedSocket:
    """
    One inherited listening socket.
    """

    fd: int
    family: int  # socket.AF_INET or socket.AF_INET6
    port: int


@frozen
class Handover:
    """
    What an upgrading server passes to the image it executes.

    @ivar pid: the process (the same before and after the exec).
    @ivar id: the upgrade's name, by which the client asks for its outcome.
    @ivar sockets: (kind, descriptor) of every listening socket.
    @ivar control: the control socket's listening descriptor, or C{None}.
    @ivar drain_timeout: how long the old generation may drain.
    @ivar channels: the worker channels kept across the exec, as the
        worker pool describes them (plain JSON values).
    @ivar activated: the kinds whose sockets came from socket activation,
        in this image or one before it: the workers share them, and no
        socket of this process's own is added beside them (it would not
        outlive the process as systemd's do).
    """

    pid: int
    id: str
    sockets: tuple[tuple[str, int], ...]
    control: int | None = None
    drain_timeout: float = 10.0
    channels: tuple[Any, ...] = ()
    activated: tuple[str, ...] = ()

    def to_text(self) -> str:
        return json.dumps({
            "pid": self.pid, "id": self.id, "sockets": [list(s) for s in self.sockets],
            "control": self.control, "drain_timeout": self.drain_timeout,
            "channels": list(self.channels), "activated": list(self.activated),
        })

    @classmethod
    def from_text(cls, text: str) -> Handover:
        """
        @raise StartupError: the text is not a handover.
        """
        try:
            data = json.loads(text)
            sockets = tuple((str(kind), int(fd)) for kind, fd in data["sockets"])
            control = data.get("control")
            return cls(
                int(data["pid"]), str(data["id"]), sockets,
                None if control is None else int(control),
                float(data.get("drain_timeout", 10.0)), tuple(data.get("channels") or ()),
                tuple(str(kind) for kind in data.get("activated") or ()),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise StartupError(f"${UPGRADE_VARIABLE} is not a socket handover: {e}")


@frozen
class InheritedSockets:
    """
    The inherited sockets by kind (C{http}, C{https}, C{metrics}, and after
    an upgrade C{http3}); after an upgrade also the control socket and the
    L{Handover} itself.
    """

    by_kind: dict[str, tuple[InheritedSocket, ...]]
    control: int | None = None
    handover: Handover | None = field(default=None, eq=False)

    def get(self, kind: str) -> tuple[InheritedSocket, ...]:
        return self.by_kind.get(kind, ())

    def port(self, kind: str) -> int | None:
        """
        The port the sockets of C{kind} listen on (that of the first).
        """
        sockets = self.get(kind)
        return sockets[0].port if sockets else None


@contextmanager
def _peek(fd: int) -> Iterator[_socket.socket]:
    """
    A socket object over a duplicate of C{fd}, closed afterwards (C{fd}
    itself is left as it is).

    @raise StartupError: C{fd} is not a socket.
    """
    try:
        s = _socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise StartupError(f"inherited file descriptor {fd} is not a socket: {e.strerror or e}")
    try:
        yield s
    finally:
        s.close()


def describe_socket(fd: int) -> InheritedSocket:
    """
    Look at descriptor C{fd} (without taking it over).

    @raise StartupError: it is not a listening TCP socket.
    """
    with _peek(fd) as s:
        if s.family not in (_socket.AF_INET, _socket.AF_INET6) or s.type != _socket.SOCK_STREAM:
            raise StartupError(
                f"inherited file descriptor {fd} is not a TCP socket "
                "(ListenStream= with an address or port)"
            )
        if not s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
            raise StartupError(f"inherited file descriptor {fd} is not listening")
        return InheritedSocket(fd, int(s.family), int(s.getsockname()[1]))


def describe_datagram_socket(fd: int) -> InheritedSocket:
    """
    Look at descriptor C{fd}, which must be a bound UDP socket.

    @raise StartupError: it is not one.
    """
    with _peek(fd) as s:
        if s.family not in (_socket.AF_INET, _socket.AF_INET6) or s.type != _socket.SOCK_DGRAM:
            raise StartupError(f"inherited file descriptor {fd} is not a UDP socket")
        return InheritedSocket(fd, int(s.family), int(s.getsockname()[1]))


def describe_control_socket(fd: int) -> str:
    """
    The path descriptor C{fd}, a listening UNIX socket, is bound to.

    @raise StartupError: it is not one.
    """
    with _peek(fd) as s:
        if s.family != _socket.AF_UNIX or not s.getsockopt(
            _socket.SOL_SOCKET, _socket.SO_ACCEPTCONN
        ):
            raise StartupError(f"inherited file descriptor {fd} is not a listening UNIX socket")
        name = s.getsockname()
        return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


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
    for name in (*_VARIABLES, UPGRADE_VARIABLE):
        os.environ.pop(name, None)
    return found


def upgrade_sockets(
    environ: MutableMapping[str, str],
    getpid: Callable[[], int] = os.getpid,
    describe: Callable[[int], InheritedSocket] = describe_socket,
    describe_datagram: Callable[[int], InheritedSocket] = describe_datagram_socket,
    describe_control: Callable[[int], str] = describe_control_socket,
    keep_from_children: Callable[[int], Any] = set_close_on_exec,
) -> InheritedSockets | None:
    """
    The sockets an upgrading server handed to this image, or C{None} when it
    is not one (no variable, or one meant for another process).  The
    variable is removed from C{environ}, and the descriptors are kept from
    processes started later.

    @raise StartupError: the handover does not make sense, or a descriptor
        is not the kind of socket it is said to be.
    """
    text = environ.pop(UPGRADE_VARIABLE, None)
    if text is None:
        return None
    handover = Handover.from_text(text)
    if handover.pid != getpid():
        return None
    by_kind: dict[str, list[InheritedSocket]] = {}
    for kind, fd in handover.sockets:
        if kind not in HANDOVER_KINDS:
            raise StartupError(f"handed-over socket {fd} is of unknown kind {kind!r}")
        inherited = describe_datagram(fd) if kind == "http3" else describe(fd)
        keep_from_children(fd)
        by_kind.setdefault(kind, []).append(inherited)
    if handover.control is not None:
        describe_control(handover.control)
        keep_from_children(handover.control)
    return InheritedSockets(
        {k: tuple(v) for k, v in by_kind.items()}, handover.control, handover
    )


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
