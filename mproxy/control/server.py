"""
The server side of the control protocol: one L{ControlProtocol} per client
connection, answering each command through the L{Controller}.

A deploy belongs to its connection: when the client goes away before the
switch (Ctrl-C, a dropped SSH session), the deploy is cancelled.

While an upgrade is about to re-execute the server, every command but the
upgrade's own is refused with C{UPGRADE_IN_PROGRESS} (nothing is done), and
the upgrade waits for the commands in progress to be answered
(L{mproxy.upgrade.Upgrades.admit}).

Bad input (garbage bytes, a box that is no command, a command with missing
or malformed arguments, an unknown command) is logged in one line and
answered or dropped; it never reaches the log as a traceback.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

import mproxy
from mproxy.control import commands as c
from mproxy.controller import Controller
from mproxy.deploy import DeployResult
from mproxy.errors import DeployCancelled
from mproxy.logging import JSONLogger
from mproxy.spec import DeployRequest, given, validate_drain
from mproxy.upgrade import DEFAULT_DRAIN_TIMEOUT, UpgradeError, UpgradeInProgress

#: The commands an upgrade neither waits for nor refuses.
_UPGRADE_COMMANDS = frozenset([c.Hello.commandName, c.Upgrade.commandName,
                               c.UpgradeStatus.commandName])


def _command_words(name: str, arguments: dict[str, Any]) -> str:
    """
    How a user names a command: C{RolloutDeploy} of service web is
    C{rollout deploy web}.
    """
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
    service = arguments.get("service") or getattr(arguments.get("request"), "service", None)
    return f"{words} {service}" if service else words


def _answer(result: DeployResult) -> dict[str, Any]:
    return {
        "targets": list(result.targets),
        "drained": result.drained.requests,
        "cut": result.drained.cut,
    }


def _cancelled(f: Failure) -> None:
    f.trap(CancelledError)
    raise DeployCancelled(
        "deploy cancelled before the switch: the old targets keep serving"
    )


class ControlProtocol(amp.AMP):
    def __init__(
        self, controller: Controller, logger: JSONLogger, upgrades: Any = None
    ) -> None:
        super().__init__()
        self.controller = controller
        self.logger = logger
        self.upgrades = upgrades
        self.greeted = False
        self._closed = False
        self._deploys: set[Deferred[Any]] = set()

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        deploys, self._deploys = self._deploys, set()
        if deploys:
            self.logger.info("Control client went away during a deploy: cancelling it")
        for d in deploys:
            d.cancel()
        super().connectionLost(reason)

    def _owned(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Tie a deploy to this connection (see L{connectionLost}).
        """
        self._deploys.add(d)

        def done(result: Any) -> Any:
            self._deploys.discard(d)
            return result

        return d.addBoth(done).addErrback(_cancelled).addCallback(_answer)

    def _bad_input(self, what: str, error: str) -> None:
        self.logger.warn("Bad control input", what=what, error=error)

    def locateResponder(self, name: bytes) -> Any:
        """
        The responder for command C{name}, checking its arguments first: a
        command whose arguments do not parse is answered with
        C{BAD_ARGUMENTS} (or its declared error) and logged in one line.
        """
        responder = super().locateResponder(name)
        command = c.CLIENT_COMMANDS.get(name)
        if responder is None or command is None:
            self._bad_input("unknown command", repr(name)[:80])
            return responder
        label = name.decode("ascii", "replace")

        def checked(box: amp.AmpBox) -> Any:
            try:
                arguments = command.parseArguments(box, self)
            except amp.RemoteAmpError as e:
                self._bad_input(label, str(e.description))
                raise
            except Exception as e:
                reason = f"{e.__class__.__name__}: {e}"
                self._bad_input(label, reason)
                raise amp.RemoteAmpError(b"BAD_ARGUMENTS", f"malformed {label}: {reason}")
            if self.upgrades is None or name in _UPGRADE_COMMANDS:
                return responder(box)
            try:
                done = self.upgrades.admit(_command_words(label, arguments))
            except UpgradeInProgress as e:
                raise amp.RemoteAmpError(c.ERRORS[UpgradeInProgress], str(e))
            d = maybeDeferred(responder, box)
            return d.addBoth(lambda result: (done(), result)[1])

        return checked

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        try:
            super().ampBoxReceived(box)
        except amp.NoEmptyBoxes:
            self._bad_input("box without a command", repr(dict(box))[:80])
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._bad_input("not AMP", f"a {length}-byte key or value")
        super().lengthLimitExceeded(length)

    def _require_hello(self) -> None:
        if not self.greeted:
            raise c.HelloRequired("the client must send Hello first")

    def _progress(self, phase: str, detail: str) -> None:
        if self._closed:
            return
        try:
            self.callRemote(c.Progress, phase=phase, detail=detail)
        except Exception:
            pass

    @c.Hello.responder
    def hello(self, version: int) -> dict[str, Any]:
        if version != c.PROTOCOL_VERSION:
            raise c.VersionMismatch(
                f"client speaks control protocol {version}, server speaks "
                f"{c.PROTOCOL_VERSION} (mproxy {mproxy.__version__})"
            )
        self.greeted = True
        return {"version": c.PROTOCOL_VERSION, "server": mproxy.__version__}

    @c.Deploy.responder
    def deploy(self, request: DeployRequest) -> Any:
        self._require_hello()
        return self._owned(self.controller.deploy(request, self._progress))

    @c.Remove.responder
    def remove(self, service: str) -> Any:
        self._require_hello()
        # answered once every worker serves the change
        return self.controller.remove(service).addCallback(lambda _: {})

    @c.Pause.responder
    def pause(
        self, service: str, drain_timeout: float | None, max_pause: float | None
    ) -> Any:
        self._require_hello()
        d = self.controller.pause(
            service, progress=self._progress,
            **given(drain_timeout=drain_timeout, max_pause=max_pause),
        )
        return d.addCallback(lambda _: {})

    @c.Stop.responder
    def stop(self, service: str, drain_timeout: float | None, message: str | None) -> Any:
        self._require_hello()
        d = self.controller.stop(
            service, progress=self._progress,
            **given(drain_timeout=drain_timeout, message=message),
        )
        return d.addCallback(lambda _: {})

    @c.Resume.responder
    def resume(self, service: str) -> Any:
        self._require_hello()
        return self.controller.resume(service).addCallback(lambda _: {})

    @c.RolloutDeploy.responder
    def rollout_deploy(
        self,
        service: str,
        targets: list[str],
        readers: list[str] | None,
        deploy_timeout: float | None,
        drain_timeout: float | None,
    ) -> Any:
        self._require_hello()
        d = self.controller.rollout_deploy(
            service, tuple(targets), tuple(readers or ()), progress=self._progress,
            **given(deploy_timeout=deploy_timeout, drain_timeout=drain_timeout),
        )
        return self._owned(d)

    @c.RolloutSet.responder
    def rollout_set(self, service: str, percentage: int, allowlist: list[str]) -> Any:
        self._require_hello()
        d = self.controller.rollout_set(service, percentage, tuple(allowlist))
        return d.addCallback(lambda _: {})

    @c.RolloutStop.responder
    def rollout_stop(self, service: str) -> Any:
        self._require_hello()
        return self.controller.rollout_stop(service).addCallback(lambda _: {})

    @c.List.responder
    def list_services(self) -> dict[str, Any]:
        self._require_hello()
        # the requests in flight in worker processes are asked for first
        d = self.controller.refresh()
        return d.addCallback(lambda _: {"services": json.dumps(self.controller.list())})

    def _upgrades(self) -> Any:
        if self.upgrades is None:
            raise UpgradeError("this server cannot be upgraded in place")
        return self.upgrades

    @c.Upgrade.responder
    def upgrade(self, id: str, drain_timeout: float | None) -> Any:
        self._require_hello()
        timeout = DEFAULT_DRAIN_TIMEOUT if drain_timeout is None else drain_timeout
        validate_drain(timeout)
        return self._upgrades().upgrade(id, timeout, self._progress).addCallback(lambda _: {})

    @c.UpgradeStatus.responder
    def upgrade_status(self, id: str) -> Any:
        self._require_hello()
        d = self._upgrades().outcome(id, self._progress)
        return d.addCallback(lambda done: {"pid": done["pid"], "server": mproxy.__version__})


class ControlFactory(Factory):
    def __init__(self, controller: Controller, logger: JSONLogger, upgrades: Any = None) -> None:
        self.controller = controller
        self.logger = logger
        self.upgrades = upgrades

    def buildProtocol(self, addr: object) -> ControlProtocol:
        p = ControlProtocol(self.controller, self.logger, self.upgrades)
        p.factory = self
        return p
