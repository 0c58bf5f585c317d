"""
The server side of the control protocol: one L{ControlProtocol} per client
connection, answering each command through the L{Controller}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

import mproxy
from mproxy.control import commands as c
from mproxy.controller import Controller
from mproxy.errors import InvalidOptions
from mproxy.logging import JSONLogger
from mproxy.spec import DeployRequest, from_json


def deploy_request_from_json(text: str) -> DeployRequest:
    """
    Decode the C{request} argument of L{c.Deploy}.

    @raise InvalidOptions: when it is not a valid request.
    """
    try:
        return from_json(DeployRequest, json.loads(text))
    except (ValueError, TypeError) as e:
        raise InvalidOptions(f"malformed deploy request: {e}")


def _given(**values: Any) -> dict[str, Any]:
    """
    The optional arguments the client sent; the others take the
    controller's defaults (those of L{mproxy.spec}).
    """
    return {k: v for k, v in values.items() if v is not None}


class ControlProtocol(amp.AMP):
    def __init__(self, controller: Controller, logger: JSONLogger) -> None:
        super().__init__()
        self.controller = controller
        self.logger = logger
        self.greeted = False
        self._closed = False

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        super().connectionLost(reason)

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
    def deploy(self, request: str) -> Any:
        self._require_hello()
        req = deploy_request_from_json(request)
        d = self.controller.deploy(req, self._progress)
        return d.addCallback(lambda targets: {"targets": targets})

    @c.Remove.responder
    def remove(self, service: str) -> dict[str, Any]:
        self._require_hello()
        self.controller.remove(service)
        return {}

    @c.Pause.responder
    def pause(
        self, service: str, drain_timeout: float | None, max_pause: float | None
    ) -> Any:
        self._require_hello()
        d = self.controller.pause(
            service, **_given(drain_timeout=drain_timeout, max_pause=max_pause)
        )
        return d.addCallback(lambda _: {})

    @c.Stop.responder
    def stop(self, service: str, drain_timeout: float | None, message: str | None) -> Any:
        self._require_hello()
        d = self.controller.stop(
            service, **_given(drain_timeout=drain_timeout, message=message)
        )
        return d.addCallback(lambda _: {})

    @c.Resume.responder
    def resume(self, service: str) -> dict[str, Any]:
        self._require_hello()
        self.controller.resume(service)
        return {}

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
            **_given(deploy_timeout=deploy_timeout, drain_timeout=drain_timeout),
        )
        return d.addCallback(lambda t: {"targets": t})

    @c.RolloutSet.responder
    def rollout_set(self, service: str, percentage: int, allowlist: list[str]) -> dict[str, Any]:
        self._require_hello()
        self.controller.rollout_set(service, percentage, tuple(allowlist))
        return {}

    @c.RolloutStop.responder
    def rollout_stop(self, service: str) -> dict[str, Any]:
        self._require_hello()
        self.controller.rollout_stop(service)
        return {}

    @c.List.responder
    def list_services(self) -> dict[str, Any]:
        self._require_hello()
        return {"services": json.dumps(self.controller.list())}


class ControlFactory(Factory):
    def __init__(self, controller: Controller, logger: JSONLogger) -> None:
        self.controller = controller
        self.logger = logger

    def buildProtocol(self, addr: object) -> ControlProtocol:
        p = ControlProtocol(self.controller, self.logger)
        p.factory = self
        return p
