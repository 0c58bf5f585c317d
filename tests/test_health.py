"""
Tests for L{mproxy.health}: the checker's schedule on an injected clock, its
verdicts, target state transitions, and the real HTTP probe on a memory
reactor.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.test.test_endpoints import deterministicResolvingReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.logging import ListLogger
from mproxy.health import (
    UNHEALTHY_AFTER,
    HealthChecker,
    UnexpectedStatus,
    describe_failure,
    health_url,
    http_probe,
)
from mproxy.spec import HealthCheckConfig
from mproxy.target import Target, TargetState


class FakeProbe:
    """
    A probe whose answers the test gives by hand.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Target, Deferred[int]]] = []
        self.cancelled = 0

    def __call__(self, target: Target, config: HealthCheckConfig) -> Deferred[int]:
        def cancel(d: Deferred[int]) -> None:
            self.cancelled += 1

        d: Deferred[int] = Deferred(cancel)
        self.calls.append((target, d))
        return d

    def answer(self, code: int, index: int = -1) -> None:
        self.calls[index][1].callback(code)

    def fail(self, exc: Exception, index: int = -1) -> None:
        self.calls[index][1].errback(exc)

    def pending(self) -> int:
        return sum(1 for _, d in self.calls if not d.called)


CONFIG = HealthCheckConfig(path="/up", interval=1.0, timeout=5.0)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()
        self.target = Target("web:3000", self.clock)
        self.reports: list[tuple[bool, str]] = []

    def checker(self, config: HealthCheckConfig = CONFIG) -> HealthChecker:
        c = HealthChecker(
            self.target, config, self.clock, self.probe,
            lambda t, ok, err: self.reports.append((ok, err)),
        )
        c.start()
        return c

    def test_first_probe_at_once_then_interval(self) -> None:
        """
        The first probe is sent at once, the next one an interval later.
        """
        self.checker()
        self.assertEqual(len(self.probe.calls), 1)
        self.probe.answer(200)
        self.clock.advance(0.99)
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.probe.calls), 2)
        self.probe.answer(204)
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 3)
        self.assertEqual(self.reports, [(True, ""), (True, "")])

    def test_timeout(self) -> None:
        """
        A probe not answered within the timeout fails with C{request timed out}
        and is cancelled.
        """
        self.checker()
        self.clock.advance(4.9)
        self.assertEqual(self.reports, [])
        self.clock.advance(0.1)
        self.assertEqual(self.reports, [(False, "request timed out")])
        self.assertEqual(self.probe.cancelled, 1)
        self.assertIs(self.target.state, TargetState.ADDING)
        # The next probe follows an interval later.
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 2)

    def test_unexpected_status(self) -> None:
        """
        A status outside 2xx is a failure naming the status.
        """
        self.checker()
        self.probe.answer(500)
        self.clock.advance(1)
        self.probe.answer(301)
        self.clock.advance(1)
        self.probe.answer(299)
        self.assertEqual(
            self.reports,
            [(False, "unexpected status (500)"), (False, "unexpected status (301)"), (True, "")],
        )

    def test_connection_error(self) -> None:
        """
        A connection error is a failure with a readable message.
        """
        self.checker()
        self.probe.fail(ConnectionRefusedError())
        ok, err = self.reports[0]
        self.assertFalse(ok)
        self.assertIn("Connection was refused", err)

    def test_probe_raises(self) -> None:
        """
        A probe function that raises counts as a failed check, and checking
        goes on.
        """

        def probe(target: Target, config: HealthCheckConfig) -> Deferred[int]:
            raise OSError("no route")

        c = HealthChecker(self.target, CONFIG, self.clock, probe,
                          lambda t, ok, err: self.reports.append((ok, err)))
        c.start()
        self.assertEqual(self.reports, [(False, "no route")])
        self.clock.advance(1)
        self.assertEqual(len(self.reports), 2)
        c.stop()

    def test_adding_to_healthy(self) -> None:
        """
        Failures while adding change nothing; the first success makes the
        target healthy.
        """
        self.checker()
        self.probe.answer(503)
        self.assertIs(self.target.state, TargetState.ADDING)
        self.clock.advance(1)
        self.probe.answer(200)
        self.assertIs(self.target.state, TargetState.HEALTHY)

    def test_healthy_unhealthy_healthy(self) -> None:
        """
        A healthy target becomes unhealthy after UNHEALTHY_AFTER consecutive
        failed checks, and healthy again after one passing check; the state's
        time and the last error are kept.
        """
        self.assertEqual(UNHEALTHY_AFTER, 2)
        self.checker()
        self.probe.answer(200)
        self.assertEqual(self.target.since, 0)
        self.clock.advance(1)
        self.probe.answer(500)
        self.assertIs(self.target.state, TargetState.HEALTHY)
        self.assertEqual(self.target.last_error, "unexpected status (500)")
        self.clock.advance(1)
        self.probe.fail(ConnectionRefusedError())
        self.assertIs(self.target.state, TargetState.UNHEALTHY)
        self.assertEqual(self.target.since, 2)
        self.assertIn("refused", self.target.last_error)
        self.clock.advance(1)
        self.probe.fail(ConnectionRefusedError())
        self.assertIs(self.target.state, TargetState.UNHEALTHY)
        self.clock.advance(1)
        self.probe.answer(200)
        self.assertIs(self.target.state, TargetState.HEALTHY)
        self.assertEqual(self.target.since, 4)
        self.assertIn("refused", self.target.last_error)

    def test_one_failure_between_passes_keeps_healthy(self) -> None:
        """
        A single failed check between passing ones does not take the target
        out: the failures must be consecutive.
        """
        self.checker()
        self.probe.answer(200)
        for _ in range(5):
            self.clock.advance(1)
            self.probe.answer(500)
            self.clock.advance(1)
            self.probe.answer(200)
        self.assertIs(self.target.state, TargetState.HEALTHY)
        self.assertEqual(self.target.since, 0)

    def test_keeps_checking_while_healthy(self) -> None:
        """
        Checks go on for as long as the checker runs, healthy or not.
        """
        c = self.checker()
        for _ in range(10):
            self.probe.answer(200)
            self.clock.advance(1)
        self.assertTrue(c.running)
        self.assertEqual(len(self.probe.calls), 11)

    def test_ejected_target_back_after_one_pass(self) -> None:
        """
        A target the data plane ejected is unhealthy at once, with the
        reason, and the next passing check brings it back.
        """
        self.checker()
        self.probe.answer(200)
        self.clock.advance(0.5)
        self.assertTrue(self.target.eject("connection refused"))
        self.assertFalse(self.target.eject("again"))
        self.assertIs(self.target.state, TargetState.UNHEALTHY)
        self.assertEqual((self.target.since, self.target.last_error),
                         (0.5, "connection refused"))
        self.clock.advance(0.5)
        self.probe.answer(200)
        self.assertIs(self.target.state, TargetState.HEALTHY)

    def test_adding_not_ejected(self) -> None:
        """
        Only a healthy target is ejected: a target still being added or
        draining keeps its state.
        """
        self.assertFalse(self.target.eject("refused"))
        self.assertIs(self.target.state, TargetState.ADDING)
        self.target.set_state(TargetState.HEALTHY)
        claim = self.target.claim()
        self.target.drain(1)
        self.assertFalse(self.target.eject("refused"))
        self.assertIs(self.target.state, TargetState.DRAINING)
        claim.release()

    def test_stop_cancels_inflight(self) -> None:
        """
        Stopping cancels the probe in flight and schedules nothing more, and
        reports nothing.
        """
        c = self.checker()
        c.stop()
        self.assertEqual(self.probe.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.reports, [])
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), 1)

    def test_stop_between_probes(self) -> None:
        """
        Stopping while waiting for the next tick cancels the tick.
        """
        c = self.checker()
        self.probe.answer(200)
        c.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), 1)

    def test_cancelled_probe_not_reported(self) -> None:
        """
        The cancelled probe's failure neither changes the target nor is
        reported, and a later timeout of it does nothing.
        """
        c = self.checker()
        d = self.probe.calls[0][1]
        c.stop()
        # Cancelling a Deferred whose canceller does not fire it errbacks it.
        self.assertTrue(d.called)
        self.clock.advance(10)
        self.assertIs(self.target.state, TargetState.ADDING)
        self.assertEqual(self.reports, [])

    def test_slow_probe_no_overlap(self) -> None:
        """
        A probe still running when the next one is due delays it: probes never
        overlap.
        """
        config = HealthCheckConfig(interval=1.0, timeout=10.0)
        self.checker(config)
        self.clock.advance(3.5)
        self.assertEqual(len(self.probe.calls), 1)
        self.assertEqual(self.probe.pending(), 1)
        self.probe.answer(200)
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 2)
        self.assertEqual(self.probe.pending(), 1)

    def test_draining_not_changed_by_success(self) -> None:
        """
        A success does not take a target out of C{draining}.
        """
        c = self.checker()
        self.target.set_state(TargetState.HEALTHY)
        claim = self.target.claim()
        self.target.drain(30)
        self.probe.answer(200)
        self.assertIs(self.target.state, TargetState.DRAINING)
        claim.release()
        c.stop()


class BalancerHealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()

    def probes_for(self, address: str) -> list[Deferred[int]]:
        return [d for t, d in self.probe.calls if t.address == address]

    def test_single_writer_keeps_checking(self) -> None:
        """
        A lone target is checked for as long as it is deployed: when it dies
        it leaves rotation (no target: the 503 page) and comes back.
        """
        lb = LoadBalancer(["aa:1"], [], self.clock)
        lb.start_health_checks(CONFIG, self.probe)
        self.probe.answer(200)
        self.assertTrue(lb.all_healthy())
        for _ in range(UNHEALTHY_AFTER):
            self.clock.advance(1)
            self.probe.fail(ConnectionRefusedError())
        self.assertIsNone(lb.claim(False))
        self.clock.advance(1)
        self.probe.answer(200)
        self.assertIsNotNone(lb.claim(False))
        lb.stop_health_checks()

    def test_single_writer_already_healthy(self) -> None:
        """
        A restored lone target serves at once and is checked from then on.
        """
        lb = LoadBalancer(["aa:1"], [], self.clock)
        lb.mark_all_healthy()
        lb.start_health_checks(CONFIG, self.probe)
        self.assertIsNotNone(lb.claim(False))
        self.assertEqual(len(self.probe.calls), 1)
        lb.stop_health_checks()

    def test_transitions_logged_once(self) -> None:
        """
        The log has one line per transition, not one per failed check, once
        the target has served; while a deploy adds it, each failure is
        logged.
        """
        logger = ListLogger()
        lb = LoadBalancer(["aa:1"], [], self.clock, logger=logger)
        lb.start_health_checks(CONFIG, self.probe)
        self.probe.answer(500)
        self.clock.advance(1)
        self.probe.answer(200)
        for _ in range(5):
            self.clock.advance(1)
            self.probe.answer(503)
        self.clock.advance(1)
        self.probe.answer(200)
        msgs = [(r["msg"], r.get("state"), r.get("error")) for r in logger.records]
        self.assertEqual(msgs, [
            ("Healthcheck failed", None, "unexpected status (500)"),
            ("Target health updated", "healthy", None),
            ("Target health updated", "unhealthy", "unexpected status (503)"),
            ("Target health updated", "healthy", None),
        ])
        lb.stop_health_checks()

    def test_healthy_callback(self) -> None:
        """
        C{on_target_healthy} hears each target that becomes healthy.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], [], self.clock)
        seen: list[str] = []
        lb.on_target_healthy = lambda t: seen.append(t.address)
        lb.start_health_checks(CONFIG, self.probe)
        self.probe.answer(200, 1)
        self.probe.answer(200, 0)
        self.assertEqual(seen, ["bb:2", "aa:1"])
        lb.targets[0].eject("reset")
        self.assertEqual(seen, ["bb:2", "aa:1"])
        lb.stop_health_checks()

    def test_multi_target_already_healthy(self) -> None:
        """
        Restored multi-target balancers keep checking.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], [], self.clock)
        lb.mark_all_healthy()
        lb.start_health_checks(CONFIG, self.probe)
        self.assertEqual(len(self.probe.calls), 2)
        self.probe.answer(500, 0)
        self.probe.answer(200, 1)
        self.clock.advance(1)
        self.probes_for("aa:1")[-1].callback(500)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"bb:2"})
        lb.stop_health_checks()

    def test_multi_target_keeps_checking(self) -> None:
        """
        With several targets checks continue, and a failing target leaves the
        rotation and comes back.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], [], self.clock)
        lb.start_health_checks(CONFIG, self.probe)
        self.assertEqual(len(self.probe.calls), 2)
        self.probe.answer(200, 0)
        self.probe.answer(200, 1)
        self.assertTrue(lb.all_healthy())
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 4)
        self.probes_for("aa:1")[-1].callback(500)
        self.probes_for("bb:2")[-1].callback(200)
        self.clock.advance(1)
        self.probes_for("aa:1")[-1].callback(500)
        self.probes_for("bb:2")[-1].callback(200)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"bb:2"})
        self.assertEqual(lb.last_health_error, "unexpected status (500)")
        self.clock.advance(1)
        self.probes_for("aa:1")[-1].callback(200)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"aa:1", "bb:2"})
        lb.stop_health_checks()

    def test_writer_with_reader_keeps_checking(self) -> None:
        """
        A single writer with a reader is not a single-target balancer.
        """
        lb = LoadBalancer(["aa:1"], ["rr:2"], self.clock)
        lb.start_health_checks(CONFIG, self.probe)
        self.probe.answer(200, 0)
        self.probe.answer(200, 1)
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 4)
        lb.stop_health_checks()

    def test_listeners(self) -> None:
        """
        Health listeners see every result.
        """
        lb = LoadBalancer(["aa:1"], [], self.clock)
        seen: list[tuple[str, bool, str]] = []
        lb.health_listeners.append(lambda t, ok, err: seen.append((t.address, ok, err)))
        lb.start_health_checks(CONFIG, self.probe)
        self.probe.answer(404)
        self.clock.advance(1)
        self.probe.answer(200)
        self.assertEqual(seen, [("aa:1", False, "unexpected status (404)"), ("aa:1", True, "")])

    def test_restart_replaces_checkers(self) -> None:
        """
        Starting checks again stops the previous checkers.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], [], self.clock)
        lb.start_health_checks(CONFIG, self.probe)
        lb.start_health_checks(CONFIG, self.probe)
        self.assertEqual(self.probe.cancelled, 2)
        self.assertEqual(self.probe.pending(), 2)
        lb.stop_health_checks()


class HelperTests(SynchronousTestCase):
    def test_health_url(self) -> None:
        """
        The URL uses the target host, the health port when set, and the path
        joined on the root.
        """
        self.assertEqual(health_url("web", 3000, HealthCheckConfig(path="/up")),
                         "http://web:3000/up")
        self.assertEqual(health_url("web", 3000, HealthCheckConfig(path="up")),
                         "http://web:3000/up")
        self.assertEqual(health_url("web", 3000, HealthCheckConfig(path="web/index.html")),
                         "http://web:3000/web/index.html")
        self.assertEqual(health_url("web", 3000, HealthCheckConfig(port=9000)),
                         "http://web:9000/up")
        self.assertEqual(health_url("::1", 80, HealthCheckConfig()), "http://[::1]:80/up")

    def test_describe_failure(self) -> None:
        """
        Failures become short messages, as kamal-proxy words them.
        """
        from twisted.internet.defer import CancelledError, TimeoutError

        self.assertEqual(describe_failure(Failure(TimeoutError())), "request timed out")
        self.assertEqual(describe_failure(Failure(CancelledError())), "request timed out")
        self.assertEqual(describe_failure(Failure(UnexpectedStatus(502))),
                         "unexpected status (502)")
        self.assertEqual(describe_failure(Failure(ValueError())), "ValueError")

    def test_describe_dns_failure(self) -> None:
        """
        A failed name lookup says "DNS lookup failed" once.
        """
        from twisted.internet.error import DNSLookupError

        f = Failure(DNSLookupError("address 'web-9' not found: [Errno -2] Name or service "
                                   "not known."))
        self.assertEqual(
            describe_failure(f),
            "DNS lookup failed: address 'web-9' not found: [Errno -2] Name or service not known",
        )
        self.assertEqual(describe_failure(Failure(DNSLookupError())), "DNS lookup failed")


class HTTPProbeTests(SynchronousTestCase):
    """
    The real probe, on a memory reactor with deterministic name resolution.
    """

    def setUp(self) -> None:
        self.memory = MemoryReactorClock()
        self.reactor = deterministicResolvingReactor(self.memory, ["10.0.0.7"])
        self.probe = http_probe(self.reactor)

    def connect(self) -> StringTransport:
        host, port, factory, timeout, bind = self.memory.tcpClients[-1]
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        transport.protocol = protocol  # type: ignore[attr-defined]
        return transport

    def test_get(self) -> None:
        """
        The probe GETs the health path with the mproxy User-Agent and fires
        with the final status once the body is read.
        """
        target = Target("web:3000", self.memory)
        d = self.probe(target, HealthCheckConfig(path="up", host="app.internal"))
        self.assertEqual(self.memory.tcpClients[-1][:2], ("10.0.0.7", 3000))
        transport = self.connect()
        request = transport.value()
        self.assertTrue(request.startswith(b"GET /up HTTP/1.1\r\n"), request)
        self.assertIn(b"user-agent: mproxy\r\n", request.lower())
        self.assertIn(b"host: app.internal\r\n", request.lower())
        self.assertNoResult(d)
        transport.protocol.dataReceived(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(self.successResultOf(d), 204)

    def test_ip_address_connected_without_lookup(self) -> None:
        """
        A target given as an IPv4 or IPv6 address is connected to as it is
        (the name resolver, here answering 10.0.0.7 for every name, is not
        asked).
        """
        for address, host in (("127.0.0.1:3000", "127.0.0.1"), ("[::1]:3000", "::1")):
            d = self.probe(Target(address, self.memory), HealthCheckConfig(path="up"))
            self.assertEqual(self.memory.tcpClients[-1][:2], (host, 3000))
            self.assertEqual(self.memory.tcpClients[-1][3], 5)
            transport = self.connect()
            self.assertTrue(transport.value().startswith(b"GET /up HTTP/1.1\r\n"))
            transport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(self.successResultOf(d), 200)

    def test_health_port(self) -> None:
        """
        The health-check port replaces the target's port; the Host header is
        the target address by default.
        """
        target = Target("web:3000", self.memory)
        self.probe(target, HealthCheckConfig(port=9000))
        self.assertEqual(self.memory.tcpClients[-1][:2], ("10.0.0.7", 9000))
        request = self.connect().value().lower()
        self.assertIn(b"host: web:9000\r\n", request)

    def test_status_with_body(self) -> None:
        """
        A non-2xx answer with a body fires with its status after the body.
        """
        d = self.probe(Target("web:3000", self.memory), HealthCheckConfig())
        transport = self.connect()
        transport.protocol.dataReceived(
            b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nab"
        )
        self.assertNoResult(d)
        transport.protocol.dataReceived(b"cde")
        self.assertEqual(self.successResultOf(d), 500)

    def test_redirect_followed(self) -> None:
        """
        Redirects are followed and the final status counts.
        """
        d = self.probe(Target("web:3000", self.memory), HealthCheckConfig(path="/up"))
        first = self.connect()
        first.protocol.dataReceived(
            b"HTTP/1.1 302 Found\r\nLocation: /really-up\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertNoResult(d)
        self.assertEqual(len(self.memory.tcpClients), 2)
        second = self.connect()
        self.assertTrue(second.value().startswith(b"GET /really-up HTTP/1.1\r\n"))
        second.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.successResultOf(d), 200)

    def test_checker_with_real_probe_times_out(self) -> None:
        """
        A target that accepts the connection but never answers fails the check
        with C{request timed out} after the health-check timeout.
        """
        target = Target("web:3000", self.memory)
        reports: list[tuple[bool, str]] = []
        checker = HealthChecker(target, HealthCheckConfig(timeout=2, interval=1), self.memory,
                                self.probe, lambda t, ok, err: reports.append((ok, err)))
        checker.start()
        self.connect()
        self.memory.advance(2)
        self.assertEqual(reports, [(False, "request timed out")])
        checker.stop()

    def test_checker_with_real_probe_connect_timeout(self) -> None:
        """
        A target that never accepts the connection fails the check with
        C{request timed out} too.
        """
        target = Target("web:3000", self.memory)
        reports: list[tuple[bool, str]] = []
        checker = HealthChecker(target, HealthCheckConfig(timeout=2, interval=1), self.memory,
                                self.probe, lambda t, ok, err: reports.append((ok, err)))
        checker.start()
        self.memory.advance(2)
        self.assertEqual(reports, [(False, "request timed out")])
        checker.stop()

    def test_connection_closed_early(self) -> None:
        """
        A target that closes the connection without answering fails with a
        readable message, not a list of failures.
        """
        from twisted.internet.error import ConnectionDone

        target = Target("web:3000", self.memory)
        reports: list[tuple[bool, str]] = []
        checker = HealthChecker(target, HealthCheckConfig(timeout=2, interval=1), self.memory,
                                self.probe, lambda t, ok, err: reports.append((ok, err)))
        checker.start()
        transport = self.connect()
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(reports), 1)
        ok, err = reports[0]
        self.assertFalse(ok)
        self.assertNotIn("Failure", err)
        self.assertIn("closed", err)
        checker.stop()
