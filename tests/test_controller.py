"""
Tests for L{mproxy.controller}: deploy (health wait, atomic switch, drain),
rollout, remove, pause/stop/resume, listing, and saving/restoring state.

Everything runs on a L{Clock} with a fake probe answered by hand.
"""

from __future__ import annotations

import json
import os

import attrs
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.controller import Controller
from mproxy.errors import (
    DeployTimedOut,
    HostConflict,
    InvalidOptions,
    InvalidTarget,
    RolloutNotSet,
    ServiceNotFound,
    StateError,
)
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.service import HEALTH_OK, NO_TARGET, PAUSE_EXPIRED, Refusal, Service
from mproxy.spec import (
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
)
from mproxy.state import StateStore
from mproxy.target import Claim, Drained, Target, TargetState

ALLOWED = ("use host:port (a host name or IPv4 address, or an IPv6 address in "
           "brackets; port 1-65535; no scheme or path)")


class FakeProbe:
    """
    Health probes answered by hand, or automatically by a per-address rule.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[int]]] = []
        self.auto: dict[str, int] = {}

    def __call__(self, target: Target, config: HealthCheckConfig) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((target.address, d))
        if target.address in self.auto:
            d.callback(self.auto[target.address])
        return d

    def answer(self, address: str, code: int) -> None:
        """
        Answer every pending probe of C{address}.
        """
        for a, d in self.calls:
            if a == address and not d.called:
                d.callback(code)

    def count(self, address: str) -> int:
        return sum(1 for a, _ in self.calls if a == address)


def request(service: str, *targets: str, **kw: Any) -> DeployRequest:
    hosts = kw.pop("hosts", ())
    prefixes = kw.pop("prefixes", ())
    readers = kw.pop("readers", ())
    kw.setdefault("deploy_timeout", 10.0)
    kw.setdefault("drain_timeout", 30.0)
    return DeployRequest(
        service,
        targets,
        readers=readers,
        options=ServiceOptions(hosts=hosts, path_prefixes=prefixes),
        target_options=TargetOptions(health_check=HealthCheckConfig(interval=1, timeout=5)),
        **kw,
    )


class FailingStore(StateStore):
    """
    A state store whose disk is full.
    """

    def save(self, records: Any) -> None:
        raise OSError(28, "No space left on device")


def cookie_none(name: bytes) -> bytes | None:
    return None


class ControllerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()
        self.router = Router()
        self.logger = ListLogger()
        self.state_path = os.path.join(self.mktemp(), "mproxy.state")
        self.store = StateStore(self.state_path)
        self.controller = self.make_controller()

    def make_controller(self) -> Controller:
        return Controller(self.router, self.clock, self.probe, self.store, self.logger)

    def deployed(self, req: DeployRequest) -> Any:
        """
        Deploy with every target answering 200 at once.
        """
        for t in req.targets + req.readers:
            self.probe.auto[t] = 200
        return self.successResultOf(self.controller.deploy(req))

    def select(self, host: str = "h", path: str = "/", method: bytes = b"GET",
               cookie: Callable[[bytes], bytes | None] = cookie_none) -> Any:
        m = self.router.match(host, path)
        if m is None:
            return None
        return m.service.select(method, m.target_path(path), cookie, False)

    def address(self, host: str = "h", path: str = "/", method: bytes = b"GET") -> str:
        c = self.select(host, path, method)
        self.assertIsInstance(c, Claim)
        c.release()
        return c.target.address

    def saved(self) -> list[dict[str, Any]]:
        with open(self.state_path) as f:
            return json.load(f)["services"]

    def state_bytes(self) -> bytes | None:
        try:
            with open(self.state_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None


class DeployTests(ControllerTestCase):
    def test_first_deploy(self) -> None:
        """
        A first deploy waits for health, installs the service and fires with
        the target addresses.
        """
        d = self.controller.deploy(request("web", "web-1:3000"))
        self.assertNoResult(d)
        self.assertIsNone(self.router.match("h", "/"))
        self.assertEqual(self.probe.count("web-1:3000"), 1)
        self.probe.answer("web-1:3000", 200)
        self.assertEqual(self.successResultOf(d).targets, ("web-1:3000",))
        self.assertEqual(self.address(), "web-1:3000")
        self.assertEqual(self.saved()[0]["name"], "web")
        self.assertEqual(self.saved()[0]["active_targets"], ["web-1:3000"])
        self.assertIn("Deployed", self.logger.messages())

    def test_waits_for_every_target(self) -> None:
        """
        The switch waits until every writer and reader is healthy.
        """
        d = self.controller.deploy(request("web", "aa:1", "bb:2", readers=("rr:3",)))
        self.probe.answer("aa:1", 200)
        self.probe.answer("rr:3", 200)
        self.assertNoResult(d)
        self.assertIsNone(self.router.match("h", "/"))
        self.clock.advance(1)
        self.probe.answer("bb:2", 200)
        self.assertEqual(self.successResultOf(d).targets, ("aa:1", "bb:2", "rr:3"))

    def test_invalid_request(self) -> None:
        """
        An invalid request fails at once and changes nothing.
        """
        f = self.failureResultOf(self.controller.deploy(request("web", "bad target!")),
                                 InvalidTarget)
        self.assertEqual(str(f.value), "invalid target 'bad target!': " + ALLOWED)
        self.failureResultOf(
            self.controller.deploy(
                DeployRequest("web", ["aa:1"], options=ServiceOptions(tls_enabled=True))
            ),
            InvalidOptions,
        )
        self.assertEqual(self.probe.calls, [])
        self.assertIsNone(self.state_bytes())

    def test_redeploy_drains_old(self) -> None:
        """
        A redeploy switches to the new target when it is healthy, then waits
        for the request in flight on the old target; new requests go to the
        new target as soon as the switch happened.
        """
        self.deployed(request("web", "old:1"))
        old_claim = self.select()
        old_target = old_claim.target
        d = self.controller.deploy(request("web", "new:2"))
        # Before the new target is healthy, traffic stays on the old one.
        self.assertEqual(self.address(), "old:1")
        self.probe.answer("new:2", 200)
        # Switched: new requests go to the new target at once...
        self.assertEqual(self.address(), "new:2")
        self.assertEqual(self.saved()[0]["active_targets"], ["new:2"])
        self.assertIs(old_target.state, TargetState.DRAINING)
        # ...but the deploy completes only when the old request is done.
        self.assertNoResult(d)
        self.clock.advance(29)
        self.assertNoResult(d)
        old_claim.release()
        self.assertEqual(self.successResultOf(d).targets, ("new:2",))
        self.assertEqual(self.address(), "new:2")

    def test_drain_timeout(self) -> None:
        """
        A request still running at the drain deadline is cancelled and the
        deploy completes.
        """
        self.deployed(request("web", "old:1"))
        old_claim = self.select()
        cancelled = []
        old_claim.set_canceller(lambda: cancelled.append(True))
        d = self.controller.deploy(request("web", "new:2", drain_timeout=5))
        self.probe.answer("new:2", 200)
        self.clock.advance(4)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(cancelled, [True])
        self.successResultOf(d)

    def test_redeploy_same_address(self) -> None:
        """
        Redeploying the same address builds new target objects and drains the
        old ones.
        """
        self.deployed(request("web", "web:1"))
        old = self.select()
        d = self.controller.deploy(request("web", "web:1"))
        self.probe.answer("web:1", 200)
        new = self.select()
        self.assertIsNot(new.target, old.target)
        self.assertNoResult(d)
        old.release()
        self.successResultOf(d)
        new.release()

    def test_unhealthy_times_out(self) -> None:
        """
        New targets that never become healthy fail the deploy within its
        timeout with a message naming the timeout and the last health error;
        the old deployment keeps serving and the state file is not written.
        """
        self.deployed(request("web", "old:1"))
        before = self.state_bytes()
        d = self.controller.deploy(request("web", "new:2", deploy_timeout=5))
        for _ in range(4):
            self.probe.answer("new:2", 500)
            self.clock.advance(1)
        self.assertNoResult(d)
        self.probe.answer("new:2", 503)
        self.clock.advance(1)
        f = self.failureResultOf(d, DeployTimedOut)
        self.assertEqual(
            str(f.value),
            "target failed to become healthy within configured timeout (5s): "
            "unexpected status (503)",
        )
        self.assertEqual(self.address(), "old:1")
        self.assertEqual(self.state_bytes(), before)
        # The failed balancer's checks are stopped.
        n = self.probe.count("new:2")
        self.clock.advance(10)
        self.assertEqual(self.probe.count("new:2"), n)

    def test_timeout_message_without_answer(self) -> None:
        """
        A target that never answers a probe times out with the probe timeout
        as the last error.
        """
        d = self.controller.deploy(request("web", "slow:1", deploy_timeout=30))
        self.clock.advance(30)
        f = self.failureResultOf(d, DeployTimedOut)
        self.assertEqual(
            str(f.value),
            "target failed to become healthy within configured timeout (30s): "
            "request timed out",
        )
        self.assertIsNone(self.router.match("h", "/"))
        self.assertIsNone(self.state_bytes())

    def test_force(self) -> None:
        """
        --force switches at once; until the first successful probe requests
        get a 503.
        """
        self.deployed(request("web", "old:1"))
        d = self.controller.deploy(request("web", "new:2", force=True))
        self.assertEqual(self.select(), NO_TARGET)
        self.successResultOf(d)
        self.probe.answer("new:2", 200)
        self.assertEqual(self.address(), "new:2")

    def test_host_conflict(self) -> None:
        """
        A deploy whose host and prefix another service already has is refused
        before any health check, and nothing changes.
        """
        self.deployed(request("a", "aa:1", hosts=["app.example.com"]))
        before = self.state_bytes()
        calls = len(self.probe.calls)
        d = self.controller.deploy(request("b", "bb:2", hosts=["app.example.com"]))
        f = self.failureResultOf(d, HostConflict)
        self.assertEqual(
            str(f.value),
            "host settings conflict with another service: host app.example.com is served "
            "by service a",
        )
        self.assertEqual(len(self.probe.calls), calls)
        self.assertEqual(sorted(self.router.services), ["a"])
        self.assertEqual(self.address("app.example.com"), "aa:1")
        self.assertEqual(self.state_bytes(), before)

    def test_conflict_arising_during_wait(self) -> None:
        """
        A conflict created while the deploy waited for health is caught at the
        switch; the new balancer is closed and nothing changes.
        """
        d = self.controller.deploy(request("b", "bb:2", hosts=["x.com"]))
        self.deployed(request("a", "aa:1", hosts=["x.com"]))
        self.probe.answer("bb:2", 200)
        self.failureResultOf(d, HostConflict)
        self.assertEqual(self.address("x.com"), "aa:1")
        self.assertNotIn("b", self.router.services)

    def test_other_service_not_blocked_by_drain(self) -> None:
        """
        While service A drains, deploy, list and remove of service B proceed.
        """
        self.deployed(request("a", "a1:1", hosts=["a.com"]))
        held = self.select("a.com")
        da = self.controller.deploy(request("a", "a2:1", hosts=["a.com"]))
        self.probe.answer("a2:1", 200)
        self.assertNoResult(da)
        self.deployed(request("b", "b1:1", hosts=["b.com"]))
        self.assertEqual(self.address("b.com"), "b1:1")
        self.assertEqual([s["service"] for s in self.controller.list()], ["a", "b"])
        self.controller.remove("b")
        self.assertIsNone(self.router.match("b.com", "/"))
        self.assertNoResult(da)
        held.release()
        self.successResultOf(da)

    def test_other_service_not_blocked_by_health_wait(self) -> None:
        """
        While service A waits for health, service B deploys.
        """
        da = self.controller.deploy(request("a", "a1:1", hosts=["a.com"]))
        self.deployed(request("b", "b1:1", hosts=["b.com"]))
        self.assertNoResult(da)
        self.probe.answer("a1:1", 200)
        self.successResultOf(da)

    def test_same_service_serialised(self) -> None:
        """
        Two deploys of one service do not interleave: the second starts its
        health checks only after the first switched.
        """
        d1 = self.controller.deploy(request("web", "one:1"))
        d2 = self.controller.deploy(request("web", "two:2"))
        self.assertEqual(self.probe.count("one:1"), 1)
        self.assertEqual(self.probe.count("two:2"), 0)
        self.probe.answer("one:1", 200)
        self.successResultOf(d1)
        self.assertEqual(self.probe.count("two:2"), 1)
        self.probe.answer("two:2", 200)
        self.successResultOf(d2)
        self.assertEqual(self.address(), "two:2")

    def test_redeploy_keeps_pause_and_rollout(self) -> None:
        """
        Updating a service keeps its pause state and rollout slot and split.
        """
        self.deployed(request("web", "old:1"))
        self.probe.auto["canary:9"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("canary:9",), (), 10, 10))
        self.controller.rollout_set("web", 50, ("vip",))
        self.successResultOf(self.controller.stop("web", 1, "gone"))
        self.deployed(request("web", "new:2"))
        s = self.router.services["web"]
        self.assertEqual(s.state_name, "stopped")
        self.assertEqual(s.rollout.addresses, ["canary:9"])
        self.assertEqual(s.split.allowlist, ("vip",))
        self.assertEqual(self.select(), Refusal(503, "gone"))

    def test_update_options(self) -> None:
        """
        A redeploy with new hosts moves the service.
        """
        self.deployed(request("web", "aa:1", hosts=["old.com"]))
        self.deployed(request("web", "aa:1", hosts=["new.com"]))
        self.assertIsNone(self.router.match("old.com", "/"))
        self.assertEqual(self.address("new.com"), "aa:1")

    def test_progress(self) -> None:
        """
        A deploy reports its phases.
        """
        self.deployed(request("web", "old:1"))
        phases: list[tuple[str, str]] = []
        held = self.select()
        d = self.controller.deploy(request("web", "new:2"), lambda p, t: phases.append((p, t)))
        self.probe.answer("new:2", 500)
        self.clock.advance(1)
        self.probe.answer("new:2", 200)
        held.release()
        self.successResultOf(d)
        names = [p for p, _ in phases]
        self.assertEqual(names[0], "health")
        self.assertIn(("health-result", "new:2: unexpected status (500)"), phases)
        self.assertIn(("health-result", "new:2: healthy"), phases)
        self.assertIn(("draining", "draining 1 request from old:1"), phases)
        self.assertLess(names.index("switched"), names.index("draining"))
        self.assertEqual(names[-1], "done")


class Recorder:
    """
    Records deploy outcomes, as the metrics do.
    """

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def deploy(self, service: str, outcome: str) -> None:
        self.outcomes.append((service, outcome))


class OutcomeTests(ControllerTestCase):
    """
    Every deploy is logged and counted, whatever its outcome.
    """

    def make_controller(self) -> Controller:
        self.recorder = Recorder()
        return Controller(self.router, self.clock, self.probe, self.store, self.logger,
                          deploys=self.recorder)

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.logger.records if r["msg"] == "Deploy failed"]

    def test_success(self) -> None:
        """
        A deploy that completes is logged with what its drain did and
        counted as a success.
        """
        self.deployed(request("web", "old:1"))
        held = self.select()
        d = self.controller.deploy(request("web", "new:2"))
        self.probe.answer("new:2", 200)
        self.clock.advance(30)
        self.assertTrue(held.released)
        self.assertEqual(self.successResultOf(d).drained, Drained(1, 1))
        record = self.logger.records[-1]
        self.assertEqual((record["msg"], record["drained"], record["cut"]), ("Deployed", 1, 1))
        self.assertEqual(self.recorder.outcomes, [("web", "success"), ("web", "success")])

    def test_failures_logged(self) -> None:
        """
        Invalid requests, conflicts and timeouts are logged as failed deploys,
        naming the service, the targets and the reason, and counted.
        """
        self.deployed(request("a", "aa:1", hosts=["x.com"]))
        self.failureResultOf(self.controller.deploy(request("b", "bad target!")))
        self.failureResultOf(self.controller.deploy(request("b", "bb:1", hosts=["x.com"])))
        d = self.controller.deploy(request("c", "cc:1", deploy_timeout=2))
        self.clock.advance(2)
        self.failureResultOf(d, DeployTimedOut)
        failures = self.failures()
        self.assertEqual([(r["service"], r["targets"], r["level"]) for r in failures],
                         [("b", ["bad target!"], "ERROR"), ("b", ["bb:1"], "ERROR"),
                          ("c", ["cc:1"], "ERROR")])
        self.assertTrue(failures[0]["error"].startswith("invalid target 'bad target!'"))
        self.assertIn("host x.com is served by service a", failures[1]["error"])
        self.assertIn("failed to become healthy within configured timeout (2s)",
                      failures[2]["error"])
        self.assertEqual(self.recorder.outcomes, [("a", "success"), ("b", "failure"),
                                                  ("b", "failure"), ("c", "failure")])

    def test_cancel_during_health_wait(self) -> None:
        """
        Cancelling a deploy while it waits for health stops the new targets'
        checks and changes nothing; it is logged and counted as cancelled.
        """
        self.deployed(request("web", "old:1"))
        before = self.state_bytes()
        d = self.controller.deploy(request("web", "new:2"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.probe.answer("new:2", 200)
        self.clock.advance(60)
        self.assertEqual(self.probe.count("new:2"), 1)
        self.assertEqual(self.address(), "old:1")
        self.assertEqual(self.state_bytes(), before)
        self.assertEqual(self.logger.records[-1]["msg"], "Deploy cancelled")
        self.assertEqual(self.logger.records[-1]["service"], "web")
        self.assertEqual(self.recorder.outcomes[-1], ("web", "cancelled"))
        self.assertEqual(self.failures(), [])

    def test_cancel_while_queued(self) -> None:
        """
        A deploy cancelled while another deploy of its service runs never
        starts checking.
        """
        self.deployed(request("web", "old:1"))
        first = self.controller.deploy(request("web", "one:1"))
        second = self.controller.deploy(request("web", "two:2"))
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.probe.answer("one:1", 200)
        self.successResultOf(first)
        self.assertEqual(self.probe.count("two:2"), 0)
        self.assertEqual(self.address(), "one:1")

    def test_cancel_after_switch(self) -> None:
        """
        Cancelling a deploy after the switch does not stop its drain: the
        Deferred fires when the old target has drained, and the deploy is a
        success.
        """
        self.deployed(request("web", "old:1"))
        held = self.select()
        d = self.controller.deploy(request("web", "new:2"))
        self.probe.answer("new:2", 200)
        self.assertEqual(self.address(), "new:2")
        d.cancel()
        self.assertNoResult(d)
        old = held.target
        self.assertIs(old.state, TargetState.DRAINING)
        held.release()
        self.assertEqual(self.successResultOf(d).drained, Drained(1, 0))
        self.assertEqual(self.recorder.outcomes[-1], ("web", "success"))


class ErrorPagesTests(ControllerTestCase):
    def test_injected_validation(self) -> None:
        """
        The error-page check is injected: a deploy it refuses fails before
        any health check, with its message, and changes nothing.
        """
        from mproxy.errors import ErrorPagesError

        def refuse(options: ServiceOptions) -> None:
            if options.error_pages:
                raise ErrorPagesError(f"unable to load error pages: {options.error_pages}")

        controller = Controller(self.router, self.clock, self.probe, self.store, self.logger,
                                validate_error_pages=refuse)
        req = attrs.evolve(request("web", "aa:1"),
                           options=ServiceOptions(error_pages="/nowhere"))
        f = self.failureResultOf(controller.deploy(req), ErrorPagesError)
        self.assertEqual(str(f.value), "unable to load error pages: /nowhere")
        self.assertEqual((self.probe.calls, self.router.services), ([], {}))


class RefusingCertificates:
    """
    A certificate service that refuses options with a certificate path, and
    records what it is told.
    """

    def __init__(self) -> None:
        self.updated: list[str] = []
        self.removed: list[str] = []

    def validate(self, options: ServiceOptions) -> None:
        from mproxy.errors import CertificateError

        if options.tls_certificate_path:
            raise CertificateError("unable to load certificate")

    def update_service(self, name: str, options: ServiceOptions) -> None:
        self.updated.append(name)

    def remove_service(self, name: str) -> None:
        self.removed.append(name)

    def status(self) -> dict[str, str]:
        return {"a.com": "valid"}


class CertificateTests(ControllerTestCase):
    def make_controller(self) -> Controller:
        self.certs = RefusingCertificates()
        return Controller(self.router, self.clock, self.probe, self.store, self.logger,
                          certificates=self.certs)

    def test_failed_redeploy_keeps_service(self) -> None:
        """
        A redeploy the certificate service refuses fails and leaves the
        service and the state file as they were.
        """
        from mproxy.errors import CertificateError

        self.deployed(request("web", "aa:1", hosts=["a.com"]))
        before = self.state_bytes()
        req = DeployRequest(
            "web", ["bb:1"],
            options=ServiceOptions(hosts=["a.com"], tls_enabled=True,
                                   tls_certificate_path="/nope.pem",
                                   tls_private_key_path="/nope.key"),
        )
        f = self.failureResultOf(self.controller.deploy(req), CertificateError)
        self.assertEqual(str(f.value), "unable to load certificate")
        self.assertEqual(self.address("a.com"), "aa:1")
        self.assertEqual(self.state_bytes(), before)
        self.assertEqual(self.probe.count("bb:1"), 0)

    def test_certificates_told(self) -> None:
        """
        The certificate service hears of deployed and removed services, and
        its status shows in the listing.
        """
        self.deployed(request("web", "aa:1", hosts=["a.com"]))
        self.assertEqual(self.certs.updated, ["web"])
        self.assertEqual(self.controller.list()[0]["certificates"], {"a.com": "valid"})
        self.controller.remove("web")
        self.assertEqual(self.certs.removed, ["web"])


class RolloutTests(ControllerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deployed(request("web", "active:1"))

    def test_unknown_service(self) -> None:
        """
        Rollout commands on an unknown service fail with C{service not found}.
        """
        f = self.failureResultOf(
            self.controller.rollout_deploy("nope", ("cc:1",), (), 10, 10), ServiceNotFound
        )
        self.assertEqual(str(f.value), "service not found: nope")
        self.assertRaises(ServiceNotFound, self.controller.rollout_set, "nope", 10, ())
        self.assertRaises(ServiceNotFound, self.controller.rollout_stop, "nope")

    def test_set_before_deploy(self) -> None:
        """
        A split cannot be set before a rollout deploy.
        """
        with self.assertRaises(RolloutNotSet) as cm:
            self.controller.rollout_set("web", 10, ())
        self.assertEqual(str(cm.exception), "rollout target not set")

    def test_rollout_flow(self) -> None:
        """
        Rollout deploy fills the rollout slot after health; a split routes
        cookie-carrying requests to it; stopping the rollout sends everything
        back to the active slot.
        """
        d = self.controller.rollout_deploy("web", ("canary:2",), (), 10, 10)
        self.assertNoResult(d)
        self.probe.answer("canary:2", 200)
        self.assertEqual(self.successResultOf(d).targets, ("canary:2",))
        self.assertEqual(self.saved()[0]["rollout_targets"], ["canary:2"])
        # No split yet.
        self.assertEqual(self.address(), "active:1")

        def rollout_cookie(name: bytes) -> bytes | None:
            return b"vip" if name == b"mproxy-rollout" else None

        self.controller.rollout_set("web", 0, ("vip",))
        self.assertEqual(self.saved()[0]["rollout_split"],
                         {"percentage": 0, "allowlist": ["vip"]})
        c = self.select(cookie=rollout_cookie)
        self.assertEqual(c.target.address, "canary:2")
        c.release()
        self.assertEqual(self.address(), "active:1")
        self.controller.rollout_stop("web")
        self.assertIsNone(self.saved()[0]["rollout_split"])
        c = self.select(cookie=rollout_cookie)
        self.assertEqual(c.target.address, "active:1")
        # The rollout targets stay installed.
        self.assertEqual(self.saved()[0]["rollout_targets"], ["canary:2"])

    def test_rollout_timeout(self) -> None:
        """
        An unhealthy rollout target times out and leaves the slot empty.
        """
        d = self.controller.rollout_deploy("web", ("canary:2",), (), 3, 10)
        self.clock.advance(3)
        self.failureResultOf(d, DeployTimedOut)
        self.assertIsNone(self.router.services["web"].rollout)

    def test_rollout_redeploy_drains(self) -> None:
        """
        Replacing the rollout deployment drains the previous one.
        """
        self.probe.auto["c1:1"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("c1:1",), (), 10, 10))
        self.controller.rollout_set("web", 100, ())
        held = self.select(cookie=lambda n: b"x" if n == b"mproxy-rollout" else None)
        self.assertEqual(held.target.address, "c1:1")
        d = self.controller.rollout_deploy("web", ("c2:2",), (), 10, 10)
        self.probe.answer("c2:2", 200)
        self.assertNoResult(d)
        held.release()
        self.successResultOf(d)

    def test_service_removed_during_rollout_wait(self) -> None:
        """
        A service removed while its rollout deploy waits for health fails the
        rollout with C{service not found}, and nothing is re-created.
        """
        d = self.controller.rollout_deploy("web", ("canary:2",), (), 10, 10)
        self.controller.remove("web")
        self.probe.answer("canary:2", 200)
        f = self.failureResultOf(d, ServiceNotFound)
        self.assertEqual(str(f.value), "service not found: web")
        self.assertEqual(self.router.services, {})
        n = self.probe.count("canary:2")
        self.clock.advance(10)
        self.assertEqual(self.probe.count("canary:2"), n)

    def test_rollout_values_checked_by_server(self) -> None:
        """
        Rollout deploys and splits are checked by the controller itself:
        malformed and duplicate targets, zero deploy timeouts, percentages
        outside 0-100.
        """
        f = self.failureResultOf(
            self.controller.rollout_deploy("web", ("c:1",), (), 10, 10), InvalidTarget
        )
        self.assertIn("invalid target 'c:1'", str(f.value))
        f = self.failureResultOf(
            self.controller.rollout_deploy("web", ("cc:1",), (), 0, 10), InvalidOptions
        )
        self.assertEqual(str(f.value), "deploy-timeout must be greater than zero")
        d = self.controller.rollout_deploy("web", ("cc:1", "cc:1"), (), 10, 10)
        self.probe.answer("cc:1", 200)
        self.assertEqual(self.successResultOf(d).targets, ("cc:1",))
        for bad in (-1, 101):
            with self.assertRaises(InvalidOptions) as cm:
                self.controller.rollout_set("web", bad, ())
            self.assertEqual(str(cm.exception), "percent must be between 0 and 100")

    def test_rollout_requires_targets(self) -> None:
        """
        A rollout deploy needs targets, valid ones.
        """
        self.failureResultOf(self.controller.rollout_deploy("web", (), (), 1, 1), InvalidOptions)
        self.failureResultOf(
            self.controller.rollout_deploy("web", ("bad target!",), (), 1, 1), InvalidTarget
        )


class RemoveTests(ControllerTestCase):
    def test_remove(self) -> None:
        """
        Removing a service takes it out of routing at once, stops its checks
        and saves.
        """
        self.deployed(request("web", "aa:1", "bb:2"))
        self.controller.remove("web")
        self.assertIsNone(self.router.match("h", "/"))
        self.assertEqual(self.saved(), [])
        n = len(self.probe.calls)
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), n)

    def test_remove_unknown(self) -> None:
        """
        Removing an unknown service fails with C{service not found}.
        """
        self.assertRaises(ServiceNotFound, self.controller.remove, "nope")

    def test_remove_does_not_wait(self) -> None:
        """
        Requests in flight are neither waited for nor cancelled.
        """
        self.deployed(request("web", "aa:1"))
        c = self.select()
        self.controller.remove("web")
        self.assertFalse(c.released)
        c.release()

    def test_redeploy_after_remove(self) -> None:
        """
        A removed service's hosts are free again.
        """
        self.deployed(request("a", "aa:1", hosts=["x.com"]))
        self.controller.remove("a")
        self.deployed(request("b", "bb:1", hosts=["x.com"]))
        self.assertEqual(self.address("x.com"), "bb:1")


class PauseTests(ControllerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deployed(request("web", "aa:1"))

    def test_pause_resume(self) -> None:
        """
        Pause waits for in-flight requests, holds new ones, and resume lets
        them through.
        """
        inflight = self.select()
        d = self.controller.pause("web", 30, 60)
        self.assertEqual(self.saved()[0]["pause"]["state"], 1)
        held = self.select()
        self.assertNoResult(held)
        self.assertNoResult(d)
        inflight.release()
        self.successResultOf(d)
        self.assertEqual(self.controller.list()[0]["state"], "paused")
        self.controller.resume("web")
        self.assertEqual(self.saved()[0]["pause"]["state"], 0)
        c = self.successResultOf(held)
        self.assertEqual(c.target.address, "aa:1")
        c.release()
        self.assertEqual(self.address(), "aa:1")

    def test_pause_drain_timeout(self) -> None:
        """
        A request still running at the pause's drain deadline is cancelled,
        and the target serves again after resume.
        """
        inflight = self.select()
        d = self.controller.pause("web", 2, 60)
        self.clock.advance(2)
        self.successResultOf(d)
        self.assertTrue(inflight.released)
        self.controller.resume("web")
        self.assertEqual(self.address(), "aa:1")

    def test_stop(self) -> None:
        """
        Stop answers 503 with the message, releases held requests, and the
        health path still answers 200.
        """
        self.successResultOf(self.controller.pause("web", 1, 60))
        held = self.select()
        self.successResultOf(self.controller.stop("web", 1, "down for maintenance"))
        self.assertEqual(self.successResultOf(held), Refusal(503, "down for maintenance"))
        self.assertEqual(self.select(), Refusal(503, "down for maintenance"))
        self.assertEqual(self.select(path="/up"), HEALTH_OK)
        saved = self.saved()[0]["pause"]
        self.assertEqual((saved["state"], saved["stop_message"]), (2, "down for maintenance"))
        self.controller.resume("web")
        self.assertEqual(self.address(), "aa:1")

    def test_unknown(self) -> None:
        """
        Pause, stop and resume of an unknown service fail with
        C{service not found}.
        """
        self.failureResultOf(self.controller.pause("nope", 1, 1), ServiceNotFound)
        self.failureResultOf(self.controller.stop("nope", 1, ""), ServiceNotFound)
        self.assertRaises(ServiceNotFound, self.controller.resume, "nope")

    def test_pause_drains_rollout_in_parallel(self) -> None:
        """
        Pause drains the active and rollout deployments together: the command
        takes at most the drain timeout.
        """
        self.probe.auto["cc:2"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("cc:2",), (), 10, 10))
        s = self.router.services["web"]
        a = s.active.claim(False)
        r = s.rollout.claim(False)
        d = self.controller.stop("web", 5, "")
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertTrue(a.released)
        self.assertTrue(r.released)

    def test_negative_durations(self) -> None:
        """
        Negative drain timeouts and max pauses are refused by the controller.
        """
        f = self.failureResultOf(self.controller.pause("web", -1, 1), InvalidOptions)
        self.assertEqual(str(f.value), "drain-timeout must not be negative")
        f = self.failureResultOf(self.controller.pause("web", 1, -1), InvalidOptions)
        self.assertEqual(str(f.value), "max-pause must not be negative")
        self.failureResultOf(self.controller.stop("web", -1, ""), InvalidOptions)
        self.assertEqual(self.router.services["web"].state_name, "running")

    def test_max_pause(self) -> None:
        """
        The max pause given to the command applies to held requests.
        """
        self.successResultOf(self.controller.pause("web", 1, 5))
        held = self.select()
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(held), PAUSE_EXPIRED)


class ListTests(ControllerTestCase):
    def test_list(self) -> None:
        """
        The listing is sorted by name, with hosts, paths, targets, state, TLS.
        """
        self.deployed(request("zeta", "zz:1", readers=("rr:2",)))
        self.deployed(request("alpha", "aa:1", hosts=["a.com", "b.com"],
                              prefixes=["/api", "/app"]))
        rows = self.controller.list()
        self.assertEqual([r["service"] for r in rows], ["alpha", "zeta"])
        self.assertEqual(rows[0]["hosts"], ["a.com", "b.com"])
        self.assertEqual(rows[0]["paths"], ["/api", "/app"])
        self.assertEqual(rows[1]["hosts"], [])
        self.assertEqual(rows[1]["paths"], ["/"])
        self.assertEqual(rows[1]["targets"], ["zz:1", "rr:2"])
        self.assertEqual(rows[1]["state"], "running")
        self.assertFalse(rows[1]["tls"])
        json.dumps(rows)

    def test_empty(self) -> None:
        """
        No services, an empty list.
        """
        self.assertEqual(self.controller.list(), [])

    def test_target_health(self) -> None:
        """
        C{target_health} (the metrics' source) gives every target of both
        slots with whether it is healthy.
        """
        self.deployed(request("web", "aa:1", "bb:2"))
        self.router.services["web"].active.targets[1].eject("refused")
        self.assertEqual(self.controller.target_health(),
                         [("web", "aa:1", True), ("web", "bb:2", False)])

    def test_health_and_rollout(self) -> None:
        """
        Each row shows every target's health, and the rollout slot with its
        targets, their health, the percentage and the allowlist.
        """
        self.deployed(request("web", "aa:1", "bb:2"))
        self.probe.auto["bb:2"] = 500
        self.clock.advance(1)
        self.clock.advance(1)
        row = self.controller.list()[0]
        self.assertEqual(row["health"], {"aa:1": "healthy", "bb:2": "unhealthy"})
        self.assertEqual(row["target_health"], {
            "aa:1": {"health": "healthy", "since": "1970-01-01T00:00:00Z",
                     "last_error": ""},
            "bb:2": {"health": "unhealthy", "since": "1970-01-01T00:00:02Z",
                     "last_error": "unexpected status (500)"},
        })
        self.assertIsNone(row["rollout"])
        self.probe.auto["cc:1"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("cc:1",)))
        self.assertEqual(self.controller.list()[0]["rollout"],
                         {"targets": ["cc:1"], "health": {"cc:1": "healthy"},
                          "target_health": {"cc:1": {"health": "healthy",
                                                     "since": "1970-01-01T00:00:02Z",
                                                     "last_error": ""}},
                          "percent": None, "allowlist": []})
        self.controller.rollout_set("web", 25, ("vip",))
        rollout = self.controller.list()[0]["rollout"]
        self.assertEqual((rollout["percent"], rollout["allowlist"]), (25, ["vip"]))


class StateTests(ControllerTestCase):
    def restored(self) -> tuple[Router, Controller, FakeProbe]:
        router = Router()
        probe = FakeProbe()
        controller = Controller(router, self.clock, probe, StateStore(self.state_path),
                                ListLogger())
        controller.restore()
        return router, controller, probe

    def test_saved_after_every_change(self) -> None:
        """
        Deploy, rollout, pause, stop, resume and remove each save the state.
        """
        steps: list[Callable[[], object]] = [
            lambda: self.deployed(request("web", "aa:1", hosts=["x.com"])),
            lambda: self.deployed(request("web", "bb:1", hosts=["x.com"])),
            lambda: self.successResultOf(
                self.controller.rollout_deploy("web", ("cc:1",), (), 10, 10)),
            lambda: self.controller.rollout_set("web", 10, ()),
            lambda: self.controller.rollout_stop("web"),
            lambda: self.successResultOf(self.controller.pause("web", 1, 1)),
            lambda: self.successResultOf(self.controller.stop("web", 1, "m")),
            lambda: self.controller.resume("web"),
            lambda: self.controller.remove("web"),
        ]
        self.probe.auto["cc:1"] = 200
        for step in steps:
            before = self.state_bytes()
            if before is not None:
                os.remove(self.state_path)
            step()
            self.assertIsNotNone(self.state_bytes())

    def test_restore_missing(self) -> None:
        """
        Without a state file nothing is restored.
        """
        router, controller, _ = self.restored()
        self.assertEqual(router.services, {})

    def test_restore_serves_at_once(self) -> None:
        """
        Restored targets serve at once, without waiting for a probe; health
        checks run for every target, a lone one too.
        """
        self.deployed(request("web", "aa:1", hosts=["x.com"], prefixes=["/app"]))
        self.deployed(request("multi", "m1:1", "m2:2", readers=("r1:3",)))
        router, controller, probe = self.restored()
        self.assertEqual(sorted(router.services), ["multi", "web"])
        c = router.match("x.com", "/app/y").service.select(b"GET", "/y", cookie_none, False)
        self.assertEqual(c.target.address, "aa:1")
        m = router.match("other", "/").service
        self.assertIsInstance(m.select(b"POST", "/", cookie_none, False), Claim)
        self.assertEqual(m.active.addresses, ["m1:1", "m2:2", "r1:3"])
        self.assertEqual(m.options.hosts, ("",))
        self.assertTrue(m.active.all_healthy())
        self.assertEqual(probe.count("m1:1"), 1)
        self.assertEqual(probe.count("aa:1"), 1)
        probe.answer("aa:1", 200)
        probe.answer("m1:1", 200)
        probe.answer("m2:2", 200)
        probe.answer("r1:3", 200)
        self.clock.advance(1)
        self.assertEqual(probe.count("aa:1"), 2)
        self.assertEqual(probe.count("m1:1"), 2)
        controller.shutdown()
        controller.shutdown()

    def test_restore_options(self) -> None:
        """
        Service and target options come back as they were.
        """
        req = DeployRequest(
            "web", ["aa:1"],
            options=ServiceOptions(hosts=["a.com"], path_prefixes=["/x"], strip_prefix=False,
                                   writer_affinity_timeout=3),
            target_options=TargetOptions(
                health_check=HealthCheckConfig(path="/hc", interval=2),
                buffer_requests=True, max_request_body=99, forward_headers=False),
        )
        self.deployed(req)
        router, _, _ = self.restored()
        s = router.services["web"]
        self.assertEqual(s.options, req.options)
        self.assertEqual(s.target_options, req.target_options)

    def test_restore_inherited_tls(self) -> None:
        """
        Path services that inherited TLS from their host's root service (and
        were saved so) restore, and still inherit.
        """
        self.deployed(DeployRequest(
            "root", ["rr:1"], options=ServiceOptions(hosts=["a.com"], tls_enabled=True)))
        self.deployed(request("api", "aa:1", hosts=["a.com"], prefixes=["/api"]))
        self.deployed(DeployRequest(
            "ondemand", ["oo:1"],
            options=ServiceOptions(tls_enabled=True, tls_on_demand_url="/allow")))
        self.deployed(request("any", "bb:1", prefixes=["/any"]))
        self.assertTrue(self.router.services["api"].options.tls_enabled)
        self.assertTrue(self.router.services["any"].options.tls_enabled)
        router, _, _ = self.restored()
        self.assertEqual(sorted(router.services), ["any", "api", "ondemand", "root"])
        self.assertTrue(router.services["api"].options.tls_enabled)
        self.assertTrue(router.services["any"].options.tls_enabled)

    def test_restore_paused(self) -> None:
        """
        A paused service comes back paused, holds requests, and can be resumed
        like a freshly paused one.
        """
        self.deployed(request("web", "aa:1"))
        self.successResultOf(self.controller.pause("web", 1, 45))
        router, controller, _ = self.restored()
        s = router.services["web"]
        self.assertEqual(s.state_name, "paused")
        self.assertEqual(s.pause.max_pause, 45)
        held = s.select(b"GET", "/", cookie_none, False)
        self.assertNoResult(held)
        self.assertEqual(s.select(b"GET", "/up", cookie_none, False), HEALTH_OK)
        controller.resume("web")
        self.assertEqual(self.successResultOf(held).target.address, "aa:1")

    def test_restore_paused_expiry(self) -> None:
        """
        Requests held by a restored pause expire after the saved max pause.
        """
        self.deployed(request("web", "aa:1"))
        self.successResultOf(self.controller.pause("web", 1, 45))
        router, controller, _ = self.restored()
        held = router.services["web"].select(b"GET", "/", cookie_none, False)
        self.clock.advance(45)
        self.assertEqual(self.successResultOf(held), PAUSE_EXPIRED)

    def test_restore_stopped(self) -> None:
        """
        A stopped service comes back stopped with its message.
        """
        self.deployed(request("web", "aa:1"))
        self.successResultOf(self.controller.stop("web", 1, "bye"))
        router, _, _ = self.restored()
        self.assertEqual(router.services["web"].select(b"GET", "/", cookie_none, False),
                         Refusal(503, "bye"))

    def test_restore_rollout(self) -> None:
        """
        The rollout slot and split come back, serving at once.
        """
        self.deployed(request("web", "aa:1"))
        self.probe.auto["cc:2"] = 200
        self.probe.auto["cr:3"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("cc:2",), ("cr:3",), 10, 10))
        self.controller.rollout_set("web", 100, ("vip",))
        router, _, _ = self.restored()
        s = router.services["web"]
        self.assertEqual(s.rollout.addresses, ["cc:2", "cr:3"])
        self.assertEqual((s.split.percentage, s.split.allowlist), (100, ("vip",)))
        c = s.select(b"POST", "/", lambda n: b"u" if n == b"mproxy-rollout" else None, False)
        self.assertEqual(c.target.address, "cc:2")

    def test_restore_then_deploy(self) -> None:
        """
        A restored service can be redeployed: the restored targets drain.
        """
        self.deployed(request("web", "aa:1"))
        router, controller, probe = self.restored()
        held = router.match("h", "/").service.select(b"GET", "/", cookie_none, False)
        d = controller.deploy(request("web", "bb:2"))
        probe.answer("bb:2", 200)
        self.assertNoResult(d)
        held.release()
        self.successResultOf(d)

    def assert_state_error(self, content: bytes | None, *expected: str) -> None:
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        if content is not None:
            with open(self.state_path, "wb") as f:
                f.write(content)
        router = Router()
        controller = Controller(router, self.clock, self.probe, StateStore(self.state_path),
                                ListLogger())
        with self.assertRaises(StateError) as cm:
            controller.restore()
        self.assertIn(self.state_path, str(cm.exception))
        for text in expected:
            self.assertIn(text, str(cm.exception))
        self.assertEqual(router.services, {})
        if content is not None:
            self.assertEqual(self.state_bytes(), content)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_corrupt(self) -> None:
        """
        A state file that is not JSON is a L{StateError} naming the file; the
        file is left alone.
        """
        self.assert_state_error(b"{not json", "corrupt")
        self.assert_state_error(b"\xff\xfe", "corrupt")
        self.assert_state_error(b'"a string"', "corrupt")
        self.assert_state_error(b'[{"no": "name"}]', "corrupt")

    def test_unreadable(self) -> None:
        """
        A state file that cannot be read is a L{StateError} naming the file.
        """
        os.makedirs(self.state_path)
        self.assert_state_error(None, "cannot read")

    def record(self, **changes: Any) -> bytes:
        self.deployed(request("web", "aa:1"))
        self.deployed(request("other", "oo:1", hosts=["o.com"]))
        with open(self.state_path) as f:
            data = json.load(f)
        os.remove(self.state_path)
        self.controller.shutdown()
        self.router.services.clear()
        data["services"][1].update(changes)
        return json.dumps(data).encode()

    def test_invalid_options(self) -> None:
        """
        A record with invalid options is a L{StateError} and nothing at all is
        restored.
        """
        self.assert_state_error(
            self.record(options={"tls_enabled": True}), "host must be set when using TLS"
        )

    def test_invalid_targets(self) -> None:
        """
        Invalid or missing targets are a L{StateError}.
        """
        self.assert_state_error(self.record(active_targets=["bad target!"]), "invalid target")

    def test_missing_targets(self) -> None:
        """
        A record without active targets is a L{StateError}.
        """
        self.assert_state_error(self.record(active_targets=[]))

    def test_invalid_rollout_targets(self) -> None:
        """
        Invalid rollout targets are a L{StateError}, with nothing restored.
        """
        self.assert_state_error(self.record(rollout_targets=["bad target!"]), "invalid target")

    def test_invalid_pause_state(self) -> None:
        """
        An unknown pause state is a L{StateError}, with nothing restored.
        """
        self.assert_state_error(self.record(pause={"state": 7}))

    def test_invalid_split(self) -> None:
        """
        A malformed rollout split is a L{StateError}, with nothing restored.
        """
        self.assert_state_error(self.record(rollout_targets=["cc:1"], rollout_split=[1, 2]))
        self.assert_state_error(
            self.record(rollout_targets=["cc:1"], rollout_split={"percentage": "lots"})
        )

    def test_invalid_options_type(self) -> None:
        """
        Options of the wrong type are a L{StateError}.
        """
        self.assert_state_error(self.record(options=["x"]))
        self.assert_state_error(self.record(target_options={"health_check": "/up"}))
        self.assert_state_error(self.record(pause="paused"))

    def test_failed_save_switches_nothing(self) -> None:
        """
        When the new state cannot be written, the deploy fails before the
        switch: the old targets keep serving (and draining nothing), the new
        ones stop being checked, and the file still holds the old state, so
        a restart serves what is serving now.
        """
        self.deployed(request("web", "o1:1", "o2:2"))
        before = self.state_bytes()
        self.controller.store = FailingStore(self.state_path)
        d = self.controller.deploy(request("web", "n1:1", "n2:2"))
        self.probe.answer("n1:1", 200)
        self.probe.answer("n2:2", 200)
        f = self.failureResultOf(d, StateError)
        self.assertEqual(
            str(f.value),
            f"cannot write state file {self.state_path}: No space left on device; "
            "nothing was changed",
        )
        self.assertEqual(self.address(method=b"POST")[:1], "o")
        self.assertEqual(self.router.services["web"].active.addresses, ["o1:1", "o2:2"])
        self.clock.advance(10)
        self.assertEqual((self.probe.count("n1:1"), self.probe.count("n2:2")), (1, 1))
        self.assertEqual(self.state_bytes(), before)
        self.assertEqual(self.logger.records[-1]["msg"], "Deploy failed")

    def test_failed_save_changes_nothing(self) -> None:
        """
        Every other command that changes a service fails the same way and
        changes nothing when its new state cannot be written.
        """
        self.deployed(request("web", "aa:1"))
        self.probe.auto["cc:1"] = 200
        self.successResultOf(self.controller.rollout_deploy("web", ("cc:1",)))
        self.controller.rollout_set("web", 10, ())
        s = self.router.services["web"]
        self.controller.store = FailingStore(self.state_path)
        self.assertRaises(StateError, self.controller.remove, "web")
        self.assertIs(self.router.services["web"], s)
        self.assertRaises(StateError, self.controller.rollout_set, "web", 50, ())
        self.assertRaises(StateError, self.controller.rollout_stop, "web")
        self.assertEqual(s.split.percentage, 10)
        self.failureResultOf(self.controller.pause("web"), StateError)
        self.failureResultOf(self.controller.stop("web"), StateError)
        self.assertEqual(s.state_name, "running")
        d = self.controller.rollout_deploy("web", ("dd:1",))
        self.probe.answer("dd:1", 200)
        self.failureResultOf(d, StateError)
        self.assertEqual(s.rollout.addresses, ["cc:1"])
        self.controller.store = self.store
        self.successResultOf(self.controller.pause("web"))
        self.controller.store = FailingStore(self.state_path)
        self.assertRaises(StateError, self.controller.resume, "web")
        self.assertEqual(s.state_name, "paused")

    def test_no_store(self) -> None:
        """
        A controller without a store neither saves nor restores.
        """
        c = Controller(Router(), self.clock, self.probe, None, ListLogger())
        self.assertEqual(c.restore(), 0)
        self.probe.auto["aa:1"] = 200
        self.successResultOf(c.deploy(request("web", "aa:1")))
        self.assertIsNone(self.state_bytes())

    def test_save_failure(self) -> None:
        """
        A state file that cannot be written is logged as an error and the
        command fails with a L{StateError} naming the file.
        """
        os.makedirs(self.state_path)
        self.probe.auto["aa:1"] = 200
        f = self.failureResultOf(self.controller.deploy(request("web", "aa:1")), StateError)
        self.assertIn(f"cannot write state file {self.state_path}", str(f.value))
        self.assertIn("Unable to save state", self.logger.messages())
        self.assertEqual(self.router.services, {})


class ServiceCloseTests(ControllerTestCase):
    def test_shutdown_stops_checks(self) -> None:
        """
        Shutdown stops every health check.
        """
        self.deployed(request("web", "aa:1", "bb:2"))
        self.controller.shutdown()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_service_type(self) -> None:
        """
        Installed services are L{Service} objects named after the request.
        """
        self.deployed(request("web", "aa:1"))
        self.assertIsInstance(self.router.services["web"], Service)


class OnDemandListingTests(SynchronousTestCase):
    """
    An on-demand TLS service lists the certificates of the names it approved.
    """

    def test_on_demand_certificates_listed(self) -> None:
        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        from mproxy.controller import Controller
        from mproxy.logging import ListLogger
        from mproxy.router import Router
        from mproxy.spec import DeployRequest, ServiceOptions

        class Certs:
            def validate(self, options: object) -> None:
                pass

            def update_service(self, name: str, options: object) -> None:
                pass

            def remove_service(self, name: str) -> None:
                pass

            def status(self) -> dict[str, str]:
                return {"shop.test": "valid until X", "app.test": "pending"}

        clock = Clock()
        c = Controller(Router(), clock, lambda t, cfg: succeed(200), None, ListLogger(),
                       certificates=Certs())
        self.successResultOf(c.deploy(DeployRequest(
            "app", ("web:1",), options=ServiceOptions(hosts=["app.test"], tls_enabled=True))))
        self.successResultOf(c.deploy(DeployRequest(
            "tenants", ("web:2",),
            options=ServiceOptions(tls_enabled=True, tls_on_demand_url="/allow"))))
        rows = {r["service"]: r for r in c.list()}
        self.assertEqual(rows["app"]["certificates"], {"app.test": "pending"})
        self.assertEqual(rows["tenants"]["certificates"], {"shop.test": "valid until X"})
