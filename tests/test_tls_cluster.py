"""
The cluster pieces (L{mproxy.tls.redisstore}, L{mproxy.tls.clusterstore},
L{mproxy.tls.listener}) against a real Debian C{redis-server} on a loopback
port, two "nodes" in one process.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed, fail
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mproxy.logging import ListLogger
from mproxy.tls.acme import IssueError
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.clusterstore import ClusterCertificateStore, ClusterChallenges, ClusterGuard, ClusterPolicy
from mproxy.tls.interfaces import (
    ICertificateStore,
    IChallengeResponder,
    IDirectoryStore,
    IOnDemandPolicy,
    IOrderGuard,
)
from mproxy.tls.listener import ClusterListener
from mproxy.tls.ondemand import OnDemandDenied
from mproxy.tls.redisstore import RedisCluster, StoreUnavailable
from mproxy.tls.store import CertificateStore
from mproxy.tls.testing import make_certificate, pem_pair
from tests.redisserver import REDIS_SKIP, RedisServer

CA = "https://ca.test/dir"


class RedisTestCase(TestCase):
    skip = REDIS_SKIP
    timeout = 30

    def setUp(self) -> None:
        self.redis = RedisServer(self.mktemp(), password="pw")
        self.redis.start()
        self.addCleanup(self.redis.stop)

    def cluster(self, node: str, **kw) -> RedisCluster:
        return RedisCluster(self.redis.url, node, **kw)

    @inlineCallbacks
    def eventually(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.assertLess(time.monotonic(), deadline, "condition not met in time")
            yield deferLater(reactor, 0.02, lambda: None)


class RedisClusterTests(RedisTestCase):
    def test_lock(self) -> None:
        """
        One node holds a name's lock; the other sees who; only the holder
        extends or releases it; a node takes over a lock left under its own
        name; the lock expires.
        """
        a, b = self.cluster("a", lock_ttl=0.5), self.cluster("b", lock_ttl=0.5)
        self.assertIsNone(a.acquire(CA, "x.test"))
        self.assertEqual(b.acquire(CA, "x.test"), "a")
        self.assertGreater(b.lock_left(CA, "x.test"), 0)
        self.assertFalse(b.extend(CA, "x.test"))
        self.assertTrue(a.extend(CA, "x.test"))
        b.release(CA, "x.test")
        self.assertEqual(b.holder(CA, "x.test"), "a")
        self.assertIsNone(self.cluster("a", lock_ttl=0.5).acquire(CA, "x.test"))
        a.release(CA, "x.test")
        self.assertIsNone(b.acquire(CA, "x.test"))
        time.sleep(0.6)
        self.assertIsNone(a.acquire(CA, "x.test"))

    def test_onDemandOrderLimit(self) -> None:
        """
        At most C{rate} on-demand orders per window, counted across nodes.
        """
        a, b = self.cluster("a"), self.cluster("b")
        self.assertEqual(a.reserve_order(CA, 2, 60), 0)
        self.assertEqual(b.reserve_order(CA, 2, 60), 0)
        wait = a.reserve_order(CA, 2, 60)
        self.assertTrue(59 < wait <= 60, wait)

    def test_unreachable(self) -> None:
        """
        Any call to a store that is down raises L{StoreUnavailable} and
        marks it unreachable; a later call that works marks it reachable.
        """
        a = self.cluster("a")
        self.assertIsNone(a.acquire(CA, "x.test"))
        self.assertTrue(a.reachable)
        self.redis.stop()
        self.assertRaises(StoreUnavailable, a.acquire, CA, "y.test")
        self.assertIs(a.reachable, False)
        self.redis.start()
        self.assertIsNone(a.acquire(CA, "y.test"))
        self.assertTrue(a.reachable)


class TLSStoreTests(TestCase):
    skip = REDIS_SKIP

    def test_rediss(self) -> None:
        """
        C{rediss://} talks TLS to Redis, trusting the given CA bundle; a
        server the bundle does not vouch for is unreachable.
        """
        server = RedisServer(self.mktemp(), password="pw", tls=True)
        server.start()
        self.addCleanup(server.stop)
        trusted = RedisCluster(server.url, "a", ca_bundle=server.ca_bundle)
        self.assertIsNone(trusted.acquire(CA, "x.test"))
        self.assertEqual(RedisCluster(server.url, "b", ca_bundle=server.ca_bundle).holder(CA, "x.test"), "a")
        other = os.path.join(self.mktemp())
        os.makedirs(other)
        from tests.pebble import _write_tls_files

        wrong_ca, _, _ = _write_tls_files(other)
        self.assertRaises(StoreUnavailable, RedisCluster(server.url, "c", ca_bundle=wrong_ca).holder, CA, "x.test")


class GuardTests(RedisTestCase):
    def guard(self, node: str, **kw) -> ClusterGuard:
        local = CertificateStore(self.mktemp())
        self.assertTrue(verifyObject(IOrderGuard, ClusterGuard(self.cluster(node), local, lambda c: 0)))
        return ClusterGuard(self.cluster(node), local, lambda c: c.renew_at(), **kw)

    def issue(self, host="x.test", lifetime=90 * 86400):
        now = time.time()
        return make_certificate([host], not_before=now - 10, not_after=now + lifetime)

    def test_heldElsewhere(self) -> None:
        """
        While node A orders, node B places no order and learns who holds
        the lock and when it expires.
        """
        a, b = self.guard("a"), self.guard("b")
        seen = []

        def issue_a():
            with self.assertRaises(IssueError) as cm:
                b.run(CA, "x.test", False, lambda: self.fail("b ordered"))
            seen.append(cm.exception)
            return self.issue()

        a.run(CA, "x.test", False, issue_a)
        [error] = seen
        self.assertEqual(error.held_by, "a")
        self.assertTrue(0 < error.retry_after <= 15.5)

    def test_sharedCertificateInsteadOfOrder(self) -> None:
        """
        A shared certificate not yet due is used (and copied locally)
        without an order; one that is due is renewed.
        """
        a, b = self.guard("a"), self.guard("b")
        store = ClusterCertificateStore(CertificateStore(self.mktemp()), a.cluster).for_directory(CA)
        chain, key = pem_pair(self.issue())
        store.save_certificate("x.test", key, chain)
        got = b.run(CA, "x.test", False, lambda: self.fail("ordered again"))
        self.assertEqual((got.issued_by, got.leaf.serial_number), ("a", store.load_certificate("x.test").leaf.serial_number))
        self.assertIsNotNone(b.local.for_directory(CA).load_certificate("x.test"))
        chain, key = pem_pair(self.issue(lifetime=2))
        store.save_certificate("x.test", key, chain)
        renewed = self.issue()
        self.assertIs(b.run(CA, "x.test", False, lambda: renewed), renewed)

    def test_failedOrderHoldsTheLockForTheBackoff(self) -> None:
        """
        After a failed order the lock stays with the node for the backoff
        (failures counted cluster-wide), the other node learns why and
        when to look again; the node that failed may retry under its own
        lock; a success clears the count and frees the lock.
        """
        backoff = lambda failures, error: 60.0 * failures  # noqa: E731
        a, b = self.guard("a", backoff=backoff), self.guard("b", backoff=backoff)

        def failing():
            raise IssueError("validation failed")

        self.assertRaises(IssueError, a.run, CA, "x.test", False, failing)
        with self.assertRaises(IssueError) as cm:
            b.run(CA, "x.test", False, lambda: self.fail("b ordered"))
        error = cm.exception
        self.assertEqual((error.held_by, error.cooling_down), ("a", True))
        self.assertEqual(str(error), "the last order on a failed: validation failed")
        self.assertTrue(59 < error.retry_after <= 60.5, error.retry_after)
        self.assertRaises(IssueError, a.run, CA, "x.test", False, failing)
        self.assertGreater(a.cluster.lock_left(CA, "x.test"), 119)
        a.run(CA, "x.test", False, self.issue)
        self.assertIsNone(a.cluster.holder(CA, "x.test"))
        self.assertEqual(a.cluster.count_failure(CA, "x.test"), 1)

    def test_onDemandLimitAndStoreDown(self) -> None:
        """
        On-demand orders beyond the cluster's limit wait; with the store
        down no order is placed.
        """
        a = self.guard("a", on_demand_rate=1, on_demand_window=60)
        a.run(CA, "x.test", True, self.issue)
        with self.assertRaises(IssueError) as cm:
            self.guard("b", on_demand_rate=1, on_demand_window=60).run(CA, "y.test", True, self.issue)
        self.assertTrue(cm.exception.rate_limited and cm.exception.retry_after > 59)
        self.redis.stop()
        with self.assertRaises(IssueError) as cm:
            a.run(CA, "z.test", False, self.issue)
        self.assertTrue(cm.exception.store_unavailable)


class Node:
    def __init__(self, test: RedisTestCase, name: str) -> None:
        self.cluster = test.cluster(name)
        self.local = CertificateStore(test.mktemp())
        self.local_challenges = ChallengeStore()
        self.store = ClusterCertificateStore(self.local, self.cluster)
        self.challenges = ClusterChallenges(self.local_challenges, self.cluster)
        self.arrived: list = []
        self.listener = ClusterListener(
            reactor, self.cluster, self.local, self.local_challenges,
            lambda url, host, cert: self.arrived.append((url, host, cert)), ListLogger(),
        )  # fmt: skip
        self.listener.start()
        test.addCleanup(deferToThread, self.listener.stop)


class ListenerTests(RedisTestCase):
    def test_provides(self) -> None:
        """
        The cluster layers provide the same interfaces as the local ones.
        """
        node = Node(self, "a")
        self.assertTrue(verifyObject(ICertificateStore, node.store))
        self.assertTrue(verifyObject(IDirectoryStore, node.store.for_directory(CA)))
        self.assertTrue(verifyObject(IChallengeResponder, node.challenges))

    @inlineCallbacks
    def test_challengesReachEveryNodeBeforeTheOrderGoesOn(self) -> None:
        """
        When node A's issuer publishes an HTTP-01 token or a TLS-ALPN-01
        certificate, node B answers it as soon as the call returns; both
        stop answering when it is withdrawn.
        """
        a, b = Node(self, "a"), Node(self, "b")
        yield self.eventually(lambda: a.cluster.reachable and b.cluster.reachable)
        yield deferLater(reactor, 0.2, lambda: None)  # both subscribed
        yield deferToThread(a.challenges.add_http01, "tok", "tok.thumb")
        self.assertEqual(b.challenges.http01_response(b"/.well-known/acme-challenge/tok"), b"tok.thumb")
        alpn = make_certificate(["x.test"])
        yield deferToThread(a.challenges.add_tls_alpn01, "x.test", alpn)
        self.assertEqual(b.challenges.alpn_certificate("x.test").leaf, alpn.leaf)
        yield deferToThread(a.challenges.remove_http01, "tok")
        yield deferToThread(a.challenges.remove_tls_alpn01, "x.test")
        yield self.eventually(lambda: b.challenges.alpn_certificate("x.test") is None)
        self.assertIsNone(b.challenges.http01_response(b"/.well-known/acme-challenge/tok"))

    @inlineCallbacks
    def test_certificateAnnounced(self) -> None:
        """
        A certificate node A stores reaches node B (local copy, callback);
        one stored while the store was down is shared once it is back; a
        node starting later gets the existing ones.
        """
        a, b = Node(self, "a"), Node(self, "b")
        yield self.eventually(lambda: a.cluster.reachable and b.cluster.reachable)
        yield deferLater(reactor, 0.2, lambda: None)
        chain, key = pem_pair(make_certificate(["x.test"]))
        yield deferToThread(a.store.for_directory(CA).save_certificate, "x.test", key, chain)
        yield self.eventually(lambda: any(h == "x.test" for _, h, _ in b.arrived))
        self.assertEqual(b.arrived[-1][2].issued_by, "a")
        self.assertIsNotNone(b.local.for_directory(CA).load_certificate("x.test"))

        self.redis.stop()
        yield self.eventually(lambda: a.cluster.reachable is False)
        chain, key = pem_pair(make_certificate(["y.test"]))
        yield deferToThread(a.store.for_directory(CA).save_certificate, "y.test", key, chain)
        self.redis.start()
        yield self.eventually(lambda: any(h == "y.test" for _, h, _ in b.arrived), timeout=15)

        c = Node(self, "c")
        yield self.eventually(lambda: {h for _, h, _ in c.arrived} == {"x.test", "y.test"})

    @inlineCallbacks
    def test_badMessageIgnored(self) -> None:
        """
        A message the listener cannot use is logged and the next one is
        still handled.
        """
        a = Node(self, "a")
        yield self.eventually(lambda: a.cluster.reachable)
        yield deferLater(reactor, 0.2, lambda: None)
        client = self.redis.client()
        client.publish("mproxy:events", b"not json")
        client.publish("mproxy:events", b'{"kind": "challenge"}')
        b = self.cluster("b")
        yield deferToThread(ClusterChallenges(ChallengeStore(), b).add_http01, "t2", "t2.k")
        yield self.eventually(lambda: a.local_challenges.key_authorization("t2") == b"t2.k")
        errors = [r for r in a.listener.logger.records if r["level"] == "ERROR"]
        self.assertEqual(len(errors), 2)


class PolicyTests(RedisTestCase):
    @inlineCallbacks
    def test_decisionsShared(self) -> None:
        """
        A decision one node's policy made is reused by the other without
        asking the application again.
        """
        asked = []

        class App:
            def check(self, service, url, host):
                asked.append(host)
                if host == "good.test":
                    return succeed(None)
                return fail(OnDemandDenied(f"{host} is not allowed"))

        def thread(f):
            return deferToThread(f)

        a = ClusterPolicy(App(), self.cluster("a"), thread)
        b = ClusterPolicy(App(), self.cluster("b"), thread)
        self.assertTrue(verifyObject(IOnDemandPolicy, a))
        yield a.check("od", "/allow", "good.test")
        yield self.assertFailure(a.check("od", "/allow", "bad.test"), OnDemandDenied)
        yield deferLater(reactor, 0.2, lambda: None)  # recorded from a thread
        yield b.check("od", "/allow", "good.test")
        error = yield self.assertFailure(b.check("od", "/allow", "bad.test"), OnDemandDenied)
        self.assertEqual(str(error), "bad.test is not allowed")
        self.assertEqual(asked, ["good.test", "bad.test"])
