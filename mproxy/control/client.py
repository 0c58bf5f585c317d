"""
The client side of the control protocol, used by the C{mproxy} commands.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols import amp

from mproxy.control import commands as c
from mproxy.controlsocket import check_server_peer, check_server_socket
from mproxy.errors import MproxyError
from mproxy.spec import DeployRequest, to_json


class ServerUnavailable(MproxyError):
    pass


class ClientProtocol(amp.AMP):
    def __init__(self, on_progress: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.on_progress = on_progress

    @c.Progress.responder
    def progress(self, phase: str, detail: str) -> dict[str, Any]:
        if self.on_progress is not None:
            self.on_progress(phase, detail)
        return {}


def deploy_request_to_json(req: DeployRequest) -> str:
    return json.dumps(
        {
            "service": req.service,
            "targets": list(req.targets),
            "readers": list(req.readers),
            "options": to_json(req.options),
            "target_options": to_json(req.target_options),
            "deploy_timeout": req.deploy_timeout,
            "drain_timeout": req.drain_timeout,
            "force": req.force,
        }
    )


class ControlClient:
    """
    A connected, greeted client.  Use L{connect}.
    """

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        return self.protocol.callRemote(command, **kw)

    @inlineCallbacks
    def deploy(self, req: DeployRequest) -> Any:
        r = yield self.call(c.Deploy, request=deploy_request_to_json(req))
        return r["targets"]

    @inlineCallbacks
    def list_services(self) -> Any:
        r = yield self.call(c.List)
        return json.loads(r["services"] or "[]")

    def close(self) -> None:
        self.protocol.transport.loseConnection()


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
    endpoint = UNIXClientEndpoint(reactor, path, timeout=10)
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
    try:
        yield protocol.callRemote(c.Hello, version=c.PROTOCOL_VERSION)
    except c.VersionMismatch as e:
        protocol.transport.loseConnection()
        raise MproxyError(str(e))
    return ControlClient(protocol)
