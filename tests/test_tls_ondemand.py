"""
Tests for L{mproxy.tls.ondemand}.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.tls.ondemand import OnDemandChecker, OnDemandDenied, check_url


class CheckURLTests(SynchronousTestCase):
    def test_path(self) -> None:
        """
        A path gets ?host= appended.
        """
        self.assertEqual(check_url("/allow-host", "test.example.com"), "/allow-host?host=test.example.com")

    def test_portEncoded(self) -> None:
        """
        A port in the host is percent-encoded.
        """
        self.assertEqual(check_url("/allow", "a.test:8080"), "/allow?host=a.test%3A8080")

    def test_existingQuerySorted(self) -> None:
        """
        Existing parameters are kept and sorted with host.
        """
        self.assertEqual(
            check_url("/check?token=abc", "a.example.com"), "/check?host=a.example.com&token=abc"
        )
        self.assertEqual(
            check_url("https://auth.test/check?token=abc", "a.example.com"),
            "https://auth.test/check?host=a.example.com&token=abc",
        )


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.requests = []
        self.local = []

    def checker(self, answer):
        def http_get(url):
            self.requests.append(url)
            return answer if isinstance(answer, Deferred) else succeed(answer)

        def local_get(service, path, host):
            self.local.append((service, path, host))
            return answer if isinstance(answer, Deferred) else succeed(answer)

        return OnDemandChecker(self.clock, http_get=http_get, local_get=local_get)

    def test_externalApproves(self) -> None:
        """
        A 200 from an external URL approves.
        """
        d = self.checker((200, b"ok")).check("svc", "http://auth.test/allow", "a.test")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.requests, ["http://auth.test/allow?host=a.test"])

    def test_externalDenies(self) -> None:
        """
        Any other status denies with status and body in the message.
        """
        d = self.checker((403, b"Access denied")).check("svc", "http://auth.test/allow", "a.test")
        f = self.failureResultOf(d, OnDemandDenied)
        self.assertEqual(
            str(f.value),
            'a.test is not allowed to get a certificate (status: 403, body: "Access denied")',
        )

    def test_redirectIsDenial(self) -> None:
        """
        A 302 (redirects are not followed) denies.
        """
        d = self.checker((302, b"")).check("svc", "http://auth.test/allow", "a.test")
        self.assertIn("status: 302", str(self.failureResultOf(d, OnDemandDenied).value))

    def test_bodyTruncated(self) -> None:
        """
        Denial bodies are cut to 256 bytes.
        """
        d = self.checker((403, b"x" * 500)).check("svc", "/allow", "a.test")
        msg = str(self.failureResultOf(d, OnDemandDenied).value)
        self.assertIn('body: "' + "x" * 256 + '")', msg)

    def test_localPath(self) -> None:
        """
        A path goes through the service's own handler chain with the checked
        host.
        """
        d = self.checker((200, b"")).check("svc", "/allow?token=t", "a.test")
        self.successResultOf(d)
        self.assertEqual(self.local, [("svc", "/allow?host=a.test&token=t", "a.test")])
        self.assertEqual(self.requests, [])

    def test_timeout(self) -> None:
        """
        No answer within 2 seconds denies.
        """
        pending = Deferred()
        d = self.checker(pending).check("svc", "http://auth.test/allow", "a.test")
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertIn("timed out", str(self.failureResultOf(d, OnDemandDenied).value))

    def test_transportError(self) -> None:
        """
        A connection error denies.
        """
        def http_get(url):
            raise ConnectionRefusedError("refused")

        d = OnDemandChecker(self.clock, http_get=http_get).check("svc", "http://x.test/", "a.test")
        self.assertIn("error: refused", str(self.failureResultOf(d, OnDemandDenied).value))

    def test_noLocalGet(self) -> None:
        """
        Without a local_get, path URLs deny.
        """
        d = OnDemandChecker(self.clock).check("svc", "/allow", "a.test")
        self.failureResultOf(d, OnDemandDenied)
