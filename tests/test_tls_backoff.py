"""
Tests for L{mproxy.tls.backoff.RetryPolicy}.
"""

from twisted.trial.unittest import SynchronousTestCase

from mproxy.tls.acme import IssueError
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.testing import make_certificate


class RetryPolicyTests(SynchronousTestCase):
    def test_doublingCapped(self) -> None:
        """
        The delay doubles from C{initial} per failure up to C{maximum}.
        """
        policy = RetryPolicy(initial=10, maximum=50)
        self.assertEqual([policy.delay(n, IssueError("x")) for n in range(1, 6)], [10, 20, 40, 50, 50])

    def test_challengeFailedTriesNextTypeAtOnce(self) -> None:
        """
        A failed validation retries at once while the next challenge type is
        still untried, then backs off.
        """
        policy = RetryPolicy()
        error = IssueError("validation failed", challenge_failed=True)
        self.assertEqual((policy.delay(1, error), policy.delay(2, error)), (0.0, 120.0))
        self.assertEqual([policy.challenge_for(n) for n in range(3)], ["http-01", "tls-alpn-01", "http-01"])

    def test_caWaits(self) -> None:
        """
        Retry-After is a floor, rateLimited without it waits
        C{rate_limit_wait}, permanent errors wait C{maximum}.
        """
        policy = RetryPolicy()
        self.assertEqual(policy.delay(1, IssueError("x", retry_after=900)), 900)
        self.assertEqual(policy.delay(1, IssueError("x", rate_limited=True)), 3600)
        self.assertEqual(policy.delay(1, IssueError("x", permanent=True)), 6 * 3600)

    def test_failedAndRenewal(self) -> None:
        """
        A host is failed after C{failed_after} failures or a permanent error;
        renewal is due when C{renew_fraction} of the lifetime is left.
        """
        policy = RetryPolicy(failed_after=2, renew_fraction=0.25)
        self.assertEqual(
            [policy.is_failed(1, False), policy.is_failed(2, False), policy.is_failed(0, True)],
            [False, True, True],
        )
        cert = make_certificate(["a.test"], not_before=1000, not_after=2000)
        self.assertEqual(policy.renew_at(cert), 1750)
