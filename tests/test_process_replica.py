"""
Unit tests of L{mproxy.replica}: a worker's router kept equal to the
supervisor's service records.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.replica import Replica, drain_all
from mproxy.router import Router
from mproxy.service import PauseState
from mproxy.spec import ServiceOptions, TargetOptions
from mproxy.state import PauseRecord, ServiceRecord, Slot
from mproxy.target import Drained, TargetState


def record(name: str, *targets: str, host: str = "", **kw: object) -> ServiceRecord:
    options = ServiceOptions(hosts=(host,) if host else ())
    return ServiceRecord(name, options, TargetOptions(), Slot(targets), **kw)  # type: ignore[arg-type]


class ReplicaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.router = Router()
        self.replica = Replica(
            self.router, self.clock, lambda slot: LoadBalancer(slot.writers, slot.readers,
                                                               self.clock))

    def test_new_services_serve_at_once(self) -> None:
        replaced = self.replica.apply([record("web", "aa:1", host="a.test"),
                                       record("api", "bb:1", host="b.test")])
        self.assertEqual(replaced, [])
        match = self.router.match("a.test", "/")
        assert match is not None
        self.assertEqual(match.service.name, "web")
        claim = self.router.services["web"].active.claim(True)
        assert claim is not None
        self.assertEqual(claim.target.address, "aa:1")

    def test_unchanged_deployment_keeps_its_balancer(self) -> None:
        """
        Re-applying the same slot (another service changed) keeps the load
        balancer, and the requests in flight on it.
        """
        self.replica.apply([record("web", "aa:1")])
        lb = self.router.services["web"].active
        claim = lb.claim(False)
        replaced = self.replica.apply([record("web", "aa:1"), record("api", "bb:1", host="b")])
        self.assertEqual(replaced, [])
        self.assertIs(self.router.services["web"].active, lb)
        assert claim is not None
        self.assertEqual(lb.inflight(), 1)

    def test_switch_returns_the_old_balancer_to_drain(self) -> None:
        self.replica.apply([record("web", "aa:1")])
        old = self.router.services["web"].active
        claim = old.claim(False)
        assert claim is not None
        [replaced] = self.replica.apply([record("web", "bb:1")])
        self.assertIs(replaced, old)
        new = self.router.services["web"].active
        self.assertEqual(new.addresses, ["bb:1"])
        drained = drain_all([replaced], 30.0)
        self.assertNoResult(drained)
        claim.release()
        self.assertEqual(self.successResultOf(drained), Drained(requests=1, cut=0))

    def test_drain_deadline_cuts(self) -> None:
        self.replica.apply([record("web", "aa:1")])
        old = self.router.services["web"].active
        old.claim(False)
        replaced = self.replica.apply([record("web", "bb:1")])
        drained = drain_all(replaced, 5.0)
        self.clock.advance(5.0)
        self.assertEqual(self.successResultOf(drained), Drained(requests=1, cut=1))

    def test_removed_service(self) -> None:
        self.replica.apply([record("web", "aa:1", host="a.test"),
                            record("api", "bb:1", host="b.test")])
        web = self.router.services["web"].active
        replaced = self.replica.apply([record("api", "bb:1", host="b.test")])
        self.assertEqual(replaced, [web])
        self.assertIsNone(self.router.match("a.test", "/x"))

    def test_rollout_and_split_follow(self) -> None:
        from mproxy.service import RolloutSplit

        self.replica.apply([record("web", "aa:1")])
        split = RolloutSplit(percentage=50, allowlist=())
        self.replica.apply([record("web", "aa:1", rollout=Slot(("cc:1",)), split=split)])
        service = self.router.services["web"]
        assert service.rollout is not None
        self.assertEqual(service.rollout.addresses, ["cc:1"])
        self.assertEqual(service.split, split)
        rollout = service.rollout
        replaced = self.replica.apply([record("web", "aa:1")])
        self.assertEqual(replaced, [rollout])
        self.assertIsNone(service.rollout)

    def test_pause_state_follows(self) -> None:
        self.replica.apply([record("web", "aa:1")])
        pause = self.router.services["web"].pause
        self.replica.apply([record("web", "aa:1", pause=PauseRecord(PauseState.PAUSED, 7.0))])
        self.assertEqual((pause.state, pause.max_pause), (PauseState.PAUSED, 7.0))
        self.replica.apply([record("web", "aa:1", pause=PauseRecord(
            PauseState.STOPPED, stop_message="later"))])
        self.assertEqual((pause.state, pause.stop_message), (PauseState.STOPPED, "later"))
        self.replica.apply([record("web", "aa:1")])
        self.assertEqual(pause.state, PauseState.RUNNING)

    def test_health_follows_the_supervisor(self) -> None:
        self.replica.apply([record("web", "aa:1", "bb:1")])
        lb = self.router.services["web"].active
        self.replica.set_health("aa:1", False)
        self.assertEqual([t.state for t in lb.targets],
                         [TargetState.UNHEALTHY, TargetState.HEALTHY])
        for _ in range(3):
            claim = lb.claim(False)
            assert claim is not None
            self.assertEqual(claim.target.address, "bb:1")
            claim.release()
        self.replica.set_health("aa:1", True)
        self.assertTrue(lb.all_healthy())

    def test_records_survive_their_wire_form(self) -> None:
        """
        The records travel as the state file's JSON; what arrives applies
        the same.
        """
        sent = [record("web", "aa:1", host="a.test", pause=PauseRecord(PauseState.PAUSED, 3.0))]
        received = [ServiceRecord.from_json(r.to_json()) for r in sent]
        self.assertEqual(received, sent)
        self.replica.apply(received)
        self.assertEqual(ServiceRecord.of(self.router.services["web"]), sent[0])
