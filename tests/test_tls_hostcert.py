"""
Tests for the per-host state machine L{mproxy.tls.hostcert.HostCertificate}.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.tls.acme import IssueError
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.hostcert import DROPPED, IDLE, ORDERING, WAITING, HostCertificate
from mproxy.tls.testing import make_certificate


class HostCertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.orders: list = []
        self.logger = ListLogger()

        def order(directory, name, challenge, on_demand):
            d = Deferred()
            self.orders.append((name, challenge, d))
            return d

        self.host = HostCertificate(
            self.clock, RetryPolicy(initial=10), order, self.logger, "https://ca.test", "a.test", "web"
        )

    def test_lifecycle(self) -> None:
        """
        idle -> waiting -> ordering -> waiting for renewal, logging each
        order and certificate.
        """
        self.assertEqual(self.host.state, IDLE)
        self.host.start()
        self.assertEqual((self.host.state, self.host.next_attempt), (WAITING, 1000))
        self.clock.advance(0)
        self.assertEqual(self.host.state, ORDERING)
        cert = make_certificate(["a.test"], not_before=1000, not_after=1000 + 3000)
        self.orders.pop()[2].callback(cert)
        self.assertEqual((self.host.state, self.host.next_attempt), (WAITING, 3000))
        self.assertIs(self.host.certificate, cert)
        self.assertEqual(self.logger.messages()[0], "Requesting a certificate for a.test (http-01)")
        self.assertTrue(self.logger.messages()[1].startswith("Certificate for a.test valid until "))

    def test_failureRetries(self) -> None:
        """
        A failure waits the policy's delay and is pending with the error.
        """
        self.host.start()
        self.clock.advance(0)
        self.orders.pop()[2].errback(IssueError("boom"))
        self.assertEqual((self.host.state, self.host.next_attempt), (WAITING, 1010))
        self.assertEqual(self.host.status().describe(), "pending (boom)")
        self.clock.advance(10)
        self.assertEqual(self.orders[-1][:2], ("a.test", "tls-alpn-01"))

    def test_stopDuringOrder(self) -> None:
        """
        Stopped while ordering: the result is kept, nothing is scheduled
        until started again.
        """
        self.host.start()
        self.clock.advance(0)
        self.host.stop()
        self.orders.pop()[2].callback(make_certificate(["a.test"]))
        self.assertEqual((self.host.state, self.clock.getDelayedCalls()), (IDLE, []))
        self.assertIsNotNone(self.host.certificate)
        self.host.start()
        self.assertEqual(self.host.state, WAITING)

    def test_dropIgnoresLateResult(self) -> None:
        """
        A dropped host ignores the order in flight and never schedules.
        """
        self.host.start()
        self.clock.advance(0)
        self.host.drop()
        self.orders.pop()[2].errback(IssueError("late"))
        self.assertEqual((self.host.state, self.host.error, self.clock.getDelayedCalls()), (DROPPED, None, []))
        self.host.start()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusedNeverOrders(self) -> None:
        """
        A name no CA issues for is failed at once and never ordered.
        """
        host = HostCertificate(
            self.clock, RetryPolicy(), None, self.logger, "d", "localhost", "web", refused="no"
        )
        host.start()
        self.assertEqual((host.status().state, self.clock.getDelayedCalls()), ("failed", []))


class ClusterTransitionTests(SynchronousTestCase):
    """
    What a cluster adds: another node holding the lock, an unreachable
    store, and certificates another node got.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.orders: list = []
        self.logger = ListLogger()

        def order(directory, name, challenge, on_demand):
            d = Deferred()
            self.orders.append((challenge, d))
            return d

        self.host = HostCertificate(
            self.clock, RetryPolicy(initial=10), order, self.logger, "https://ca.test", "a.test", "web"
        )
        self.host.start()
        self.clock.advance(0)

    def test_heldElsewhere(self) -> None:
        """
        Another node holds the lock: no failure is counted, the status says
        where it is being ordered, and the lock's expiry is the next try.
        """
        self.orders.pop()[1].errback(IssueError("b is ordering it", held_by="b", retry_after=7))
        row = self.host.status()
        self.assertEqual((row.state, row.error, row.ordering_on, row.next_attempt), ("pending", None, "b", 1007))
        self.assertEqual(row.describe(), "pending; ordering on b")
        self.assertEqual(self.host.failures, 0)
        self.clock.advance(7)
        self.assertEqual(self.orders[-1][0], "http-01")

    def test_coolingDownElsewhere(self) -> None:
        """
        Another node's last order failed and the cluster waits out its
        backoff: the status shows why, and nothing is ordered until then.
        """
        self.orders.pop()[1].errback(
            IssueError("the last order on b failed: dns", held_by="b", retry_after=90, cooling_down=True)
        )
        row = self.host.status()
        self.assertEqual(row.describe(), "pending (the last order on b failed: dns)")
        self.assertEqual((self.host.failures, row.next_attempt), (0, 1090))

    def test_storeUnavailable(self) -> None:
        """
        The store cannot be reached: retried after 1, 2, 4 ... s (not the
        ACME backoff), without counting failures or switching challenges.
        """
        for wait in (1, 2, 4):
            challenge, d = self.orders.pop()
            self.assertEqual(challenge, "http-01")
            d.errback(IssueError("cluster store unreachable (down)", store_unavailable=True))
            self.assertEqual(self.host.next_attempt, self.clock.seconds() + wait)
            self.clock.advance(wait)
        self.assertEqual((self.host.failures, self.host.status().state), (0, "pending"))
        self.orders.pop()[1].callback(make_certificate(["a.test"]))
        self.assertEqual((self.host.status().state, self.host.store_waits), ("valid", 0))

    def test_adopt(self) -> None:
        """
        A longer-lived certificate from another node replaces the current
        one and moves the renewal; an older one is ignored.
        """
        first = make_certificate(["a.test"], not_before=1000, not_after=4000)
        self.orders.pop()[1].callback(first)
        newer = make_certificate(["a.test"], not_before=2000, not_after=5000)
        newer.issued_by = "b"
        self.assertTrue(self.host.adopt(newer))
        self.assertIs(self.host.certificate, newer)
        self.assertEqual(self.host.next_attempt, 5000 - 3000 / 3)
        self.assertIn("issued by b", self.host.status().describe())
        self.assertFalse(self.host.adopt(first))
        self.assertIs(self.host.certificate, newer)
