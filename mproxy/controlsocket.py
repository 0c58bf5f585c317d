"""
The control socket's file: the service that listens on it, and the checks
that keep another local user from standing in for the server or the client.

The default path can be one every user may create (C{/tmp/mproxy.sock}).  So:

  - the server refuses to use or replace a socket file owned by another user
    (L{check_socket_free}), and accepts connections only from its own user or
    root (L{PeerCheckingFactory}, by the kernel's peer credentials);
  - a client refuses a socket file owned by anyone but itself or root, and a
    server process running as anyone else (L{check_server_socket},
    L{check_server_peer}).

Who we are, who owns a path and who is at the other end of a socket are
looked up through an injected L{Identity}, so tests can play another user.
"""

from __future__ import annotations

import os
import pwd
import socket as _socket
import stat
import struct
from typing import Any, Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import ISystemHandle
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from mproxy.errors import MproxyError
from mproxy.listeners import StartupError

#: The longest path a UNIX socket address holds (sun_path less its NUL).
MAX_SOCKET_PATH = 107


def peer_uid(sock: _socket.socket) -> int | None:
    """
    The user id of the process at the other end of a connected UNIX socket
    (for a client: the server that called listen), or C{None} where the
    platform does not say.
    """
    option = getattr(_socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def describe_user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@frozen
class Identity:
    """
    The lookups the ownership checks make.
    """

    euid: Callable[[], int] = os.geteuid
    lstat: Callable[[str], os.stat_result] = os.lstat
    peer_uid: Callable[[_socket.socket], int | None] = peer_uid
    describe: Callable[[int], str] = describe_user

    def trusted(self, uid: int) -> bool:
        """
        A user we may talk to: ourselves, or root.
        """
        return uid == self.euid() or uid == 0


REAL = Identity()


def check_socket_free(path: str, identity: Identity = REAL) -> None:
    """
    Before listening on C{path}: remove a stale control socket left by a dead
    server of ours; refuse to steal a live one, or to touch one that belongs
    to another user.

    @raise StartupError: when another server answers on C{path}, the path is
        something other than a socket, or another user owns it.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise StartupError(
            f"control socket path {path} is too long for a UNIX socket "
            f"({size} bytes, at most {MAX_SOCKET_PATH})"
        )
    try:
        st = identity.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != identity.euid():
        raise StartupError(
            f"control socket {path} belongs to {identity.describe(st.st_uid)}, not to "
            "the user running this server; refusing to use or replace it (choose "
            "another path with --socket or MPROXY_SOCKET)"
        )
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise StartupError(f"cannot check control socket {path}: {e.strerror or e}")
    finally:
        s.close()
    raise StartupError(f"another mproxy is already running on control socket {path}")


def _bound_path(fd: int) -> str:
    s = _socket.socket(fileno=os.dup(fd))
    try:
        name = s.getsockname()
    finally:
        s.close()
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)


class UntrustedSocket(MproxyError):
    """
    The control socket, or the server behind it, belongs to another user.
    """


def check_server_socket(path: str, identity: Identity = REAL) -> None:
    """
    Before a client connects: the file at C{path}, when there is one, must
    belong to us or root.  (A missing file is left to the connect to report.)

    @raise UntrustedSocket: naming the owner.
    """
    try:
        st = identity.lstat(path)
    except OSError:
        return
    if not identity.trusted(st.st_uid):
        raise UntrustedSocket(
            f"control socket {path} belongs to {identity.describe(st.st_uid)}, not to "
            "you or root; refusing to talk to it (another user may have created it "
            "first: remove it, or use --socket or MPROXY_SOCKET)"
        )


def transport_peer_uid(transport: Any, identity: Identity) -> int | None:
    """
    The peer's user id for a transport over a real socket; C{None} for
    in-memory transports, which have no peer process.
    """
    if not ISystemHandle.providedBy(transport):
        return None
    return identity.peer_uid(transport.getHandle())


def check_server_peer(path: str, transport: Any, identity: Identity = REAL) -> None:
    """
    After a client connected (on C{transport}): the server process must run
    as us or root.

    @raise UntrustedSocket: naming the user it runs as.
    """
    uid = transport_peer_uid(transport, identity)
    if uid is not None and not identity.trusted(uid):
        raise UntrustedSocket(
            f"the server on control socket {path} runs as {identity.describe(uid)}, "
            "not as you or root; refusing to talk to it"
        )


class _PeerChecking(ProtocolWrapper):
    def makeConnection(self, transport: Any) -> None:
        factory: PeerCheckingFactory = self.factory  # type: ignore[assignment]
        uid = transport_peer_uid(transport, factory.identity)
        if uid is not None and not factory.identity.trusted(uid):
            factory.logger.warn(
                "Refused a control connection from another user",
                user=factory.identity.describe(uid),
            )
            transport.abortConnection()
            return
        super().makeConnection(transport)


class PeerCheckingFactory(WrappingFactory):
    """
    Hands a control connection to C{factory}'s protocol only when the
    connecting process runs as the server's user or root.
    """

    protocol = _PeerChecking
    noisy = False

    def __init__(self, factory: Any, logger: Any, identity: Identity = REAL) -> None:
        super().__init__(factory)
        self.logger = logger
        self.identity = identity


class ControlSocketService(Service):
    """
    The control socket as a service of the tree: in C{startService} (after
    twistd dropped privileges, so the file belongs to the user the server
    runs as) it checks the path, creates the socket with mode 0600 and
    listens; stopping it waits until the port is closed, which removes the
    file.

    After an upgrade the socket is already listening: C{inherited} is its
    descriptor, handed over by the image before, and it is adopted as it is
    (the file stays where it was, and the clients that connected during the
    exec are answered) when it is bound to C{path}.  A descriptor bound
    elsewhere (the path changed) is closed and C{path} listened on as usual.
    """

    name = "control"

    def __init__(
        self, reactor: Any, path: str, factory: Any, logger: Any, identity: Identity = REAL,
        inherited: int | None = None,
        bound_path: Callable[[int], str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.factory = PeerCheckingFactory(factory, logger, identity)
        self.identity = identity
        self.logger = logger
        self.inherited = inherited
        self._bound_path = bound_path or _bound_path
        self._port: Any = None

    def fileno(self) -> int | None:
        """
        The listening socket's descriptor, or C{None} when not listening.
        """
        return None if self._port is None else self._port.fileno()

    def _adopt(self) -> bool:
        fd, self.inherited = self.inherited, None
        if fd is None:
            return False
        try:
            same = os.path.abspath(self._bound_path(fd)) == os.path.abspath(self.path)
        except OSError:
            same = False
        if not same:
            self.logger.info("Handed-over control socket is for another path: not used",
                             socket=self.path)
            os.close(fd)
            return False
        try:
            self._port = self.reactor.adoptStreamPort(fd, _socket.AF_UNIX, self.factory)
        finally:
            os.close(fd)  # the port listens on its own duplicate
        # adopting makes the file world-writable: the peer check still
        # applies, but keep it private as a bound one is
        os.chmod(self.path, 0o600)
        return True

    def startService(self) -> None:
        super().startService()
        if self._adopt():
            return
        check_socket_free(self.path, self.identity)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        outcome: list[Any] = []
        old_umask = os.umask(0o177)
        try:
            UNIXServerEndpoint(self.reactor, self.path, mode=0o600, wantPID=False).listen(
                self.factory
            ).addBoth(outcome.append)
        finally:
            os.umask(old_umask)
        if not outcome or isinstance(outcome[0], Failure):
            error = outcome[0].value if outcome else "did not complete at once"
            raise StartupError(f"cannot listen on control socket {self.path}: {error}")
        self._port = outcome[0]

    def abandon(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        d: Deferred[Any] = maybeDeferred(port.stopListening)
        d.addCallback(lambda _: None)
        return d
