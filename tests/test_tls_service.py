"""
Tests for L{mproxy.tls.service.CertificateService} with a fake issuer and a
deterministic clock.
"""

import os

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zope.interface import implementer
from zope.interface.verify import verifyObject

from mproxy.errors import CertificateError
from mproxy.logging import ListLogger
from mproxy.spec import ServiceOptions
from mproxy.tls.acme import IssueError
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.gate import OnDemandGate
from mproxy.tls.interfaces import IOnDemandPolicy
from mproxy.tls.orders import OrderRunner
from mproxy.tls.service import CertificateService, Directories
from mproxy.tls.store import CertificateStore
from mproxy.tls.testing import FakeIssuer, make_certificate, pem_pair, synchronous_runner

DAY = 86400.0
PROD = "https://ca.test/prod"
STAGING = "https://ca.test/staging"


def tls(*hosts, **kw):
    return ServiceOptions(hosts=hosts, tls_enabled=True, **kw)


class ServiceTestMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.issuers: dict = {}
        self.service = self.make()

    def make(self, run_in_thread=None, policy=RetryPolicy(), on_demand=None, **gate):
        def factory(url):
            issuer = self.issuers.get(url)
            if issuer is None:
                issuer = self.issuers[url] = FakeIssuer(self.clock)
            return issuer

        self.logger = ListLogger()
        store = CertificateStore(self.state)
        orders = OrderRunner(store, factory, run_in_thread or synchronous_runner())
        return CertificateService(
            self.clock,
            store,
            orders,
            self.logger,
            gate=OnDemandGate(self.clock, on_demand, self.logger, **gate) if on_demand else None,
            directories=Directories(PROD, STAGING),
            policy=policy,
        )

    @property
    def issuer(self):
        return self.issuers.setdefault(PROD, FakeIssuer(self.clock))

    def states(self):
        return {r.host: r.state for r in self.service.host_status()}


class IssuanceTests(ServiceTestMixin, SynchronousTestCase):
    def test_issuesAtOnceInBackground(self) -> None:
        """
        A TLS deploy starts one order per host on the next reactor turn;
        update_service itself returns without waiting.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test", "b.test"))
        self.assertEqual(self.states(), {"a.test": "pending", "b.test": "pending"})
        self.assertEqual(self.issuer.orders, [])
        self.clock.advance(0)
        self.assertEqual(sorted(self.issuer.orders), [("a.test", "http-01"), ("b.test", "http-01")])
        self.assertEqual(self.states(), {"a.test": "valid", "b.test": "valid"})
        self.assertEqual(self.service.select("a.test").dns_names(), ["a.test"])

    def test_storedOnDisk(self) -> None:
        """
        Issued certificates are in the store and reused after a restart
        without a new order.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        first = self.service.select("a.test")
        self.assertEqual(CertificateStore(self.state).for_directory(PROD).hosts(), ["a.test"])
        self.service.stopService()

        self.issuers.clear()
        again = self.make()
        again.startService()
        again.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.assertEqual(self.issuer.orders, [])
        self.assertEqual(again.select("a.test").leaf, first.leaf)

    def test_notStartedNoOrders(self) -> None:
        """
        Nothing is ordered before the service starts; starting schedules.
        """
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(10)
        self.assertEqual(self.issuer.orders, [])
        self.service.startService()
        self.clock.advance(0)
        self.assertEqual(self.issuer.orders, [("a.test", "http-01")])

    def test_tlsOffNoOrders(self) -> None:
        """
        Services without TLS, with custom certificates or with wildcard
        hosts never cause ACME orders.
        """
        self.service.startService()
        self.service.update_service("plain", ServiceOptions(hosts=["a.test"]))
        chain, key = pem_pair(make_certificate(["*.w.test"]))
        cert = os.path.join(self.state, "c.pem")
        keyp = os.path.join(self.state, "k.pem")
        open(cert, "wb").write(chain)
        open(keyp, "wb").write(key)
        self.service.update_service(
            "static", tls("*.w.test", tls_certificate_path=cert, tls_private_key_path=keyp)
        )
        self.clock.advance(100)
        self.assertEqual(self.issuer.orders, [])

    def test_staging(self) -> None:
        """
        --tls-staging uses the staging directory (and its own store).
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test", tls_staging=True))
        self.clock.advance(0)
        self.assertEqual(self.issuers[STAGING].orders, [("a.test", "http-01")])
        self.assertNotIn(PROD, self.issuers)
        self.assertEqual(CertificateStore(self.state).for_directory(STAGING).hosts(), ["a.test"])

    def test_oneAtATimePerAccount(self) -> None:
        """
        Orders for one directory run one at a time.
        """
        jobs = []

        def run(job):
            d = Deferred()
            jobs.append((job, d))
            return d

        self.service = self.make(run_in_thread=run)
        self.service.startService()
        self.service.update_service("web", tls("a.test", "b.test"))
        self.clock.advance(0)
        self.assertEqual(len(jobs), 1)
        job, d = jobs.pop()
        d.callback(job())
        self.assertEqual(len(jobs), 1)
        job, d = jobs.pop()
        d.callback(job())
        self.assertEqual(self.states(), {"a.test": "valid", "b.test": "valid"})


class RetryTests(ServiceTestMixin, SynchronousTestCase):
    def test_backoffAndAlternatingChallenges(self) -> None:
        """
        Failures retry after 60 s, 120 s, 240 s..., alternating http-01 and
        tls-alpn-01; the status is pending with the last error.
        """
        self.issuer.results["a.test"] = [IssueError("boom 1"), IssueError("boom 2"), None]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        [row] = self.service.host_status()
        self.assertEqual((row.state, row.error), ("pending", "boom 1"))
        self.assertEqual(row.describe(), "pending (boom 1)")
        self.assertEqual(row.next_attempt, self.clock.seconds() + 60)
        self.clock.advance(59)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)
        self.clock.advance(119)
        self.assertEqual(len(self.issuer.orders), 2)
        self.clock.advance(1)
        self.assertEqual(
            [t for _, t in self.issuer.orders], ["http-01", "tls-alpn-01", "http-01"]
        )
        self.assertEqual(self.states(), {"a.test": "valid"})

    def test_failedChallengeTriesTheOtherTypeAtOnce(self) -> None:
        """
        When http-01 fails validation (port 80 unreachable), tls-alpn-01 is
        tried at once; only when both failed does the backoff apply.
        """
        self.issuer.results["a.test"] = [
            IssueError("validation failed", challenge_failed=True),
            IssueError("validation failed", challenge_failed=True),
            IssueError("validation failed", challenge_failed=True),
            None,
        ]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(
            [t for _, t in self.issuer.orders], ["http-01", "tls-alpn-01"]
        )
        [row] = self.service.host_status()
        self.assertEqual(row.next_attempt, self.clock.seconds() + 120)
        self.clock.advance(120)
        self.clock.advance(0)
        self.assertEqual(
            [t for _, t in self.issuer.orders],
            ["http-01", "tls-alpn-01", "http-01", "tls-alpn-01"],
        )
        self.assertEqual(self.states(), {"a.test": "valid"})

    def test_retryAfterRespected(self) -> None:
        """
        A rateLimited error waits at least the CA's Retry-After.
        """
        self.issuer.results["a.test"] = [IssueError("slow down", retry_after=900, rate_limited=True)]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.clock.advance(899)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)

    def test_rateLimitedWithoutRetryAfter(self) -> None:
        """
        rateLimited without Retry-After waits an hour.
        """
        self.issuer.results["a.test"] = [IssueError("limit", rate_limited=True)]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.clock.advance(3599)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)

    def test_backoffCapped(self) -> None:
        """
        The delay doubles up to retry_max; after failed_after failures the
        host shows as failed but is still retried.
        """
        self.service = self.make(policy=RetryPolicy(initial=10, maximum=50, failed_after=3))
        self.issuer.results["a.test"] = [IssueError(f"e{i}") for i in range(6)]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        times = []
        self.clock.advance(0)
        for _ in range(5):
            times.append(self.service.host_status()[0].next_attempt - self.clock.seconds())
            self.clock.advance(times[-1])
        self.assertEqual(times, [10, 20, 40, 50, 50])
        [row] = self.service.host_status()
        self.assertEqual(row.state, "failed")
        self.assertEqual(row.describe(), "failed (e5)")

    def test_permanentFailure(self) -> None:
        """
        An error the CA calls permanent marks the host failed at once.
        """
        self.issuer.results["a.test"] = [IssueError("no", permanent=True)]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.assertEqual(self.states(), {"a.test": "failed"})

    def test_unexpectedExceptionRetried(self) -> None:
        """
        A crash in the issuer is logged with its traceback and retried like
        any failure.
        """
        self.issuer.results["a.test"] = [RuntimeError("bug")]
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        [crash] = [r for r in self.logger.records if r["level"] == "ERROR"]
        self.assertEqual(crash["msg"], "Certificate order for a.test crashed")
        self.assertEqual(crash["error"], "RuntimeError: bug")
        self.assertIn("RuntimeError", crash["traceback"])
        self.clock.advance(60)
        self.assertEqual(self.states(), {"a.test": "valid"})


class RenewalTests(ServiceTestMixin, SynchronousTestCase):
    def test_renewWhenAThirdLeft(self) -> None:
        """
        A 90-day certificate is renewed after 60 days.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        first = self.service.select("a.test")
        self.clock.advance(60 * DAY - 1)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)
        second = self.service.select("a.test")
        self.assertNotEqual(first.leaf, second.leaf)
        self.assertEqual(second.not_after, self.clock.seconds() + 90 * DAY)

    def test_renewalFailureKeepsCertificate(self) -> None:
        """
        While renewal fails the old certificate is served and the status
        says so.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        first = self.service.select("a.test")
        self.issuer.results["a.test"] = [IssueError("down")]
        self.clock.advance(60 * DAY)
        self.assertIs(self.service.select("a.test"), first)
        [row] = self.service.host_status()
        self.assertEqual(row.state, "valid")
        self.assertIn("renewal failing: down", row.describe())

    def test_storedCertificateDueIsRenewedAtStart(self) -> None:
        """
        A stored certificate past its renewal time is renewed at start but
        served meanwhile.
        """
        now = self.clock.seconds()
        chain, key = pem_pair(make_certificate(["a.test"], not_before=now - 80 * DAY, not_after=now + 10 * DAY))
        CertificateStore(self.state).for_directory(PROD).save_certificate("a.test", key, chain)
        jobs = []
        self.service = self.make(run_in_thread=lambda job: jobs.append(job) or Deferred())
        self.service.update_service("web", tls("a.test"))
        self.service.startService()
        self.assertIsNotNone(self.service.select("a.test"))
        self.clock.advance(0)
        self.assertEqual(len(jobs), 1)

    def test_removedHostsNotRenewed(self) -> None:
        """
        Hosts no longer deployed are neither renewed nor retried, and an
        order in flight is ignored.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test", "b.test"))
        self.clock.advance(0)
        self.service.update_service("web", tls("b.test"))
        self.clock.advance(100 * DAY)
        self.assertNotIn(("a.test", "http-01"), self.issuer.orders[2:])
        self.assertEqual(self.states(), {"b.test": "valid"})
        self.assertIsNone(self.service.select("a.test"))
        self.service.remove_service("web")
        n = len(self.issuer.orders)
        self.clock.advance(100 * DAY)
        self.assertEqual(len(self.issuer.orders), n)
        self.assertEqual(self.service.host_status(), [])

    def test_inFlightOrderForRemovedHost(self) -> None:
        """
        The result of an order for a host removed meanwhile is dropped.
        """
        jobs = []
        self.service = self.make(run_in_thread=lambda job: jobs.append((job, Deferred())) or jobs[-1][1])
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.service.remove_service("web")
        job, d = jobs.pop()
        d.errback(IssueError("late"))
        attempts = [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_attempt"]
        self.assertEqual(attempts, [])
        self.assertEqual(self.service.host_status(), [])

    def test_stopCancelsTimers(self) -> None:
        """
        Stopping the service cancels scheduled orders and the static poll,
        and tells issuers to give up orders in progress.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.issuer.cancelled)


class ValidateTests(ServiceTestMixin, SynchronousTestCase):
    def files(self, chain, key):
        c = os.path.join(self.state, "c.pem")
        k = os.path.join(self.state, "k.pem")
        with open(c, "wb") as f:
            f.write(chain)
        with open(k, "wb") as f:
            f.write(key)
        return c, k

    def test_wildcardRefused(self) -> None:
        """
        Automatic TLS refuses wildcard hosts.
        """
        e = self.assertRaises(CertificateError, self.service.validate, tls("*.a.test"))
        self.assertEqual(str(e), "automatic TLS does not support wildcards")

    def test_validStatic(self) -> None:
        """
        A matching certificate and key validate.
        """
        c, k = self.files(*pem_pair(make_certificate(["a.test"])))
        self.service.validate(tls("a.test", tls_certificate_path=c, tls_private_key_path=k))

    def test_missingFile(self) -> None:
        """
        A missing file is an error naming the file.
        """
        e = self.assertRaises(
            CertificateError,
            self.service.validate,
            tls("a.test", tls_certificate_path="/nonexistent/c.pem", tls_private_key_path="/nonexistent/k.pem"),
        )
        self.assertEqual(
            str(e), "unable to load certificate: open /nonexistent/c.pem: no such file or directory"
        )

    def test_swapped(self) -> None:
        """
        Certificate and key swapped: not a PEM certificate.
        """
        chain, key = pem_pair(make_certificate(["a.test"]))
        c, k = self.files(chain, key)
        e = self.assertRaises(
            CertificateError,
            self.service.validate,
            tls("a.test", tls_certificate_path=k, tls_private_key_path=c),
        )
        self.assertTrue(str(e).startswith("unable to load certificate: "))

    def test_mismatch(self) -> None:
        """
        A key of another certificate is refused.
        """
        chain, _ = pem_pair(make_certificate(["a.test"]))
        _, other = pem_pair(make_certificate(["b.test"]))
        c, k = self.files(chain, other)
        e = self.assertRaises(
            CertificateError,
            self.service.validate,
            tls("a.test", tls_certificate_path=c, tls_private_key_path=k),
        )
        self.assertEqual(str(e), "unable to load certificate: private key does not match certificate")

    def test_noTls(self) -> None:
        """
        Options without TLS always validate.
        """
        self.service.validate(ServiceOptions(hosts=["*.a.test"]))


class SelectTests(ServiceTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def static(self, names, name="c"):
        certified = make_certificate(names)
        chain, key = pem_pair(certified)
        c = os.path.join(self.state, name + ".crt")
        k = os.path.join(self.state, name + ".key")
        with open(c, "wb") as f:
            f.write(chain)
        with open(k, "wb") as f:
            f.write(key)
        return certified, c, k

    def test_unknownAndPlain(self) -> None:
        """
        Unknown names and services without TLS get nothing.
        """
        self.service.update_service("plain", ServiceOptions(hosts=["p.test"]))
        self.assertIsNone(self.service.select("x.test"))
        self.assertIsNone(self.service.select("p.test"))

    def test_pendingRefused(self) -> None:
        """
        A listed host without a certificate yet is refused.
        """
        self.service.update_service("web", tls("a.test"))
        self.assertIsNone(self.service.select("a.test"))

    def test_staticAndAcmeMixed(self) -> None:
        """
        A static service (wildcard allowed) and an ACME service each get
        their own certificate.
        """
        certified, c, k = self.static(["*.s.test"])
        self.service.update_service("s", tls("*.s.test", tls_certificate_path=c, tls_private_key_path=k))
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.assertEqual(self.service.select("x.s.test").leaf, certified.leaf)
        self.assertEqual(self.service.select("a.test").dns_names(), ["a.test"])
        self.assertIsNone(self.service.select("s.test"))
        status = self.service.status()
        self.assertTrue(status["*.s.test"].startswith("valid until "), status)
        self.assertTrue(status["a.test"].startswith("valid until "), status)

    def test_injectedLookup(self) -> None:
        """
        The injected lookup decides which service a name belongs to.
        """
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.service.lookup = lambda name: ("web", self.service._services["web"]) if name == "a.test" else None
        self.assertIsNotNone(self.service.select("a.test"))
        self.service.lookup = lambda name: None
        self.assertIsNone(self.service.select("a.test"))

    def test_defaultWithoutSNI(self) -> None:
        """
        Without SNI the first TLS service in name order serves its first
        host's certificate; removing it moves the default on.
        """
        certified, c, k = self.static(["z.test"])
        self.service.update_service("zz", tls("z.test", tls_certificate_path=c, tls_private_key_path=k))
        self.service.update_service("aa", tls("a.test", "a2.test"))
        self.service.update_service("plain", ServiceOptions(hosts=["p.test"]))
        self.clock.advance(0)
        self.assertEqual(self.service.select(None).dns_names(), ["a.test"])
        self.service.remove_service("aa")
        self.assertEqual(self.service.select(None).leaf, certified.leaf)
        self.service.remove_service("zz")
        self.assertIsNone(self.service.select(None))

    def test_staticReloadOnChange(self) -> None:
        """
        Changed files are picked up by the poll on the clock; a broken file
        keeps the old certificate; reload_static reloads at once.
        """
        certified, c, k = self.static(["a.test"])
        self.service.update_service("s", tls("a.test", tls_certificate_path=c, tls_private_key_path=k))
        old = self.service.select("a.test")
        self.assertEqual(old.leaf, certified.leaf)
        new, _, _ = self.static(["a.test"])  # same paths, new content
        os.utime(c, ns=(1, 1))
        self.clock.advance(5)
        self.assertEqual(self.service.select("a.test").leaf, new.leaf)
        with open(c, "wb") as f:
            f.write(b"garbage")
        self.clock.advance(5)
        self.assertEqual(self.service.select("a.test").leaf, new.leaf)
        [row] = [r for r in self.service.host_status() if r.service == "s"]
        self.assertIn("unable to load certificate", row.error)
        third, _, _ = self.static(["a.test"])
        self.service.reload_static()
        self.assertEqual(self.service.select("a.test").leaf, third.leaf)


@implementer(IOnDemandPolicy)
class FakeChecker:
    def __init__(self):
        self.calls = []
        self.answers = {}

    def check(self, service, url, host):
        self.calls.append((service, url, host))
        answer = self.answers.get(host, False)
        if isinstance(answer, Deferred):
            return answer
        if answer:
            return succeed(None)
        from mproxy.tls.ondemand import OnDemandDenied

        return fail(OnDemandDenied(f"{host} is not allowed to get a certificate (status: 403, body: \"no\")"))


class OnDemandTests(ServiceTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.checker = FakeChecker()
        self.service = self.make(on_demand=self.checker, rate=2, window=600)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.options = ServiceOptions(tls_enabled=True, tls_on_demand_url="/allow")
        self.service.update_service("od", self.options)

    def test_fakeIsAPolicy(self) -> None:
        """
        The fake policy used here provides L{IOnDemandPolicy}.
        """
        self.assertTrue(verifyObject(IOnDemandPolicy, self.checker))

    def test_deniedNeverOrders(self) -> None:
        """
        A denied host triggers no ACME order; the denial is cached for a
        minute.
        """
        self.assertIsNone(self.service.select("evil.test"))
        self.assertIsNone(self.service.select("evil.test"))
        self.clock.advance(10)
        self.assertEqual(self.issuer.orders, [])
        self.assertEqual(self.checker.calls, [("od", "/allow", "evil.test")])
        self.clock.advance(60)
        self.service.select("evil.test")
        self.assertEqual(len(self.checker.calls), 2)

    def test_approvedIssues(self) -> None:
        """
        An approved host is issued and then served; the check happens once.
        """
        self.checker.answers["good.test"] = True
        self.assertIsNone(self.service.select("good.test"))
        self.clock.advance(0)
        self.assertEqual(self.issuer.orders, [("good.test", "http-01")])
        self.assertIsNotNone(self.service.select("good.test"))
        self.assertEqual(len(self.checker.calls), 1)
        self.assertTrue(self.service.status()["good.test"].startswith("valid until "))

    def test_checkInFlightNotRepeated(self) -> None:
        """
        Handshakes during a pending check don't start more checks.
        """
        self.checker.answers["good.test"] = d = Deferred()
        self.service.select("good.test")
        self.service.select("good.test")
        self.assertEqual(len(self.checker.calls), 1)
        d.callback(None)
        self.clock.advance(0)
        self.assertEqual(len(self.issuer.orders), 1)

    def test_invalidNamesIgnored(self) -> None:
        """
        IP literals and dotless names never reach the policy.
        """
        for name in ["127.0.0.1", "localhost", "a..b"]:
            self.assertIsNone(self.service.select(name))
        self.assertEqual(self.checker.calls, [])

    def test_rateLimited(self) -> None:
        """
        At most on_demand_rate new orders per window; the rest wait.
        """
        for h in ["a.test", "b.test", "c.test"]:
            self.checker.answers[h] = True
            self.service.select(h)
        self.clock.advance(0)
        self.assertEqual(len(self.issuer.orders), 2)
        self.clock.advance(599)
        self.assertEqual(len(self.issuer.orders), 2)
        self.clock.advance(1)
        self.assertEqual(self.issuer.orders[-1][0], "c.test")

    def test_storedCertificateApprovedWithoutAsking(self) -> None:
        """
        A host with a stored certificate is served without consulting the
        policy, and is then renewed.
        """
        chain, key = pem_pair(make_certificate(["old.test"]))
        CertificateStore(self.state).for_directory(PROD).save_certificate("old.test", key, chain)
        self.assertIsNotNone(self.service.select("old.test"))
        self.assertEqual(self.checker.calls, [])

    def test_removedServiceForgetsHosts(self) -> None:
        """
        Removing the on-demand service stops managing its hosts.
        """
        self.checker.answers["good.test"] = True
        self.service.select("good.test")
        self.clock.advance(0)
        self.service.remove_service("od")
        self.assertEqual(self.service.host_status(), [])


class StatusTests(ServiceTestMixin, SynchronousTestCase):
    def test_statusByHost(self) -> None:
        """
        status() maps each host to a one-line description, as the
        controller's listing wants.
        """
        self.issuer.results["b.test"] = [IssueError("dns problem")]
        self.service.startService()
        self.service.update_service("web", tls("a.test", "b.test"))
        self.service.update_service("plain", ServiceOptions(hosts=["p.test"]))
        self.clock.advance(0)
        status = self.service.status()
        self.assertEqual(sorted(status), ["a.test", "b.test"])
        self.assertTrue(status["a.test"].startswith("valid until 1970-"), status["a.test"])
        self.assertEqual(status["b.test"], "pending (dns problem)")


class BrokenStaticTests(ServiceTestMixin, SynchronousTestCase):
    def test_restoreWithMissingFiles(self) -> None:
        """
        update_service with unreadable custom certificate files (state
        restore) does not raise: the host is failed, handshakes are refused,
        and the certificate is picked up once the files appear.
        """
        self.service.startService()
        self.addCleanup(self.service.stopService)
        c = os.path.join(self.state, "c.pem")
        k = os.path.join(self.state, "k.pem")
        self.service.update_service("s", tls("a.test", tls_certificate_path=c, tls_private_key_path=k))
        self.assertIsNone(self.service.select("a.test"))
        self.assertTrue(self.service.status()["a.test"].startswith("failed (unable to load certificate: open "))
        certified = make_certificate(["a.test"])
        chain, key = pem_pair(certified)
        with open(c, "wb") as f:
            f.write(chain)
        with open(k, "wb") as f:
            f.write(key)
        self.clock.advance(5)
        self.assertEqual(self.service.select("a.test").leaf, certified.leaf)
        self.assertTrue(self.service.status()["a.test"].startswith("valid until "))


class PathServiceTests(ServiceTestMixin, SynchronousTestCase):
    def test_pathServiceDoesNotOwnCertificates(self) -> None:
        """
        A path service that inherited TLS from its host's root service does
        not start orders of its own; the root service's certificate serves
        the host, and listing the hosts once.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.service.update_service("api", tls("a.test", path_prefixes=["/api"]))
        self.clock.advance(0)
        self.assertEqual(self.issuer.orders, [("a.test", "http-01")])
        self.assertEqual([(r.service, r.host) for r in self.service.host_status()], [("web", "a.test")])
        self.service.lookup = lambda name: ("web", self.service._services["web"])
        self.assertIsNotNone(self.service.select("a.test"))
        self.service.remove_service("api")
        self.assertIsNotNone(self.service.select("a.test"))


class RedeployStaticTests(ServiceTestMixin, SynchronousTestCase):
    def test_redeployReloads(self) -> None:
        """
        Redeploying with the same paths loads replaced files at once.
        """
        c = os.path.join(self.state, "c.pem")
        k = os.path.join(self.state, "k.pem")

        def write():
            certified = make_certificate(["a.test"])
            chain, key = pem_pair(certified)
            with open(c, "wb") as f:
                f.write(chain)
            with open(k, "wb") as f:
                f.write(key)
            return certified

        write()
        options = tls("a.test", tls_certificate_path=c, tls_private_key_path=k)
        self.service.update_service("s", options)
        new = write()
        self.service.validate(options)
        self.service.update_service("s", options)
        self.assertEqual(self.service.select("a.test").leaf, new.leaf)


class OnDemandFloodTests(ServiceTestMixin, SynchronousTestCase):
    def test_concurrentChecksBounded(self) -> None:
        """
        At most on_demand_max_checks policy requests run at once.
        """
        checker = FakeChecker()
        pending = []
        checker.check = lambda service, url, host: pending.append(host) or Deferred()
        self.service = self.make(on_demand=checker, max_checks=3)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.service.update_service("od", ServiceOptions(tls_enabled=True, tls_on_demand_url="/allow"))
        for i in range(10):
            self.service.select(f"h{i}.test")
        self.assertEqual(pending, ["h0.test", "h1.test", "h2.test"])


class FakeCluster:
    def __init__(self, node="a"):
        self.node = node
        self.reachable = True


class ClusterStatusTests(ServiceTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cluster = FakeCluster()
        self.service.cluster = self.cluster

    def test_adoptFromAnotherNode(self) -> None:
        """
        A certificate another node announces is served for a deployed host
        and renewed from; one for a host deployed later is known as that
        node's when it is loaded from the local copy.
        """
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        now = self.clock.seconds()
        newer = make_certificate(["a.test"], not_before=now, not_after=now + 120 * DAY)
        newer.issued_by = "b"
        self.service.adopt(PROD, "a.test", newer)
        self.assertIs(self.service.select("a.test"), newer)
        self.assertIn("; issued by b", self.service.status()["a.test"])
        [row] = self.service.host_status()
        self.assertEqual(row.next_attempt, now + 80 * DAY)

        other = make_certificate(["c.test"], not_before=now, not_after=now + 90 * DAY)
        chain, key = pem_pair(other)
        CertificateStore(self.state).for_directory(PROD).save_certificate("c.test", key, chain)
        other.issued_by = "c"
        self.service.adopt(PROD, "c.test", other)
        self.service.update_service("second", tls("c.test"))
        self.assertIn("; issued by c", self.service.status()["c.test"])

    def test_orderingAndUnreachable(self) -> None:
        """
        While this node orders, the row says so; an unreachable store is
        said on every row.
        """
        jobs = []
        self.service = self.make(run_in_thread=lambda job: jobs.append(job) or Deferred())
        self.service.cluster = self.cluster
        self.service.startService()
        self.service.update_service("web", tls("a.test"))
        self.clock.advance(0)
        self.assertEqual(self.service.status()["a.test"], "pending; ordering on a")
        self.cluster.reachable = False
        self.assertEqual(
            self.service.status()["a.test"], "pending; ordering on a; cluster store unreachable"
        )
