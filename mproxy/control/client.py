"""
The client side of the control protocol, used by the C{mproxy} commands.

Nothing here waits forever: connecting, the version handshake and every
answer have a time limit (L{ANSWER_TIMEOUT}), except the answers of the
commands that wait for health checks and drains (L{WAITING}); those end when
the server answers or goes away.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet.defer import TimeoutError, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from mproxy.control import commands as c
from mproxy.controlsocket import check_server_peer, check_server_socket
from mproxy.errors import MproxyError
from mproxy.spec import DeployRequest


#: Seconds to connect, to exchange versions, and for each prompt answer.
ANSWER_TIMEOUT = 5.0

#: Commands whose answer waits for health checks or drains.
WAITING = frozenset([c.Deploy, c.RolloutDeploy, c.Pause, c.Stop, c.Upgrade, c.UpgradeStatus])


class ServerUnavailable(MproxyError):
    pass


class NoAnswer(MproxyError):
    """
    The server accepted the connection but did not answer in time.
    """


class ClientProtocol(amp.AMP):
    def __init__(self, on_progress: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.on_progress = on_progress

    @c.Progress.responder
    def progress(self, phase: str, detail: str) -> dict[str, Any]:
        if self.on_progress is not None:
            self.on_progress(phase, detail)
        return {}


class ControlClient:
    """
    A connected, greeted client.  Use L{connect}.
    """

    def __init__(self, protocol: ClientProtocol, clock: IReactorTime, path: str) -> None:
        self.protocol = protocol
        self.clock = clock
        self.path = path

    @inlineCallbacks
    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        """
        Call C{command}; unless it is one of L{WAITING}, fail with
        L{NoAnswer} when no answer comes within L{ANSWER_TIMEOUT}.
        """
        d = self.protocol.callRemote(command, **kw)
        if command not in WAITING:
            d.addTimeout(ANSWER_TIMEOUT, self.clock)
        try:
            return (yield d)
        except TimeoutError:
            self.close()
            raise NoAnswer(_no_answer(self.path))

    @inlineCallbacks
    def deploy(self, req: DeployRequest) -> Any:
        """
        Deploy; fires with the answer (C{targets}, C{drained}, C{cut}).
        """
        return (yield self.call(c.Deploy, request=req))

    @inlineCallbacks
    def list_services(self) -> Any:
        r = yield self.call(c.List)
        return json.loads(r["services"] or "[]")

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()


def _no_answer(path: str) -> str:
    return (
        f"mproxy at {path} did not answer within {ANSWER_TIMEOUT:g}s "
        "(is it an mproxy control socket? is the server stuck?)"
    )


def _connect_reason(e: ConnectError) -> str:
    """
    The OS reason of a failed connect.  Twisted's connect errors carry the
    errno as an C{int} in C{osError} and the text in C{args}.
    """
    os_error = getattr(e, "osError", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    if isinstance(os_error, int):
        try:
            return os.strerror(os_error)
        except ValueError:
            pass
    return str(e) or e.__class__.__name__


#: The longest path a UNIX socket address holds (C{sun_path} is 108 bytes
#: with the terminating NUL on Linux).
MAX_SOCKET_PATH = 107


def _check_path_length(path: str) -> None:
    """
    @raise MproxyError: when C{path} cannot be a UNIX socket address (the
        connect would otherwise fail only at its timeout).
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise MproxyError(
            f"control socket path {path} is too long for a UNIX socket "
            f"({size} bytes, at most {MAX_SOCKET_PATH})"
        )


def _check_peer(path: str, protocol: ClientProtocol) -> None:
    """
    Refuse a server process that runs as another user (not us, not root).
    """
    try:
        check_server_peer(path, protocol.transport)
    except MproxyError:
        protocol.transport.abortConnection()
        raise


@inlineCallbacks
def connect(
    reactor: Any, path: str, on_progress: Callable[[str, str], None] | None = None
) -> Any:
    """
    Connect to the server's control socket and exchange versions.

    @raise ServerUnavailable: when nothing answers on C{path}.
    """
    _check_path_length(path)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=int(ANSWER_TIMEOUT))
    check_server_socket(path)
    try:
        protocol = yield connectProtocol(endpoint, ClientProtocol(on_progress))
    except ConnectError as e:
        reason = _connect_reason(e)
        raise ServerUnavailable(
            f"cannot connect to mproxy at {path}: {reason} "
            "(is `mproxy run` running? use --socket or MPROXY_SOCKET to choose the socket)"
        )
    _check_peer(path, protocol)
    client = ControlClient(protocol, reactor, path)
    try:
        yield client.call(c.Hello, version=c.PROTOCOL_VERSION)
    except c.VersionMismatch as e:
        client.close()
        raise MproxyError(str(e))
    return client
