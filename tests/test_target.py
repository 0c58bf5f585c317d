"""
Tests for L{mproxy.target} (claims and draining) and L{mproxy.balancer}
(round-robin, readers, health waits, draining a whole balancer).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.logging import ListLogger
from mproxy.spec import HealthCheckConfig
from mproxy.target import Drained, Target, TargetState


class RecordingPool:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle_closed = 0

    def close_idle(self) -> None:
        self.idle_closed += 1

    def close(self) -> None:
        pass


class ClaimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.target = Target("web:3000", self.clock)

    def test_address(self) -> None:
        """
        A target knows its host and port and starts in C{adding}.
        """
        self.assertEqual((self.target.host, self.target.port), ("web", 3000))
        self.assertIs(self.target.state, TargetState.ADDING)
        self.assertFalse(self.target.healthy)

    def test_claim_release(self) -> None:
        """
        A claim is in flight until released; releasing twice is harmless.
        """
        c1 = self.target.claim()
        c2 = self.target.claim()
        self.assertEqual(self.target.inflight, {c1, c2})
        c1.release()
        self.assertEqual(self.target.inflight, {c2})
        c1.release()
        self.assertEqual(self.target.inflight, {c2})
        self.assertTrue(c1.released)
        c2.release()
        self.assertEqual(self.target.inflight, set())

    def test_draining_refuses(self) -> None:
        """
        A draining target refuses new claims.
        """
        c = self.target.claim()
        self.target.drain(10)
        self.assertIs(self.target.state, TargetState.DRAINING)
        self.assertIsNone(self.target.claim())
        c.release()

    def test_pool_per_target(self) -> None:
        """
        Each target gets its own pool, closed when the target closes.
        """
        t = Target("web:3000", self.clock, RecordingPool)
        self.assertEqual((t.pool.host, t.pool.port), ("web", 3000))
        t.close()
        self.assertEqual(t.pool.idle_closed, 1)


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.target = Target("web:3000", self.clock)
        self.target.set_state(TargetState.HEALTHY)

    def test_nothing_in_flight(self) -> None:
        """
        Draining an idle target fires at once and restores its state.
        """
        self.successResultOf(self.target.drain(30))
        self.assertIs(self.target.state, TargetState.HEALTHY)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_inflight(self) -> None:
        """
        The drain fires when the last request in flight at its start ends.
        """
        c1 = self.target.claim()
        c2 = self.target.claim()
        d = self.target.drain(30)
        self.assertNoResult(d)
        c1.release()
        self.assertNoResult(d)
        self.clock.advance(29)
        self.assertNoResult(d)
        c2.release()
        self.successResultOf(d)
        self.assertIs(self.target.state, TargetState.HEALTHY)
        # The deadline was cancelled.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_cancels(self) -> None:
        """
        At the deadline the cancellers of the remaining requests are called and
        the drain fires.
        """
        cancelled = []
        c1 = self.target.claim()
        c2 = self.target.claim()
        c1.set_canceller(lambda: cancelled.append(1))
        c2.set_canceller(lambda: (cancelled.append(2), c2.release()))
        d = self.target.drain(5)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(cancelled, [])
        self.clock.advance(0.1)
        self.assertEqual(sorted(cancelled), [1, 2])
        self.successResultOf(d)
        self.assertEqual(self.target.inflight, set())
        self.assertTrue(c1.released)

    def test_drained_counts(self) -> None:
        """
        A drain fires with how many requests it waited for and how many it cut
        at the deadline; an idle one with zeros.
        """
        self.assertEqual(self.successResultOf(Target("aa:1", self.clock).drain(1)), Drained())
        c1, c2, c3 = self.target.claim(), self.target.claim(), self.target.claim()
        d = self.target.drain(5)
        c1.release()
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), Drained(requests=3, cut=2))
        self.assertTrue(c2.released and c3.released)

    def test_canceller_raising(self) -> None:
        """
        A canceller that raises does not stop the drain.
        """
        c = self.target.claim()

        def boom() -> None:
            raise RuntimeError("boom")

        c.set_canceller(boom)
        d = self.target.drain(1)
        self.clock.advance(1)
        self.successResultOf(d)

    def test_new_claims_not_waited_for(self) -> None:
        """
        Only requests in flight when the drain starts are waited for.
        """
        c = self.target.claim()
        d = self.target.drain(30)
        self.assertIsNone(self.target.claim())
        c.release()
        self.successResultOf(d)

    def test_already_draining(self) -> None:
        """
        Draining a draining target returns at once.
        """
        c = self.target.claim()
        d1 = self.target.drain(30)
        self.successResultOf(self.target.drain(30))
        self.assertNoResult(d1)
        c.release()
        self.successResultOf(d1)

    def test_state_restored(self) -> None:
        """
        After a drain (a pause) the target takes claims again in its old state.
        """
        c = self.target.claim()
        d = self.target.drain(1)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertTrue(c.released)
        self.assertIs(self.target.state, TargetState.HEALTHY)
        self.assertIsNotNone(self.target.claim())

    def test_upgraded_kept_until_deadline(self) -> None:
        """
        Upgraded requests (WebSockets) are not cut when the drain starts: they
        stay up until the drain deadline, and only then is their canceller
        (which sends the WebSocket close frame) called.
        """
        cancelled = []
        ws = self.target.claim()
        ws.mark_upgraded()
        ws.set_canceller(lambda: cancelled.append("ws"))
        plain = self.target.claim()
        plain.set_canceller(lambda: cancelled.append("plain"))
        d = self.target.drain(30)
        self.assertEqual(cancelled, [])
        self.assertFalse(ws.released)
        plain.release()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.assertEqual(cancelled, ["ws"])
        self.assertTrue(ws.released)
        self.successResultOf(d)

    def test_upgraded_closing_on_its_own(self) -> None:
        """
        A WebSocket that closes by itself before the deadline ends the drain
        without any cancel.
        """
        ws = self.target.claim()
        ws.mark_upgraded()
        ws.set_canceller(lambda: self.fail("cancelled"))
        d = self.target.drain(30)
        self.assertNoResult(d)
        ws.release()
        self.successResultOf(d)
        self.assertIs(self.target.state, TargetState.HEALTHY)

    def test_upgraded_flag(self) -> None:
        """
        A claim can be marked upgraded.
        """
        c = self.target.claim()
        self.assertFalse(c.upgraded)
        c.mark_upgraded()
        self.assertTrue(c.upgraded)


def healthy_lb(writers: list[str], readers: list[str] = [], clock: Clock | None = None
               ) -> LoadBalancer:
    lb = LoadBalancer(writers, readers, clock or Clock())
    lb.mark_all_healthy()
    return lb


class BalancerTests(SynchronousTestCase):
    def test_round_robin(self) -> None:
        """
        Writers are used in turn.
        """
        lb = healthy_lb(["aa:1", "bb:2", "cc:3"])
        picks = [lb.claim(False).target.address for _ in range(6)]
        self.assertEqual(sorted(picks[:3]), ["aa:1", "bb:2", "cc:3"])
        self.assertEqual(picks[:3], picks[3:])

    def test_only_healthy(self) -> None:
        """
        Targets that are not healthy get no traffic.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], [], Clock())
        self.assertIsNone(lb.claim(False))
        lb.writers[1].set_state(TargetState.HEALTHY)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"bb:2"})
        lb.writers[0].set_state(TargetState.HEALTHY)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"aa:1", "bb:2"})
        lb.writers[1].set_state(TargetState.UNHEALTHY)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"aa:1"})
        lb.writers[0].set_state(TargetState.UNHEALTHY)
        self.assertIsNone(lb.claim(False))

    def test_claim_registers(self) -> None:
        """
        The claim is registered in flight on the chosen target.
        """
        lb = healthy_lb(["aa:1"])
        c = lb.claim(False)
        self.assertEqual(lb.inflight(), 1)
        self.assertIn(c, lb.writers[0].inflight)
        c.release()
        self.assertEqual(lb.inflight(), 0)

    def test_readers(self) -> None:
        """
        Reads go to healthy readers, writes to writers only.
        """
        lb = healthy_lb(["ww:1"], ["r1:2", "r2:3"])
        self.assertEqual({lb.claim(True).target.address for _ in range(4)}, {"r1:2", "r2:3"})
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"ww:1"})

    def test_reads_fall_back_to_writers(self) -> None:
        """
        With no healthy reader, reads go to writers.
        """
        lb = healthy_lb(["ww:1"], ["rr:2"])
        lb.readers[0].set_state(TargetState.UNHEALTHY)
        self.assertEqual(lb.claim(True).target.address, "ww:1")

    def test_writes_never_to_readers(self) -> None:
        """
        A write with no healthy writer gets nothing even if readers are healthy.
        """
        lb = healthy_lb(["ww:1"], ["rr:2"])
        lb.writers[0].set_state(TargetState.UNHEALTHY)
        self.assertIsNone(lb.claim(False))
        self.assertEqual(lb.claim(True).target.address, "rr:2")

    def test_skips_draining(self) -> None:
        """
        A draining target in the rotation is skipped; all draining gives None.
        """
        lb = healthy_lb(["aa:1", "bb:2"])
        c = lb.writers[0].claim()
        lb.writers[0].drain(30)
        self.assertEqual({lb.claim(False).target.address for _ in range(4)}, {"bb:2"})
        lb.writers[1].drain(30)
        self.assertIsNone(lb.claim(False))
        c.release()

    def test_addresses(self) -> None:
        """
        Addresses list writers then readers in the order given.
        """
        lb = LoadBalancer(["bb:1", "aa:2"], ["rr:3"], Clock())
        self.assertEqual(lb.addresses, ["bb:1", "aa:2", "rr:3"])

    def test_state_change_logged(self) -> None:
        """
        Health state changes are logged with the target and both states.
        """
        logger = ListLogger()
        lb = LoadBalancer(["aa:1"], [], Clock(), logger=logger)
        lb.writers[0].set_state(TargetState.HEALTHY)
        self.assertEqual(
            logger.records,
            [dict(level="INFO", msg="Target health updated", target="aa:1",
                  state="healthy", was="adding")],
        )


class WaitHealthyTests(SynchronousTestCase):
    def test_already_healthy(self) -> None:
        """
        A healthy balancer's wait fires at once.
        """
        self.successResultOf(healthy_lb(["aa:1"]).wait_healthy())

    def test_waits_for_all(self) -> None:
        """
        The wait fires only when every target (readers too) is healthy at once.
        """
        lb = LoadBalancer(["aa:1", "bb:2"], ["rr:3"], Clock())
        d = lb.wait_healthy()
        lb.writers[0].set_state(TargetState.HEALTHY)
        lb.writers[1].set_state(TargetState.HEALTHY)
        self.assertNoResult(d)
        lb.readers[0].set_state(TargetState.HEALTHY)
        self.successResultOf(d)

    def test_cancel(self) -> None:
        """
        A cancelled wait is forgotten.
        """
        lb = LoadBalancer(["aa:1"], [], Clock())
        d = lb.wait_healthy()
        d.cancel()
        self.failureResultOf(d)
        lb.writers[0].set_state(TargetState.HEALTHY)
        self.assertEqual(lb._healthy_waiters, [])


class BalancerDrainTests(SynchronousTestCase):
    def test_drain_all_targets(self) -> None:
        """
        A balancer drains all its targets in parallel and fires when every one
        has drained.
        """
        clock = Clock()
        lb = healthy_lb(["aa:1", "bb:2"], ["rr:3"], clock)
        ca = lb.writers[0].claim()
        cr = lb.readers[0].claim()
        d = lb.drain(30)
        self.assertNoResult(d)
        ca.release()
        self.assertNoResult(d)
        clock.advance(30)
        self.successResultOf(d)
        self.assertTrue(cr.released)

    def test_drain_totals(self) -> None:
        """
        A balancer's drain adds up its targets' counts.
        """
        clock = Clock()
        lb = healthy_lb(["aa:1", "bb:2"], [], clock)
        lb.writers[0].claim()
        lb.writers[1].claim().release()
        held = lb.writers[1].claim()
        d = lb.drain(3)
        held.release()
        clock.advance(3)
        self.assertEqual(self.successResultOf(d), Drained(requests=2, cut=1))

    def test_drain_idle(self) -> None:
        """
        An idle balancer drains at once.
        """
        self.successResultOf(healthy_lb(["aa:1"]).drain(30))

    def test_close_stops_checks_and_pools(self) -> None:
        """
        Closing a balancer stops its health checks and closes idle upstream
        connections of every target.
        """
        clock = Clock()
        probes: list[Deferred[int]] = []

        def probe(target: Target, config: HealthCheckConfig) -> Deferred[int]:
            d: Deferred[int] = Deferred()
            probes.append(d)
            return d

        lb = LoadBalancer(["aa:1", "bb:2"], [], clock, RecordingPool)
        lb.start_health_checks(HealthCheckConfig(), probe)
        self.assertEqual(len(probes), 2)
        lb.close()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual([t.pool.idle_closed for t in lb.targets], [1, 1])
        clock.advance(10)
        self.assertEqual(len(probes), 2)
