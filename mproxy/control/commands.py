"""
The control protocol: AMP over a UNIX socket.  One L{Command} per operation,
each declaring the domain errors it can raise, and a L{Hello} version
handshake that every client sends first.

A deploy request travels as one declared argument (L{DeployRequestArgument}):
the JSON of L{mproxy.spec.DeployRequest}, the state file's format for its
options, spread over as many AMP values as it needs.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from mproxy.errors import (
    CertificateError,
    DeployCancelled,
    DeployTimedOut,
    ErrorPagesError,
    HostConflict,
    InvalidOptions,
    InvalidTarget,
    RolloutNotSet,
    ServiceNotFound,
    StateError,
    UpgradeError,
    UpgradeInProgress,
)

PROTOCOL_VERSION = 1


class VersionMismatch(Exception):
    pass


class HelloRequired(Exception):
    pass


ERRORS: dict[type[BaseException], bytes] = {
    InvalidOptions: b"INVALID_OPTIONS",
    InvalidTarget: b"INVALID_TARGET",
    ServiceNotFound: b"SERVICE_NOT_FOUND",
    HostConflict: b"HOST_CONFLICT",
    DeployTimedOut: b"DEPLOY_TIMED_OUT",
    DeployCancelled: b"DEPLOY_CANCELLED",
    RolloutNotSet: b"ROLLOUT_NOT_SET",
    CertificateError: b"CERTIFICATE_ERROR",
    ErrorPagesError: b"ERROR_PAGES_ERROR",
    HelloRequired: b"HELLO_REQUIRED",
    StateError: b"STATE_ERROR",
    UpgradeError: b"UPGRADE_ERROR",
    UpgradeInProgress: b"UPGRADE_IN_PROGRESS",
}


class BigUnicode(amp.Argument):
    """
    Text of any length.  AMP limits each value to 64 KiB (and L{amp.ListOf}
    packs a whole list into one value), so the UTF-8 bytes are spread over
    several keys: C{name} holds the number of pieces, C{name.0},
    C{name.1}, ... the pieces.
    """

    CHUNK = 60 * 1024

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        data = self.retrieve(objects, name.decode("ascii"), proto).encode("utf-8")
        pieces = [data[i : i + self.CHUNK] for i in range(0, len(data), self.CHUNK)]
        strings[name] = str(len(pieces)).encode("ascii")
        for i, piece in enumerate(pieces):
            strings[name + b"." + str(i).encode("ascii")] = piece

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        count = int(strings[name])
        data = b"".join(strings[name + b"." + str(i).encode("ascii")] for i in range(count))
        objects[name.decode("ascii")] = data.decode("utf-8")


class DeployRequestArgument(BigUnicode):
    """
    A L{DeployRequest}.  One that does not decode is refused as
    L{InvalidOptions} (C{malformed deploy request: ...}), like any other
    invalid request, and the connection stays up.
    """

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        from mproxy.spec import to_json

        # AMP hands each argument a copy of the caller's keywords.
        key = name.decode("ascii")
        objects[key] = json.dumps(to_json(objects[key]))
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        from mproxy.spec import DeployRequest, from_json

        key = name.decode("ascii")
        try:
            super().fromBox(name, strings, objects, proto)
            objects[key] = from_json(DeployRequest, json.loads(objects[key]))
        except (KeyError, ValueError, TypeError) as e:
            raise amp.RemoteAmpError(
                ERRORS[InvalidOptions], f"malformed deploy request: {e}"
            )


class Hello(amp.Command):
    """
    Exchange protocol versions.  Must be the first command on a connection.
    """

    arguments = [(b"version", amp.Integer())]
    response = [(b"version", amp.Integer()), (b"server", amp.Unicode())]
    errors = {VersionMismatch: b"VERSION_MISMATCH"}


class Deploy(amp.Command):
    """
    Deploy targets to a service; answers when traffic is switched and the old
    targets have drained, with the targets now serving and how many requests
    the drain waited for and cut at its deadline.
    """

    arguments = [(b"request", DeployRequestArgument())]
    response = [
        (b"targets", amp.ListOf(amp.Unicode())),
        (b"drained", amp.Integer(optional=True)),
        (b"cut", amp.Integer(optional=True)),
    ]
    errors = ERRORS


class Progress(amp.Command):
    """
    Sent by the server to the client during a long command (deploy, pause,
    stop): one phase of the operation.
    """

    arguments = [(b"phase", amp.Unicode()), (b"detail", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = False


class Remove(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class Pause(amp.Command):
    """
    Hold the service's new requests; answers when its requests in flight have
    drained.  Durations left out take the defaults of L{mproxy.spec}.
    """

    arguments = [
        (b"service", amp.Unicode()),
        (b"drain_timeout", amp.Float(optional=True)),
        (b"max_pause", amp.Float(optional=True)),
    ]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class Stop(amp.Command):
    """
    Answer the service's requests with a 503 page; answers when its requests
    in flight have drained.
    """

    arguments = [
        (b"service", amp.Unicode()),
        (b"drain_timeout", amp.Float(optional=True)),
        (b"message", amp.Unicode(optional=True)),
    ]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class Resume(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class RolloutDeploy(amp.Command):
    """
    Deploy targets to the service's rollout slot; no traffic moves until
    L{RolloutSet}.  Answers like L{Deploy}.
    """

    arguments = [
        (b"service", amp.Unicode()),
        (b"targets", amp.ListOf(amp.Unicode())),
        (b"readers", amp.ListOf(amp.Unicode(), optional=True)),
        (b"deploy_timeout", amp.Float(optional=True)),
        (b"drain_timeout", amp.Float(optional=True)),
    ]
    response = Deploy.response
    errors = ERRORS


class RolloutSet(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"percentage", amp.Integer()),
        (b"allowlist", amp.ListOf(amp.Unicode())),
    ]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class RolloutStop(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class List(amp.Command):
    """
    Every service, as JSON text (a list of objects), of any length.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"services", BigUnicode())]
    errors = ERRORS


class Upgrade(amp.Command):
    """
    Replace the running server by the code installed now (see
    L{mproxy.upgrade}), the upgrade named C{id} by the client.  Answered
    only with an error (nothing changed); otherwise the connection closes
    as the server re-executes itself, and the client asks the new server
    with L{UpgradeStatus}.
    """

    arguments = [(b"id", amp.Unicode()), (b"drain_timeout", amp.Float(optional=True))]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = ERRORS


class UpgradeStatus(amp.Command):
    """
    Answers once upgrade C{id} is done, with the server's PID; fails with
    C{UPGRADE_ERROR} when the server running did not start from it.
    """

    arguments = [(b"id", amp.Unicode())]
    response = [(b"pid", amp.Integer()), (b"server", amp.Unicode())]
    errors = ERRORS


#: Every command a client may send, by wire name.
CLIENT_COMMANDS: dict[bytes, type[amp.Command]] = {
    cmd.commandName: cmd  # type: ignore[misc]
    for cmd in (Hello, Deploy, Remove, Pause, Stop, Resume, RolloutDeploy, RolloutSet,
                RolloutStop, List, Upgrade, UpgradeStatus)
}
