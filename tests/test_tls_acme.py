"""
Unit tests for L{mproxy.tls.acme} that need no ACME server: error mapping,
Retry-After, and the retry of badNonce / unknown accounts.
"""

import os

from acme import messages
from twisted.trial.unittest import SynchronousTestCase

from mproxy.tls.acme import AcmeIssuer, IssueError, parse_retry_after
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.store import CertificateStore


class Response:
    def __init__(self, headers):
        self.headers = headers


class Net:
    def __init__(self, headers):
        self.last_response = Response(headers)


class IssuerErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        state = self.mktemp()
        os.makedirs(state)
        self.store = CertificateStore(state).for_directory("https://ca.test/dir")
        self.issuer = AcmeIssuer("https://ca.test/dir", self.store, ChallengeStore(), now=lambda: 1000.0)

    def failing(self, *errors, headers=None):
        calls = []

        def _issue(host, challenge):
            calls.append(host)
            self.issuer._net = Net(headers or {})
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return b"key", b"chain"

        self.issuer._issue = _issue
        return calls

    def test_rateLimitedWithRetryAfter(self) -> None:
        """
        urn:ietf:params:acme:error:rateLimited with Retry-After maps to a
        rate-limited IssueError with the delay.
        """
        self.failing(
            messages.Error.with_code("rateLimited", detail="too many certificates"),
            headers={"Retry-After": "3600"},
        )
        e = self.assertRaises(IssueError, self.issuer.issue, "a.test", "http-01")
        self.assertTrue(e.rate_limited)
        self.assertEqual(e.retry_after, 3600)
        self.assertFalse(e.permanent)
        self.assertIn("too many certificates", str(e))

    def test_permanent(self) -> None:
        """
        rejectedIdentifier is permanent.
        """
        self.failing(messages.Error.with_code("rejectedIdentifier", detail="forbidden name"))
        e = self.assertRaises(IssueError, self.issuer.issue, "a.test", "http-01")
        self.assertTrue(e.permanent)
        self.assertIsNone(e.retry_after)

    def test_badNonceRetried(self) -> None:
        """
        badNonce is retried (acme itself retries once more inside).
        """
        calls = self.failing(
            messages.Error.with_code("badNonce"), messages.Error.with_code("badNonce")
        )
        self.assertEqual(self.issuer.issue("a.test", "http-01"), (b"key", b"chain"))
        self.assertEqual(len(calls), 3)

    def test_unknownAccountReRegisters(self) -> None:
        """
        accountDoesNotExist forgets the stored account and tries again once.
        """
        self.store.save_account('{"uri": "https://ca.test/acct/1"}')
        calls = self.failing(messages.Error.with_code("accountDoesNotExist"))
        self.issuer.issue("a.test", "http-01")
        self.assertEqual(len(calls), 2)
        self.assertIsNone(self.store.load_account())

    def test_networkError(self) -> None:
        """
        Connection problems become IssueErrors.
        """
        import requests

        self.failing(requests.ConnectionError("refused"))
        e = self.assertRaises(IssueError, self.issuer.issue, "a.test", "http-01")
        self.assertIn("cannot reach the ACME server", str(e))

    def test_parseRetryAfter(self) -> None:
        """
        Retry-After is delta seconds or an HTTP date.
        """
        self.assertEqual(parse_retry_after("120", 0), 120)
        self.assertEqual(parse_retry_after("Thu, 01 Jan 1970 00:10:00 GMT", 300), 300)
        self.assertIsNone(parse_retry_after("soon", 0))
        self.assertIsNone(parse_retry_after(None, 0))


class CancelTests(SynchronousTestCase):
    def test_cancelInterruptsWaits(self) -> None:
        """
        After cancel() the issuer's waits and new orders fail at once.
        """
        state = self.mktemp()
        os.makedirs(state)
        store = CertificateStore(state).for_directory("https://ca.test/dir")
        issuer = AcmeIssuer("https://ca.test/dir", store, ChallengeStore())
        issuer.cancel()
        self.assertRaises(IssueError, issuer.sleep, 60)
        e = self.assertRaises(IssueError, issuer.issue, "a.test", "http-01")
        self.assertEqual(str(e), "stopped")
