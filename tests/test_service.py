"""
Tests for L{mproxy.service}: what L{Service.select} decides for a request
under pause/stop, rollout splits and writer affinity.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.service import (
    HEALTH_OK,
    NO_TARGET,
    PAUSE_EXPIRED,
    ROLLOUT_COOKIE,
    WRITER_COOKIE,
    PauseController,
    PauseState,
    Refusal,
    RolloutSplit,
    Service,
    rollout_bucket,
)
from mproxy.spec import HealthCheckConfig, ServiceOptions, TargetOptions
from mproxy.target import Claim

NOW = 1_700_000_000.0


def cookies(**values: bytes) -> Callable[[bytes], bytes | None]:
    jar = {k.replace("_", "-").encode(): v for k, v in values.items()}
    return jar.get


NO_COOKIES = cookies()


class ServiceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.now = NOW

    def service(
        self,
        writers: list[str] = ["ww:1"],
        readers: list[str] = [],
        health_path: str = "/up",
        affinity: float = 1.0,
        websockets: bool = False,
    ) -> Service:
        lb = LoadBalancer(writers, readers, self.clock)
        lb.mark_all_healthy()
        return Service(
            "web",
            ServiceOptions(writer_affinity_timeout=affinity,
                           read_targets_accept_websockets=websockets),
            TargetOptions(health_check=HealthCheckConfig(path=health_path)),
            lb,
            self.clock,
            wallclock=lambda: self.now,
        )

    def select(self, service: Service, method: bytes = b"GET", path: str = "/",
               cookie: Callable[[bytes], bytes | None] = NO_COOKIES,
               websocket: bool = False) -> object:
        return service.select(method, path, cookie, websocket)


class RunningTests(ServiceTestCase):
    def test_claims(self) -> None:
        """
        A running service claims a target for each request.
        """
        s = self.service()
        c = self.select(s)
        self.assertIsInstance(c, Claim)
        self.assertEqual(c.target.address, "ww:1")
        self.assertEqual(s.active.inflight(), 1)
        self.assertEqual(s.state_name, "running")

    def test_no_healthy_target(self) -> None:
        """
        Without a healthy target the answer is a 503.
        """
        s = self.service()
        s.active.writers[0].set_state(s.active.writers[0].state.UNHEALTHY)
        self.assertEqual(self.select(s), NO_TARGET)
        self.assertEqual(NO_TARGET.status, 503)

    def test_health_path_proxied_when_running(self) -> None:
        """
        While running, the health path goes to the target like anything else.
        """
        self.assertIsInstance(self.select(self.service(), path="/up"), Claim)


class PauseTests(ServiceTestCase):
    def test_pause_holds_until_resume(self) -> None:
        """
        A request to a paused service is held, and claims a target only when
        the service resumes.
        """
        s = self.service()
        s.pause.pause(30)
        self.assertEqual(s.state_name, "paused")
        d = self.select(s)
        self.assertIsInstance(d, Deferred)
        self.assertNoResult(d)
        self.assertEqual(s.active.inflight(), 0)
        self.assertEqual(s.pause.held, 1)
        self.clock.advance(29)
        s.pause.resume()
        c = self.successResultOf(d)
        self.assertIsInstance(c, Claim)
        self.assertEqual(s.active.inflight(), 1)
        self.assertEqual(s.pause.held, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_releases_held(self) -> None:
        """
        Stopping a paused service answers its held requests with a 503 and the
        stop message.
        """
        s = self.service()
        s.pause.pause(30)
        d1 = self.select(s)
        d2 = self.select(s, method=b"POST")
        s.pause.stop("back soon")
        self.assertEqual(self.successResultOf(d1), Refusal(503, "back soon"))
        self.assertEqual(self.successResultOf(d2), Refusal(503, "back soon"))
        self.assertEqual(s.active.inflight(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_refuses(self) -> None:
        """
        A stopped service answers 503 with its message at once.
        """
        s = self.service()
        s.pause.stop("maintenance")
        self.assertEqual(s.state_name, "stopped")
        self.assertEqual(self.select(s), Refusal(503, "maintenance"))
        s.pause.stop("")
        self.assertEqual(self.select(s), Refusal(503, ""))

    def test_max_pause(self) -> None:
        """
        A request held longer than the max pause fails with a 504.
        """
        s = self.service()
        s.pause.pause(5)
        d1 = self.select(s)
        self.clock.advance(3)
        d2 = self.select(s)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d1), PAUSE_EXPIRED)
        self.assertEqual(PAUSE_EXPIRED.status, 504)
        self.assertNoResult(d2)
        self.assertEqual(s.pause.held, 1)
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d2), PAUSE_EXPIRED)
        self.assertEqual(s.pause.held, 0)
        # Resuming later is harmless.
        s.pause.resume()
        self.assertIsInstance(self.select(s), Claim)

    def test_repause_keeps_held(self) -> None:
        """
        Pausing again keeps held requests waiting; the new max pause applies to
        later requests.
        """
        s = self.service()
        s.pause.pause(5)
        d1 = self.select(s)
        s.pause.pause(60)
        d2 = self.select(s)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d1), PAUSE_EXPIRED)
        self.assertNoResult(d2)
        s.pause.resume()
        self.assertIsInstance(self.successResultOf(d2), Claim)

    def test_cancelled_hold_claims_nothing(self) -> None:
        """
        A held request that is cancelled (its client went away) claims no
        target when the service resumes.
        """
        s = self.service()
        s.pause.pause(30)
        d = self.select(s)
        d.cancel()
        self.failureResultOf(d)
        s.pause.resume()
        self.assertEqual(s.active.inflight(), 0)
        self.assertIsInstance(self.select(s), Claim)

    def test_health_path_while_paused_or_stopped(self) -> None:
        """
        While paused or stopped, GET or HEAD of the health path is answered
        200 locally, query ignored; other methods and paths are not.
        """
        s = self.service(health_path="/up")
        for pause in (lambda: s.pause.pause(30), lambda: s.pause.stop("x")):
            pause()
            self.assertEqual(self.select(s, path="/up"), HEALTH_OK)
            self.assertEqual(self.select(s, method=b"HEAD", path="/up"), HEALTH_OK)
            self.assertEqual(self.select(s, path="/up?full=1"), HEALTH_OK)
            self.assertNotEqual(self.select(s, method=b"POST", path="/up"), HEALTH_OK)
            self.assertNotEqual(self.select(s, path="/up/x"), HEALTH_OK)
            self.assertNotEqual(self.select(s, path="/upx"), HEALTH_OK)
        self.assertEqual(HEALTH_OK.status, 200)
        s.pause.resume()

    def test_health_path_relative(self) -> None:
        """
        A health path configured without a leading slash matches too.
        """
        s = self.service(health_path="health")
        s.pause.pause(30)
        self.assertEqual(self.select(s, path="/health"), HEALTH_OK)

    def test_resume_running(self) -> None:
        """
        Resuming a running service changes nothing.
        """
        s = self.service()
        s.pause.resume()
        self.assertIsInstance(self.select(s), Claim)


class PauseControllerTests(SynchronousTestCase):
    def test_states(self) -> None:
        """
        The controller moves between running, paused and stopped.
        """
        p = PauseController(Clock())
        self.assertIs(p.state, PauseState.RUNNING)
        p.pause(10)
        self.assertIs(p.state, PauseState.PAUSED)
        self.assertEqual(p.max_pause, 10)
        p.stop("msg")
        self.assertIs(p.state, PauseState.STOPPED)
        self.assertEqual(p.stop_message, "msg")
        p.pause(5)
        self.assertEqual(p.stop_message, "")
        p.resume()
        self.assertIs(p.state, PauseState.RUNNING)


class RolloutSplitTests(SynchronousTestCase):
    def test_bucket(self) -> None:
        """
        A value's bucket is the first 8 bytes of its BLAKE2b digest, as a
        fraction of 2**64.
        """
        import hashlib

        for v in (b"a", b"user1", b"foobar"):
            expected = int.from_bytes(hashlib.blake2b(v, digest_size=8).digest(), "big")
            self.assertEqual(rollout_bucket(v), expected / 2.0**64)
            self.assertTrue(0 <= rollout_bucket(v) < 1)

    def test_sequential_values_split_evenly(self) -> None:
        """
        Sequential cookie values, C{user1..user1000} and C{1..1000}, split
        like random ones: 10% sends 100 +/- 20 of them to the rollout.
        """
        split = RolloutSplit(10)
        for values in ([f"user{i}" for i in range(1, 1001)],
                       [str(i) for i in range(1, 1001)]):
            n = sum(split.use_rollout(v.encode()) for v in values)
            self.assertTrue(80 <= n <= 120, (values[0], n))

    def test_no_cookie(self) -> None:
        """
        No cookie, or an empty one, means the active slot.
        """
        split = RolloutSplit(100, ("x",))
        self.assertFalse(split.use_rollout(None))
        self.assertFalse(split.use_rollout(b""))

    def test_allowlist(self) -> None:
        """
        Values in the allowlist always go to the rollout.
        """
        split = RolloutSplit(0, ("beta-1", "beta-2"))
        self.assertTrue(split.use_rollout(b"beta-1"))
        self.assertTrue(split.use_rollout(b"beta-2"))
        self.assertFalse(split.use_rollout(b"beta-3"))

    def test_percentages(self) -> None:
        """
        0% sends (essentially) nothing, 100% everything, and the choice is
        deterministic for a value.
        """
        values = [f"user-{i}".encode() for i in range(500)]
        self.assertFalse(any(RolloutSplit(0).use_rollout(v) for v in values))
        self.assertTrue(all(RolloutSplit(100).use_rollout(v) for v in values))
        half = [RolloutSplit(50).use_rollout(v) for v in values]
        self.assertEqual(half, [RolloutSplit(50).use_rollout(v) for v in values])
        self.assertTrue(150 < sum(half) < 350, sum(half))
        for v in values:
            self.assertEqual(
                RolloutSplit(30).use_rollout(v), rollout_bucket(v) < 0.3
            )


class KamalRolloutTests(SynchronousTestCase):
    """
    kamal-proxy's rollout acceptance cases, with its cookie values.
    """

    def test_percentage_split(self) -> None:
        """
        At 60%, cookies C{00000} to C{00999} send 600 +/- 20 to the rollout.
        """
        split = RolloutSplit(60)
        n = sum(split.use_rollout(f"{i:05d}".encode()) for i in range(1000))
        self.assertTrue(580 <= n <= 620, n)

    def test_allowlist_and_percentage(self) -> None:
        """
        At 10% with an allowlist, about 100 +/- 20 of 1000 go to the rollout,
        allowlisted values always.
        """
        split = RolloutSplit(10, ("00001", "00002"))
        n = sum(split.use_rollout(f"{i:05d}".encode()) for i in range(1000))
        self.assertTrue(80 <= n <= 120, n)
        self.assertTrue(split.use_rollout(b"00001"))
        self.assertTrue(split.use_rollout(b"00002"))
        self.assertFalse(split.use_rollout(None))


class RolloutSelectTests(ServiceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.s = self.service(["active:1"])
        self.s.rollout = LoadBalancer(["canary:2"], [], self.clock)
        self.s.rollout.mark_all_healthy()

    def address(self, cookie: Callable[[bytes], bytes | None]) -> str:
        return self.select(self.s, cookie=cookie).target.address

    def test_no_split(self) -> None:
        """
        Without a split everything uses the active slot.
        """
        self.assertEqual(self.address(cookies(mproxy_rollout=b"anything")), "active:1")

    def test_split(self) -> None:
        """
        With a split, cookie-carrying requests are routed by the rule; no
        cookie goes to the active slot.
        """
        self.s.split = RolloutSplit(100)
        self.assertEqual(self.address(cookies(mproxy_rollout=b"u1")), "canary:2")
        self.assertEqual(self.address(NO_COOKIES), "active:1")
        self.s.split = RolloutSplit(0, ("vip",))
        self.assertEqual(self.address(cookies(mproxy_rollout=b"vip")), "canary:2")
        self.assertEqual(self.address(cookies(mproxy_rollout=b"u1")), "active:1")

    def test_split_without_rollout(self) -> None:
        """
        A split without a rollout balancer sends everything to the active slot.
        """
        self.s.rollout = None
        self.s.split = RolloutSplit(100)
        self.assertEqual(self.address(cookies(mproxy_rollout=b"u1")), "active:1")

    def test_cookie_name(self) -> None:
        """
        The rollout cookie is C{mproxy-rollout}.
        """
        self.assertEqual(ROLLOUT_COOKIE, b"mproxy-rollout")
        self.assertEqual(WRITER_COOKIE, b"mproxy-writer")


class WriterAffinityTests(ServiceTestCase):
    def test_no_readers_no_cookie(self) -> None:
        """
        Without readers, writes set no affinity cookie.
        """
        s = self.service(["ww:1"])
        c = self.select(s, method=b"POST")
        self.assertIsNone(c.set_cookie)

    def test_reads_and_writes(self) -> None:
        """
        GET/HEAD go to readers, other methods to writers.
        """
        s = self.service(["ww:1"], ["rr:2"])
        self.assertEqual(self.select(s).target.address, "rr:2")
        self.assertEqual(self.select(s, method=b"HEAD").target.address, "rr:2")
        for m in (b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"):
            self.assertEqual(self.select(s, method=m).target.address, "ww:1")

    def test_write_sets_cookie(self) -> None:
        """
        A write on a balancer with readers sets the affinity cookie: now plus
        the timeout in Unix milliseconds, expiring a second after that.
        """
        s = self.service(["ww:1"], ["rr:2"], affinity=1.5)
        c = self.select(s, method=b"POST")
        until = int((NOW + 1.5) * 1000)
        self.assertEqual(
            c.set_cookie,
            f"mproxy-writer={until}; Path=/; Expires=Tue, 14 Nov 2023 22:13:22 GMT; "
            "HttpOnly".encode(),
        )
        self.assertIsNone(self.select(s).set_cookie)

    def test_zero_timeout_no_cookie(self) -> None:
        """
        An affinity timeout of zero disables the cookie.
        """
        s = self.service(["ww:1"], ["rr:2"], affinity=0)
        self.assertIsNone(self.select(s, method=b"POST").set_cookie)

    def test_future_cookie_forces_writer(self) -> None:
        """
        A read carrying an unexpired affinity cookie goes to writers.
        """
        s = self.service(["ww:1"], ["rr:2"])
        future = str(int(NOW * 1000) + 500).encode()
        past = str(int(NOW * 1000) - 1).encode()
        c = self.select(s, cookie=cookies(mproxy_writer=future))
        self.assertEqual(c.target.address, "ww:1")
        self.assertEqual(self.select(s, cookie=cookies(mproxy_writer=past)).target.address,
                         "rr:2")

    def test_malformed_cookie_ignored(self) -> None:
        """
        A malformed affinity cookie is ignored.
        """
        s = self.service(["ww:1"], ["rr:2"])
        for v in (b"soon", b"", b"1e20", b"\xff"):
            self.assertEqual(self.select(s, cookie=cookies(mproxy_writer=v)).target.address,
                             "rr:2")

    def test_websocket(self) -> None:
        """
        WebSocket upgrades are writes unless readers accept websockets.
        """
        s = self.service(["ww:1"], ["rr:2"])
        self.assertEqual(self.select(s, websocket=True).target.address, "ww:1")
        s = self.service(["ww:1"], ["rr:2"], websockets=True)
        self.assertEqual(self.select(s, websocket=True).target.address, "rr:2")

    def test_no_healthy_writer(self) -> None:
        """
        A write with no healthy writer is a 503 even with healthy readers.
        """
        s = self.service(["ww:1"], ["rr:2"])
        s.active.writers[0].set_state(s.active.writers[0].state.UNHEALTHY)
        self.assertEqual(self.select(s, method=b"POST"), NO_TARGET)
        self.assertEqual(self.select(s).target.address, "rr:2")
