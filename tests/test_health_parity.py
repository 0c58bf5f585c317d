"""
The targets in rotation are the same whether requests are served by the
controller's own router (one process) or by worker processes following the
supervisor (L{mproxy.workers.pool.WorkerPool} driving in-memory workers):
one set of tests, run on both.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.controller import Controller
from mproxy.health import UNHEALTHY_AFTER
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.spec import DeployRequest, HealthCheckConfig, ServiceOptions, TargetOptions
from mproxy.state import StateStore
from mproxy.workers.pool import WorkerPool
from tests.test_controller import FakeProbe
from tests.test_workers import MemorySpawner

#: checks every second, so that several targets keep being checked
CHECKS = TargetOptions(health_check=HealthCheckConfig(interval=1.0))


class HealthParityMixin:
    """
    What the processes serving requests route to, through L{routers}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.probe = FakeProbe()
        self.logger = ListLogger()
        self.store = StateStore(os.path.join(self.mktemp(), "mproxy.state"))  # type: ignore[attr-defined]
        self.make()

    def make(self) -> None:
        raise NotImplementedError

    def routers(self) -> list[Router]:
        raise NotImplementedError

    def settle(self) -> None:
        pass

    def deploy(self, *targets: str, force: bool = False) -> Any:
        d = self.controller.deploy(DeployRequest(
            "web", targets, options=ServiceOptions(), target_options=CHECKS, force=force))
        self.settle()
        return d

    def answer(self, address: str, code: int) -> None:
        self.probe.answer(address, code)
        self.settle()

    def serving(self, service: str = "web") -> list[set[str]]:
        """
        In each serving process, the addresses that would get a request.
        """
        found = []
        for router in self.routers():
            lb = router.services[service].active
            addresses = set()
            for _ in lb.targets:
                claim = lb.claim(False)
                if claim is not None:
                    addresses.add(claim.target.address)
                    claim.release()
            found.append(addresses)
        return found

    def test_forced_deploy_out_of_rotation_until_its_first_check(self) -> None:
        self.probe.auto["web-1:3000"] = 200
        self.successResultOf(self.deploy("web-1:3000"))  # type: ignore[attr-defined]
        d = self.deploy("web-2:3000", force=True)
        self.successResultOf(d)  # type: ignore[attr-defined]
        self.assertEqual(self.serving(), [set()] * self.processes)  # type: ignore[attr-defined]
        self.answer("web-2:3000", 200)
        self.assertEqual(self.serving(), [{"web-2:3000"}] * self.processes)  # type: ignore[attr-defined]

    def test_forced_redeploy_of_the_same_address_is_a_new_target(self) -> None:
        self.probe.auto["web-1:3000"] = 200
        self.successResultOf(self.deploy("web-1:3000"))  # type: ignore[attr-defined]
        del self.probe.auto["web-1:3000"]
        self.successResultOf(self.deploy("web-1:3000", force=True))  # type: ignore[attr-defined]
        self.assertEqual(self.serving(), [set()] * self.processes)  # type: ignore[attr-defined]
        self.answer("web-1:3000", 200)
        self.assertEqual(self.serving(), [{"web-1:3000"}] * self.processes)  # type: ignore[attr-defined]

    def test_health_moves_after_later_changes(self) -> None:
        """
        An unhealthy target stays out of rotation through later changes
        (a pause and a resume), and comes back when its checks pass.
        """
        for t in ("web-a:3000", "web-b:3000"):
            self.probe.auto[t] = 200
        self.successResultOf(self.deploy("web-a:3000", "web-b:3000"))  # type: ignore[attr-defined]
        self.probe.auto["web-b:3000"] = 503
        for _ in range(UNHEALTHY_AFTER):
            self.reactor.advance(1.0)
        self.settle()
        self.assertEqual(self.serving(), [{"web-a:3000"}] * self.processes)  # type: ignore[attr-defined]
        self.controller.pause("web")
        self.settle()
        self.controller.resume("web")
        self.settle()
        self.assertEqual(self.serving(), [{"web-a:3000"}] * self.processes)  # type: ignore[attr-defined]
        self.probe.auto["web-b:3000"] = 200
        self.reactor.advance(1.0)
        self.settle()
        self.assertEqual(self.serving(), [{"web-a:3000", "web-b:3000"}] * self.processes)  # type: ignore[attr-defined]

    def test_a_failed_connection_ejects_that_target_only(self) -> None:
        """
        A connection to a service's target fails: that target leaves
        rotation; another service's target at the same address stays.
        """
        self.probe.auto["web-1:3000"] = 200
        for name in ("a", "b"):
            d = self.controller.deploy(DeployRequest(
                name, ("web-1:3000",), options=ServiceOptions(hosts=(f"{name}.test",)),
                target_options=CHECKS))
            self.settle()
            self.successResultOf(d)  # type: ignore[attr-defined]
        first = self.routers()[0]
        self.assertTrue(first.services["a"].active.targets[0].eject("connection refused"))
        self.settle()
        self.assertEqual(self.serving("a"), [set()] * self.processes)  # type: ignore[attr-defined]
        self.assertEqual(self.serving("b"), [{"web-1:3000"}] * self.processes)  # type: ignore[attr-defined]

    def test_restored_targets_serve_at_once(self) -> None:
        self.probe.auto["web-1:3000"] = 200
        self.successResultOf(self.deploy("web-1:3000"))  # type: ignore[attr-defined]
        self.controller.shutdown()
        self.probe = FakeProbe()
        self.make()
        self.controller.restore()
        self.settle()
        self.assertEqual(self.serving(), [{"web-1:3000"}] * self.processes)  # type: ignore[attr-defined]


class OneProcessTests(HealthParityMixin, SynchronousTestCase):
    processes = 1

    def make(self) -> None:
        self.controller = Controller(Router(), self.reactor, self.probe, self.store, self.logger)

    def routers(self) -> list[Router]:
        return [self.controller.router]


class WorkerProcessesTests(HealthParityMixin, SynchronousTestCase):
    processes = 2

    def make(self) -> None:
        self.spawner = MemorySpawner(self.reactor)
        # as the server wires it: a worker's failed connection reaches the
        # supervisor's targets
        self.pool = WorkerPool(self.reactor, self.logger, self.spawner, 2,
                               on_eject=lambda a, e, k: self.controller.eject(a, e, k))
        self.pool.startService()
        self.controller = Controller(Router(), self.reactor, self.probe, self.store, self.logger,
                                     dataplane=self.pool)
        self.pool.start_generation()
        self.settle()

    def settle(self) -> None:
        self.spawner.flush()

    def routers(self) -> list[Router]:
        return [server.router for server in self.spawner.servers.values()]

    def test_replacement_worker_follows_the_supervisor(self) -> None:
        """
        A worker started after the changes (replacing one that died) gets
        every target's health as it is now.
        """
        self.probe.auto["web-1:3000"] = 200
        self.successResultOf(self.deploy("web-1:3000"))
        self.successResultOf(self.deploy("web-2:3000", force=True))
        self.spawner.kill(min(self.spawner.servers))
        self.settle()
        self.assertEqual(len(self.spawner.servers), 2)
        self.assertEqual(self.serving(), [set(), set()])
        self.answer("web-2:3000", 200)
        self.assertEqual(self.serving(), [{"web-2:3000"}] * 2)

    def test_adopted_workers_keep_their_deployments(self) -> None:
        """
        After an upgrade the new supervisor names the targets afresh: the
        workers it adopted keep their load balancers (and the requests in
        flight there), matching targets by address.
        """
        self.probe.auto["web-1:3000"] = 200
        self.probe.auto["web-2:3000"] = 200
        self.successResultOf(self.deploy("web-2:3000"))
        self.successResultOf(self.deploy("web-1:3000"))
        before = [r.services["web"].active for r in self.routers()]
        claims = [lb.claim(False) for lb in before]
        for generation in self.pool.generations:
            generation.adopted = True
        image = Controller(Router(), self.reactor, self.probe, self.store, self.logger,
                           dataplane=self.pool)
        image.restore()
        self.settle()
        self.assertEqual([r.services["web"].active for r in self.routers()], before)
        self.assertEqual([lb.inflight() for lb in before], [1, 1])
        self.assertEqual(self.serving(), [{"web-1:3000"}] * 2)
        for claim in claims:
            claim.release()
