"""
An upgrade and the control commands around it: the exec waits for the
commands in progress to be answered (L{mproxy.upgrade.Upgrades.admit}), the
commands that arrive meanwhile are refused with C{UPGRADE_IN_PROGRESS} by
the control server, and the C{mproxy} client holds such a command and sends
it again to the new server.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mproxy.cli.remote import HOLD_INTERVAL, client_command
from mproxy.cli.streams import Streams
from mproxy.control import commands as c
from mproxy.control.client import ClientProtocol, ControlClient
from mproxy.control.server import ControlProtocol
from mproxy.controller import Controller
from mproxy.errors import MproxyError
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.upgrade import (
    OPERATIONS_TIMEOUT,
    Operations,
    Relaunch,
    UpgradeError,
    UpgradeInProgress,
    Upgrades,
    describe_commands,
)
from tests.test_control import FakeProbe, request
from tests.test_upgrade import FakeServer


class UpgradeHarness:
    """
    An L{Upgrades} whose check, exec and server are fakes.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.server = FakeServer()
        self.server.drain.callback(None)
        self.logger = ListLogger()
        self.check: Deferred[None] = Deferred()
        self.execs: list[Any] = []
        self.upgrades = Upgrades(
            reactor, self.server, self.logger, environ={},
            execv=lambda path, argv, env: self.execs.append(argv),
            check=lambda reactor, argv, env: self.check,
            keep=lambda fd: fd + 100, getpid=lambda: 42, flush=lambda: None,
        )
        self.upgrades.relaunch = Relaunch(("/py", "run"), ("/py", "check"))
        self.progress: list[tuple[str, str]] = []

    def start(self) -> Deferred[None]:
        return self.upgrades.upgrade("u1", 3.0, lambda *a: self.progress.append(a))

    def turns(self, n: int = 3) -> None:
        for _ in range(n):
            self.reactor.advance(0)


class OperationsTests(SynchronousTestCase):
    def test_idle_once_every_command_ended(self) -> None:
        clock = Clock()
        ops = Operations(clock)
        self.successResultOf(ops.idle())
        first, second = ops.begin("deploy web"), ops.begin("list")
        self.assertEqual(ops.running(), ["deploy web", "list"])
        idle = ops.idle()
        first()
        first()  # twice counts once
        clock.advance(0)
        self.assertNoResult(idle)
        second()
        self.assertNoResult(idle)  # the answer is written first
        clock.advance(0)
        self.successResultOf(idle)
        self.assertEqual(ops.running(), [])

    def test_describe(self) -> None:
        self.assertEqual(describe_commands(["deploy web", "list", "list"]),
                         "deploy web, list (x2)")


class UpgradeWaitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.h = UpgradeHarness(self.reactor)
        self.upgrades = self.h.upgrades

    def test_exec_waits_for_the_commands_in_progress(self) -> None:
        """
        A deploy in progress is answered before the exec; the upgrade says
        what it waits for, and new commands are refused meanwhile.
        """
        deploy = self.upgrades.admit("deploy web")
        self.h.start()
        self.h.check.callback(None)
        self.h.turns(10)
        self.assertEqual(self.h.execs, [])
        self.assertEqual(self.h.server.drained, [])
        [(phase, detail)] = [p for p in self.h.progress if p[0] == "wait"]
        self.assertIn("deploy web", detail)
        self.assertIn(f"up to {OPERATIONS_TIMEOUT:g}s", detail)
        self.assertIn("Upgrade: waiting for control commands", self.h.logger.messages())
        e = self.assertRaises(UpgradeInProgress, self.upgrades.admit, "list")
        self.assertIn("list was not carried out", str(e))
        self.assertIn("u1", str(e))
        deploy()
        self.h.turns(4)
        self.assertEqual(self.h.server.drained, [3.0])
        self.assertEqual(self.h.execs, [["/py", "run"]])

    def test_commands_during_the_check_are_waited_for(self) -> None:
        self.h.start()
        pause = self.upgrades.admit("pause web")
        self.h.check.callback(None)
        self.h.turns(10)
        self.assertEqual(self.h.execs, [])
        pause()
        self.h.turns(4)
        self.assertEqual(len(self.h.execs), 1)

    def test_without_commands_no_wait(self) -> None:
        self.h.start()
        self.h.check.callback(None)
        self.h.turns(4)
        self.assertEqual(len(self.h.execs), 1)
        self.assertNotIn("wait", [p for p, _ in self.h.progress])

    def test_gives_up_and_serves_on(self) -> None:
        """
        Commands that do not end within the timeout fail the upgrade with a
        clear reason; nothing changed, and commands are taken again.
        """
        self.upgrades.admit("deploy web")
        d = self.h.start()
        self.h.check.callback(None)
        self.reactor.advance(OPERATIONS_TIMEOUT - 1)
        self.assertNoResult(d)
        self.reactor.advance(1)
        error = str(self.failureResultOf(d, UpgradeError).value)
        self.assertEqual(
            error, f"control commands still in progress after {OPERATIONS_TIMEOUT:g}s: "
            "deploy web; nothing was changed (try again once they are done)")
        self.h.turns(4)
        self.assertEqual(self.h.execs, [])
        self.assertEqual(self.h.server.drained, [])
        self.assertIsNone(self.upgrades.running)
        self.upgrades.admit("list")()
        self.assertEqual(self.h.logger.messages()[-1], "Upgrade failed")

    def test_failed_check_holds_nothing(self) -> None:
        d = self.h.start()
        self.h.check.errback(UpgradeError("the new code cannot start: boom"))
        self.failureResultOf(d, UpgradeError)
        self.upgrades.admit("list")()


class ControlDuringUpgradeTests(SynchronousTestCase):
    """
    The control server with an upgrade under way.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.probe = FakeProbe()
        self.router = Router()
        self.logger = ListLogger()
        self.controller = Controller(self.router, self.reactor, self.probe, None, self.logger)
        self.h = UpgradeHarness(self.reactor)

    def client(self) -> tuple[ControlClient, iosim.IOPump]:
        proto, _server, pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(self.controller, self.logger, self.h.upgrades),
            ClientProtocol, greet=False)
        client = ControlClient(proto, self.reactor, "mproxy.sock")
        d = client.call(c.Hello, version=c.PROTOCOL_VERSION)
        pump.flush()
        self.successResultOf(d)
        return client, pump

    def test_deploy_answered_before_the_exec(self) -> None:
        deployer, pump = self.client()
        deploy = deployer.deploy(request("web", "web-1:3000"))
        pump.flush()
        self.h.start()
        self.h.check.callback(None)
        self.h.turns(4)
        pump.flush()
        self.assertNoResult(deploy)
        [(_phase, detail)] = [p for p in self.h.progress if p[0] == "wait"]
        self.assertIn("deploy web", detail)
        # another client's commands are refused meanwhile, with nothing done
        other, other_pump = self.client()
        refused = [other.list_services(),
                   other.deploy(request("api", "api-1:3000")),
                   other.call(c.RolloutStop, service="web")]
        other_pump.flush()
        for d in refused:
            f = self.failureResultOf(d, UpgradeInProgress)
            self.assertIn("an upgrade is in progress (u1)", str(f.value))
        self.assertIn("rollout stop web was not carried out", str(f.value))
        self.assertNotIn("api", self.router.services)
        self.assertEqual([a for a, _ in self.probe.calls], ["web-1:3000"])
        # the deploy ends: its answer is sent, then the exec comes
        self.probe.answer("web-1:3000", 200)
        self.assertEqual(self.h.execs, [])
        pump.flush()
        self.assertEqual(self.successResultOf(deploy)["targets"], ["web-1:3000"])
        self.h.turns(4)
        self.assertEqual(len(self.h.execs), 1)

    def test_upgrade_commands_still_answered(self) -> None:
        self.h.upgrades.admit("deploy web")
        self.h.start()
        self.h.check.callback(None)
        client, pump = self.client()  # Hello goes through
        second = client.call(c.Upgrade, id="u2")
        status = client.call(c.UpgradeStatus, id="u1")
        pump.flush()
        self.assertIn("already in progress", str(self.failureResultOf(second, UpgradeError).value))
        self.assertIn("did not happen", str(self.failureResultOf(status, UpgradeError).value))

    def test_failed_command_counts_as_ended(self) -> None:
        client, pump = self.client()
        d = client.call(c.Remove, service="nope")
        pump.flush()
        self.failureResultOf(d)
        self.reactor.advance(0)
        self.assertEqual(self.h.upgrades.operations.running(), [])


class HeldCommandTests(SynchronousTestCase):
    """
    The C{mproxy} client holds a command refused during an upgrade: it
    reconnects and sends it again until the new server takes it.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.path = os.path.join(self.mktemp(), "mproxy.sock")
        self.out = io.StringIO()
        self.streams = Streams(self.out, io.StringIO())
        self.logger = ListLogger()
        self.servers: list[ControlProtocol] = []
        self.pumps: list[iosim.IOPump] = []

    def serve(self, upgrades: Any) -> None:
        """
        Answer the client's latest connection attempt.
        """
        controller = Controller(Router(), self.reactor, FakeProbe(), None, self.logger)
        _address, factory, _timeout, _check = self.reactor.unixClients[-1]
        client = factory.buildProtocol(None)
        server = ControlProtocol(controller, self.logger, upgrades)
        self.servers.append(server)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client))
        self.pumps.append(pump)
        pump.flush()
        pump.flush()

    def holding(self) -> Upgrades:
        h = UpgradeHarness(self.reactor)
        h.upgrades.holding = True
        h.upgrades.running = "u1"
        return h.upgrades

    def ns(self) -> Any:
        import argparse

        return argparse.Namespace(socket=self.path, json=True)

    def test_sent_again_to_the_new_server(self) -> None:
        d = client_command(self.reactor, "list", self.ns(), self.streams)
        old = self.holding()
        self.serve(old)
        self.assertNoResult(d)
        self.assertIn("Waiting for the upgrade in progress to finish", self.out.getvalue())
        self.reactor.advance(HOLD_INTERVAL)
        self.serve(old)  # still the old image: refused again
        self.assertNoResult(d)
        self.reactor.advance(HOLD_INTERVAL)
        self.serve(UpgradeHarness(self.reactor).upgrades)  # the new image
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.unixClients), 3)
        self.assertTrue(self.out.getvalue().endswith("[]\n"), self.out.getvalue())
        self.assertEqual(self.out.getvalue().count("Waiting for the upgrade"), 1)

    def test_held_only_so_long(self) -> None:
        import mproxy.cli.remote

        HOLD_TIMEOUT = 3.0
        self.patch(mproxy.cli.remote, "HOLD_TIMEOUT", HOLD_TIMEOUT)
        d = client_command(self.reactor, "list", self.ns(), self.streams)
        old = self.holding()
        self.serve(old)
        waited = 0.0
        while waited < HOLD_TIMEOUT + 1 and not d.called:
            self.reactor.advance(HOLD_INTERVAL)
            waited += HOLD_INTERVAL
            self.serve(old)
        f = self.failureResultOf(d, MproxyError)
        self.assertIn("an upgrade is in progress (u1)", str(f.value))
        self.assertIn(f"still upgrading after {HOLD_TIMEOUT:g}s", str(f.value))


class StartingWorkersTests(SynchronousTestCase):
    """
    While a new generation starts (after an upgrade), C{list} and the
    metrics endpoint do not wait for its workers, which serve nothing yet.
    """

    def test_not_asked_before_they_serve(self) -> None:
        from mproxy.workers.pool import WorkerPool
        from tests.test_workers import MemorySpawner, record

        reactor = MemoryReactorClock()
        spawner = MemorySpawner(reactor)
        pool = WorkerPool(reactor, ListLogger(), spawner, 2)
        pool.startService()
        pool.apply([record("web", "web-1:3000")], 30.0)
        pool.start_generation()
        spawner.flush()
        for server in spawner.servers.values():
            server.router.services["web"].active.claim(False)
        serving = list(spawner.pumps)
        starting = pool.start_generation()
        self.assertEqual(len(pool.workers), 4)
        refreshed = pool.refresh()
        metrics = pool.metric_families()
        for _ in range(3):
            for pump in serving:
                pump.flush()
        self.successResultOf(refreshed)
        self.assertEqual(pool.inflight("web"), 2)
        self.assertEqual(len(self.successResultOf(metrics)), 2)
        self.assertNoResult(starting)
