"""
Tests for the AMP control protocol (L{mproxy.control}): the client and server
protocols connected in memory with L{twisted.test.iosim}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

import mproxy
from mproxy.control import commands as c
from mproxy.control.client import (
    ClientProtocol,
    ControlClient,
    NoAnswer,
    ServerUnavailable,
    connect,
)
from mproxy.control.server import ControlFactory, ControlProtocol
from mproxy.controller import Controller
from mproxy.errors import (
    DeployTimedOut,
    HostConflict,
    InvalidOptions,
    InvalidTarget,
    MproxyError,
    RolloutNotSet,
    ServiceNotFound,
    StateError,
)
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.spec import (
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
    to_json,
)
from mproxy.state import StateStore
from mproxy.target import Target

ALLOWED = ("use host:port (a host name or IPv4 address, or an IPv6 address in "
           "brackets; port 1-65535; no scheme or path)")


class FakeProbe:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[int]]] = []

    def __call__(self, target: Target, config: HealthCheckConfig) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((target.address, d))
        return d

    def answer(self, address: str, code: int) -> None:
        for a, d in self.calls:
            if a == address and not d.called:
                d.callback(code)


def request(service: str, *targets: str, **kw: Any) -> DeployRequest:
    hosts = kw.pop("hosts", ())
    return DeployRequest(service, targets, options=ServiceOptions(hosts=hosts), **kw)


class RawDeploy(amp.Command):
    """
    L{c.Deploy} with its request as any text, to send what a buggy or
    hostile client could.
    """

    commandName = b"Deploy"
    arguments = [(b"request", c.BigUnicode())]
    response = c.Deploy.response
    errors = c.ERRORS


class ControlTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()
        self.router = Router()
        self.logger = ListLogger()
        self.store = StateStore(os.path.join(self.mktemp(), "mproxy.state"))
        self.controller = Controller(self.router, self.clock, self.probe, self.store,
                                     self.logger)
        self.progress: list[tuple[str, str]] = []
        self.client_proto, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(self.controller, self.logger),
            lambda: ClientProtocol(lambda p, d: self.progress.append((p, d))),
            greet=False,
        )
        self.client = ControlClient(self.client_proto, self.clock, "mproxy.sock")

    def call(self, command: type, **kw: Any) -> Deferred[Any]:
        """
        Call a command and deliver everything.  The result is captured before
        the pump runs: AMP treats an error that reaches a Deferred without an
        errback as fatal and drops the connection.
        """
        result: Deferred[Any] = Deferred()
        self.client_proto.callRemote(command, **kw).addBoth(result.callback)
        self.pump.flush()
        return result

    def hello(self) -> None:
        r = self.successResultOf(self.call(c.Hello, version=c.PROTOCOL_VERSION))
        self.assertEqual(r, {"version": c.PROTOCOL_VERSION, "server": mproxy.__version__})

    def deployed(self, req: DeployRequest) -> Any:
        d = self.client.deploy(req)
        self.pump.flush()
        for t in req.targets + req.readers:
            self.probe.answer(t, 200)
        self.pump.flush()
        return self.successResultOf(d)


class HelloTests(ControlTestCase):
    def test_hello_required(self) -> None:
        """
        Every command but Hello is refused before Hello.
        """
        cases: list[tuple[type, dict[str, Any]]] = [
            (c.Deploy, {"request": request("web", "aa:1")}),
            (c.List, {}),
            (c.Remove, {"service": "web"}),
            (c.Pause, {"service": "web", "drain_timeout": 1.0, "max_pause": 1.0}),
            (c.Stop, {"service": "web", "drain_timeout": 1.0, "message": ""}),
            (c.Resume, {"service": "web"}),
            (c.RolloutDeploy, {"service": "web", "targets": ["aa:1"], "readers": [],
                               "deploy_timeout": 1.0, "drain_timeout": 1.0}),
            (c.RolloutSet, {"service": "web", "percentage": 1, "allowlist": []}),
            (c.RolloutStop, {"service": "web"}),
        ]
        for command, kw in cases:
            f = self.failureResultOf(self.call(command, **kw), c.HelloRequired)
            self.assertIn("Hello", str(f.value))
        self.assertEqual(self.probe.calls, [])
        self.assertEqual(self.router.services, {})
        # The connection is still usable.
        self.hello()
        self.assertEqual(self.successResultOf(self.call(c.List)), {"services": "[]"})

    def test_version_mismatch(self) -> None:
        """
        A client speaking another protocol version gets a clear error and is
        not greeted.
        """
        f = self.failureResultOf(self.call(c.Hello, version=c.PROTOCOL_VERSION + 1),
                                 c.VersionMismatch)
        self.assertIn(f"client speaks control protocol {c.PROTOCOL_VERSION + 1}", str(f.value))
        self.assertIn(mproxy.__version__, str(f.value))
        self.assertFalse(self.server.greeted)
        self.failureResultOf(self.call(c.List), c.HelloRequired)


class CommandTests(ControlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.hello()

    def test_deploy_with_progress(self) -> None:
        """
        A deploy answers when the targets are healthy and switched; Progress
        commands reach the client as it goes.
        """
        d = self.client.deploy(request("web", "web-1:3000"))
        self.pump.flush()
        self.assertNoResult(d)
        self.assertEqual(self.progress[0][0], "health")
        self.assertIn("web-1:3000", self.progress[0][1])
        self.probe.answer("web-1:3000", 200)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d),
                         {"targets": ["web-1:3000"], "drained": 0, "cut": 0})
        phases = [p for p, _ in self.progress]
        self.assertIn("switched", phases)
        self.assertEqual(phases[-1], "done")
        self.assertIn("web", self.router.services)

    def test_deploy_waits_for_drain(self) -> None:
        """
        The Deploy answer comes only after the old targets drained.
        """
        self.deployed(request("web", "old:1"))
        claim = self.router.services["web"].active.claim(False)
        d = self.client.deploy(request("web", "new:2"))
        self.pump.flush()
        self.probe.answer("new:2", 200)
        self.pump.flush()
        self.assertNoResult(d)
        self.assertIn(("draining", "draining 1 request from old:1"), self.progress)
        claim.release()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), {"targets": ["new:2"], "drained": 1, "cut": 0})

    def test_options_travel(self) -> None:
        """
        Every option of a deploy request reaches the controller unchanged.
        """
        req = DeployRequest(
            "web", ["aa:1"], readers=["rr:2"],
            options=ServiceOptions(hosts=["a.com"], path_prefixes=["/x"], strip_prefix=False,
                                   canonical_host="a.com", writer_affinity_timeout=2.5),
            target_options=TargetOptions(
                health_check=HealthCheckConfig(path="/hc", port=99, interval=0.5, timeout=2,
                                               host="h"),
                buffer_requests=True, max_request_body=10, log_request_headers=["X-A"],
                forward_headers=False),
            deploy_timeout=12, drain_timeout=3, force=True,
        )
        d = self.client.deploy(req)
        self.pump.flush()
        self.successResultOf(d)
        s = self.router.services["web"]
        self.assertEqual(s.options, req.options)
        self.assertEqual(s.target_options, req.target_options)

    def test_client_gone_during_deploy(self) -> None:
        """
        A client that disconnects while its deploy waits for health cancels
        the deploy: checks stop, the old target keeps serving, a log line
        says so, and nothing is logged as an error.
        """
        self.deployed(request("web", "old:1"))
        d = self.client.deploy(request("web", "new:2"))
        self.pump.flush()
        self.client_proto.transport.loseConnection()
        self.pump.flush()
        self.failureResultOf(d)
        self.assertTrue(self.server._closed)
        self.assertEqual(self.router.services["web"].active.addresses, ["old:1"])
        probes = [a for a, _ in self.probe.calls if a == "new:2"]
        self.probe.answer("new:2", 200)
        self.clock.advance(60)
        self.assertEqual([a for a, _ in self.probe.calls if a == "new:2"], probes)
        self.assertEqual(self.router.services["web"].active.addresses, ["old:1"])
        self.assertIn("Deploy cancelled", self.logger.messages())
        self.assertNotIn("Deployed", self.logger.messages()[-3:])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_after_switch(self) -> None:
        """
        Once traffic has switched, a client going away changes nothing: the
        old target is still drained and the deploy completes.
        """
        self.deployed(request("web", "old:1"))
        claim = self.router.services["web"].active.claim(False)
        d = self.client.deploy(request("web", "new:2"))
        self.pump.flush()
        self.probe.answer("new:2", 200)
        self.pump.flush()
        self.assertEqual(self.router.services["web"].active.addresses, ["new:2"])
        self.client_proto.transport.loseConnection()
        self.pump.flush()
        self.failureResultOf(d)
        self.assertNotIn("Deploy cancelled", self.logger.messages())
        claim.release()
        self.assertEqual(self.logger.messages()[-1], "Deployed")
        self.assertEqual(self.router.services["web"].active.addresses, ["new:2"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_large_deploy(self) -> None:
        """
        A deploy request larger than AMP's 64 KiB value limit (thousands of
        hosts) still travels.
        """
        hosts = [f"tenant-{i}.example.com" for i in range(4000)]
        req = request("web", "aa:1", hosts=hosts, force=True)
        self.assertGreater(len(json.dumps(to_json(req))), 65536)
        d = self.client.deploy(req)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d)["targets"], ["aa:1"])
        self.assertEqual(len(self.router.services["web"].options.hosts), 4000)

    def test_declared_errors(self) -> None:
        """
        Domain errors arrive on the client as the same exception classes with
        their messages.
        """
        f = self.failureResultOf(self.call(c.Remove, service="nope"), ServiceNotFound)
        self.assertEqual(str(f.value), "service not found: nope")
        f = self.failureResultOf(self.call(c.Resume, service="nope"), ServiceNotFound)
        f = self.failureResultOf(
            self.call(c.Pause, service="nope", drain_timeout=1.0, max_pause=1.0),
            ServiceNotFound,
        )
        f = self.failureResultOf(
            self.call(c.Stop, service="nope", drain_timeout=1.0, message="x"), ServiceNotFound
        )
        f = self.failureResultOf(self.call(c.RolloutStop, service="nope"), ServiceNotFound)

        d = self.client.deploy(request("web", "bad target!"))
        self.pump.flush()
        f = self.failureResultOf(d, InvalidTarget)
        self.assertEqual(str(f.value), "invalid target 'bad target!': " + ALLOWED)

        d = self.client.deploy(
            DeployRequest("web", ["aa:1"], options=ServiceOptions(tls_enabled=True))
        )
        self.pump.flush()
        f = self.failureResultOf(d, InvalidOptions)
        self.assertEqual(str(f.value), "service options invalid: host must be set when using TLS")

        self.deployed(request("a", "aa:1", hosts=["x.com"]))
        f = self.failureResultOf(
            self.call(c.RolloutSet, service="a", percentage=10, allowlist=[]), RolloutNotSet
        )
        self.assertEqual(str(f.value), "rollout target not set")

        d = self.client.deploy(request("b", "bb:1", hosts=["x.com"]))
        self.pump.flush()
        f = self.failureResultOf(d, HostConflict)
        self.assertEqual(
            str(f.value),
            "host settings conflict with another service: host x.com is served by service a",
        )

        d = self.client.deploy(request("c", "cc:1", hosts=["c.com"], deploy_timeout=2))
        self.pump.flush()
        self.clock.advance(2)
        self.pump.flush()
        f = self.failureResultOf(d, DeployTimedOut)
        self.assertEqual(
            str(f.value), "target failed to become healthy within configured timeout (2s)"
        )
        # The connection survives every error.
        self.assertTrue(self.successResultOf(self.call(c.List)))
        self.assertFalse(self.client_proto.transport.disconnecting)

    def test_state_error(self) -> None:
        """
        A state file that cannot be written reaches the client as a
        L{StateError} naming the file, and the connection survives.
        """
        os.makedirs(self.store.path)
        d = self.client.deploy(request("web", "aa:1", force=True))
        self.pump.flush()
        f = self.failureResultOf(d, StateError)
        self.assertIn(f"cannot write state file {self.store.path}", str(f.value))
        self.assertTrue(self.successResultOf(self.call(c.List)))

    def test_malformed_deploy(self) -> None:
        """
        A Deploy whose JSON is not a deploy request is L{InvalidOptions}.
        """
        for text in ["{nope", "[]", "{}", '{"service": "web"}',
                     '{"service": "web", "targets": 5}',
                     '{"service": "web", "targets": ["aa:1"], "options": 3}',
                     '{"service": "web", "targets": ["aa:1"], "deploy_timeout": "x"}']:
            f = self.failureResultOf(self.call(RawDeploy, request=text), InvalidOptions)
            self.assertIn("malformed deploy request", str(f.value), text)
        self.assertEqual(self.probe.calls, [])

    def test_pause_stop_resume_remove(self) -> None:
        """
        Pause, stop, resume and remove work over the wire.
        """
        self.deployed(request("web", "aa:1"))
        self.successResultOf(
            self.call(c.Pause, service="web", drain_timeout=1.0, max_pause=10.0))
        self.assertEqual(self.router.services["web"].state_name, "paused")
        self.successResultOf(
            self.call(c.Stop, service="web", drain_timeout=1.0, message="bye"))
        self.assertEqual(self.router.services["web"].pause.stop_message, "bye")
        self.successResultOf(self.call(c.Resume, service="web"))
        self.assertEqual(self.router.services["web"].state_name, "running")
        self.successResultOf(self.call(c.Remove, service="web"))
        self.assertEqual(self.router.services, {})

    def test_defaults_on_the_server(self) -> None:
        """
        Durations a client leaves out take the server's defaults: a pause
        holds requests for 30s, a drain waits 30s, a stop has no message.
        """
        self.deployed(request("web", "aa:1"))
        s = self.router.services["web"]
        claim = s.active.claim(False)
        d = self.call(c.Pause, service="web")
        self.assertEqual(s.pause.max_pause, 30.0)
        self.clock.advance(29)
        self.pump.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.pump.flush()
        self.successResultOf(d)
        self.assertTrue(claim.released)
        self.successResultOf(self.call(c.Stop, service="web"))
        self.assertEqual((s.state_name, s.pause.stop_message), ("stopped", ""))
        d = self.call(c.RolloutDeploy, service="web", targets=["cc:1"])
        self.probe.answer("cc:1", 200)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d)["targets"], ["cc:1"])

    def test_pause_waits_for_drain(self) -> None:
        """
        The Pause answer comes after in-flight requests finished.
        """
        self.deployed(request("web", "aa:1"))
        claim = self.router.services["web"].active.claim(False)
        d = self.call(c.Pause, service="web", drain_timeout=30.0, max_pause=10.0)
        self.assertNoResult(d)
        claim.release()
        self.pump.flush()
        self.successResultOf(d)

    def test_rollout(self) -> None:
        """
        Rollout deploy, set and stop work over the wire.
        """
        self.deployed(request("web", "aa:1"))
        d = self.call(c.RolloutDeploy, service="web", targets=["cc:1"], readers=[],
                      deploy_timeout=5.0, drain_timeout=5.0)
        self.probe.answer("cc:1", 200)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d)["targets"], ["cc:1"])
        self.successResultOf(self.call(c.RolloutSet, service="web", percentage=20,
                                       allowlist=["a", "b"]))
        self.assertEqual(self.router.services["web"].split.allowlist, ("a", "b"))
        self.successResultOf(self.call(c.RolloutStop, service="web"))
        self.assertIsNone(self.router.services["web"].split)

    def test_list(self) -> None:
        """
        The listing arrives as decoded rows.
        """
        self.deployed(request("web", "aa:1", hosts=["a.com"]))
        d = self.client.list_services()
        self.pump.flush()
        rows = self.successResultOf(d)
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["service"], "web")
        self.assertEqual(rows[0]["hosts"], ["a.com"])
        self.assertEqual(rows[0]["targets"], ["aa:1"])

    def test_list_empty(self) -> None:
        """
        No services, no rows.
        """
        d = self.client.list_services()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), [])


class BadInputTests(SynchronousTestCase):
    """
    Bad control input is logged in one line, never as a traceback.
    """

    def setUp(self) -> None:
        from twisted.internet.protocol import Protocol

        self.logger = ListLogger()
        controller = Controller(Router(), Clock(), FakeProbe(), None, self.logger)
        self.server = ControlProtocol(controller, self.logger)
        self.raw = Protocol()
        self.received: list[bytes] = []
        self.raw.dataReceived = self.received.append  # type: ignore[method-assign]
        self.pump = iosim.connect(self.server, iosim.makeFakeServer(self.server),
                                  self.raw, iosim.makeFakeClient(self.raw), greet=False)

    def send(self, data: bytes) -> bytes:
        self.raw.transport.write(data)
        self.pump.flush()
        return b"".join(self.received)

    def box(self, **kw: str) -> bytes:
        return amp.AmpBox({k.encode(): v.encode() for k, v in kw.items()}).serialize()

    def bad_input(self) -> list[dict[str, Any]]:
        return [r for r in self.logger.records if r["msg"] == "Bad control input"]

    def test_malformed_arguments(self) -> None:
        """
        A command with a missing or malformed argument is answered with
        C{BAD_ARGUMENTS}; the connection stays up.
        """
        answer = self.send(self.box(_command="Hello", _ask="1", version="x"))
        self.assertIn(b"BAD_ARGUMENTS", answer)
        self.assertIn(b"malformed Hello: ValueError", answer)
        answer = self.send(self.box(_command="Remove", _ask="2"))
        self.assertIn(b"malformed Remove: KeyError", answer)
        self.assertEqual([r["what"] for r in self.bad_input()], ["Hello", "Remove"])
        self.assertFalse(self.server._closed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_malformed_deploy(self) -> None:
        """
        A Deploy whose request does not decode is answered as invalid options
        and logged in one line.
        """
        box = amp.AmpBox({b"_command": b"Deploy", b"_ask": b"1", b"request": b"1",
                          b"request.0": b"{nope"})
        answer = self.send(box.serialize())
        self.assertIn(b"INVALID_OPTIONS", answer)
        self.assertIn("malformed deploy request", self.bad_input()[0]["error"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unknown_command(self) -> None:
        """
        An unknown command is answered as unhandled and logged.
        """
        self.assertIn(b"UNHANDLED", self.send(self.box(_command="Nope", _ask="1")))
        self.assertEqual(self.bad_input()[0]["what"], "unknown command")

    def test_not_a_command(self) -> None:
        """
        A box that is not a command, or bytes that are not AMP, close the
        connection with one log line.
        """
        self.send(self.box(foo="bar"))
        self.assertTrue(self.server._closed)
        self.assertEqual(self.bad_input()[0]["what"], "box without a command")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.setUp()
        self.send(b"\xff\xff\xff garbage that is not AMP\x00\x00")
        self.assertTrue(self.server._closed)
        self.assertEqual(self.bad_input()[0]["what"], "not AMP")
        self.assertEqual(self.flushLoggedErrors(), [])


class BigController:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def list(self) -> list[dict[str, Any]]:
        return self.rows

    def refresh(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


class ChunkingTests(SynchronousTestCase):
    def test_large_list(self) -> None:
        """
        A listing bigger than AMP's 64 KiB value limit is sent in chunks and
        reassembled.
        """
        rows = [
            {"service": f"service-{i}", "hosts": [f"host-{i}-{'x' * 40}.example.com"],
             "targets": [f"target-{j}:3000" for j in range(5)]}
            for i in range(2000)
        ]
        self.assertGreater(len(json.dumps(rows)), 4 * 65536)
        logger = ListLogger()
        client_proto, server, pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(BigController(rows), logger),  # type: ignore[arg-type]
            lambda: ClientProtocol(),
            greet=False,
        )
        client_proto.callRemote(c.Hello, version=c.PROTOCOL_VERSION)
        pump.flush()
        d = ControlClient(client_proto, Clock(), "mproxy.sock").list_services()
        pump.flush()
        self.assertEqual(self.successResultOf(d), rows)


class FactoryTests(SynchronousTestCase):
    def test_build(self) -> None:
        """
        The factory builds one protocol per connection, on the controller.
        """
        controller = object()
        f = ControlFactory(controller, ListLogger())  # type: ignore[arg-type]
        p1 = f.buildProtocol(None)
        p2 = f.buildProtocol(None)
        self.assertIsInstance(p1, ControlProtocol)
        self.assertIsNot(p1, p2)
        self.assertIs(p1.controller, controller)
        self.assertFalse(p1.greeted)


class ConnectTests(SynchronousTestCase):
    """
    L{connect} on a memory reactor.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.path = os.path.join(self.mktemp(), "mproxy.sock")

    def test_connect_and_hello(self) -> None:
        """
        L{connect} connects to the socket path and says Hello.
        """
        d = connect(self.reactor, self.path)
        address, factory, timeout, check = self.reactor.unixClients[0]
        self.assertEqual(address, self.path)
        client = factory.buildProtocol(None)
        router = Router()
        controller = Controller(router, Clock(), FakeProbe(), None, ListLogger())
        server = ControlProtocol(controller, ListLogger())
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client))
        pump.flush()
        cc = self.successResultOf(d)
        self.assertTrue(server.greeted)
        d = cc.list_services()
        pump.flush()
        self.assertEqual(self.successResultOf(d), [])
        cc.close()
        pump.flush()
        self.assertTrue(server._closed)

    def fail_connect(self, error: Exception) -> Failure:
        d = connect(self.reactor, self.path)
        address, factory, timeout, check = self.reactor.unixClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error))
        return self.failureResultOf(d, ServerUnavailable)

    def test_no_socket(self) -> None:
        """
        Nothing at the path: a L{ServerUnavailable} naming the path and the
        reason, and suggesting how to fix it.
        """
        f = self.fail_connect(ConnectError(2, "No such file or directory"))
        message = str(f.value)
        self.assertTrue(
            message.startswith(
                f"cannot connect to mproxy at {self.path}: No such file or directory"
            ),
            message,
        )
        self.assertIn("mproxy run", message)
        self.assertIsInstance(f.value, MproxyError)

    def silent_server(self) -> tuple[Any, iosim.IOPump]:
        """
        Connect L{connect}'s client to a peer that accepts and never answers.
        """
        from twisted.internet.protocol import Protocol

        d = connect(self.reactor, self.path)
        address, factory, timeout, check = self.reactor.unixClients[0]
        self.assertEqual(timeout, 5)
        client = factory.buildProtocol(None)
        server = Protocol()
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client))
        pump.flush()
        return d, pump

    def test_handshake_timeout(self) -> None:
        """
        A socket that accepts and never answers the version handshake gives
        L{NoAnswer} naming the socket after 5 seconds, and the connection is
        closed.
        """
        d, pump = self.silent_server()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        f = self.failureResultOf(d, NoAnswer)
        self.assertEqual(
            str(f.value),
            f"mproxy at {self.path} did not answer within 5s (is it an mproxy control "
            "socket? is the server stuck?)",
        )
        self.assertIsInstance(f.value, MproxyError)
        pump.flush()
        self.assertTrue(pump.clientIO.disconnected)

    def test_answer_timeout(self) -> None:
        """
        Prompt commands time out after 5 seconds too; those that wait for
        health checks and drains (deploy, rollout deploy, pause, stop) do
        not.
        """
        protocol = ClientProtocol()
        protocol.makeConnection(iosim.FakeTransport(protocol, isServer=False))
        client = ControlClient(protocol, self.reactor, self.path)
        listing = client.list_services()
        waits = [client.deploy(request("web", "aa:1")),
                 client.call(c.Pause, service="web"), client.call(c.Stop, service="web"),
                 client.call(c.RolloutDeploy, service="web", targets=["aa:1"])]
        self.reactor.advance(5)
        self.failureResultOf(listing, NoAnswer)
        self.reactor.advance(3600)
        for d in waits:
            self.assertNoResult(d)
        # They still end when the server goes away.
        protocol.connectionLost(Failure(ConnectionDone()))
        for d in waits:
            self.failureResultOf(d, ConnectionDone)

    def test_path_too_long(self) -> None:
        """
        A socket path longer than a UNIX address holds fails at once, naming
        the path and the limit, without trying to connect.
        """
        path = "/tmp/" + "x" * 200 + "/mproxy.sock"
        f = self.failureResultOf(connect(self.reactor, path), MproxyError)
        self.assertEqual(
            str(f.value),
            f"control socket path {path} is too long for a UNIX socket (217 bytes, at most 107)",
        )
        self.assertEqual(self.reactor.unixClients, [])

    def test_refused(self) -> None:
        """
        A stale socket (connection refused) is reported the same way.
        """
        f = self.fail_connect(ConnectionRefusedError(111, "Connection refused"))
        self.assertIn(f"cannot connect to mproxy at {self.path}: Connection refused",
                      str(f.value))

    def test_version_mismatch(self) -> None:
        """
        A server speaking another version: an L{MproxyError} with the server's
        message, and the connection is closed.
        """
        d = connect(self.reactor, self.path)
        address, factory, timeout, check = self.reactor.unixClients[0]
        client = factory.buildProtocol(None)
        server = ControlProtocol(
            Controller(Router(), Clock(), FakeProbe(), None, ListLogger()), ListLogger()
        )
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), greet=False)
        # The client's Hello is on the wire; the server now speaks another
        # version.
        self.patch(c, "PROTOCOL_VERSION", c.PROTOCOL_VERSION + 1)
        pump.flush()
        f = self.failureResultOf(d, MproxyError)
        self.assertIn(f"server speaks {c.PROTOCOL_VERSION}", str(f.value))
        pump.flush()
        self.assertTrue(server._closed)
