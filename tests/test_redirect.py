"""
Tests for L{mproxy.http.redirect}.
"""

from twisted.trial.unittest import SynchronousTestCase

from mproxy.http.redirect import redirect_body, redirect_location, split_host_port


def loc(**kw):
    base = dict(secure=False, host_header="example.com", uri="/a?b=1", tls_enabled=True)
    base.update(kw)
    return redirect_location(**base)


class RedirectLocationTests(SynchronousTestCase):
    def test_plainToHttps(self) -> None:
        """
        Plain HTTP to a TLS service redirects to https, keeping path and query.
        """
        self.assertEqual(loc(), "https://example.com/a?b=1")

    def test_hostPortDropped(self) -> None:
        """
        The port of the plain request's Host header is not carried over to https.
        """
        self.assertEqual(loc(host_header="example.com:8080"), "https://example.com/a?b=1")

    def test_nonDefaultHttpsPortKept(self) -> None:
        """
        A non-default HTTPS port appears in the Location.
        """
        self.assertEqual(
            loc(host_header="example.com:8080", https_port=8443),
            "https://example.com:8443/a?b=1",
        )

    def test_alreadySecure(self) -> None:
        """
        HTTPS requests are not redirected (no canonical host).
        """
        self.assertIsNone(loc(secure=True))

    def test_tlsOff(self) -> None:
        """
        Services without TLS are not redirected.
        """
        self.assertIsNone(loc(tls_enabled=False))

    def test_redirectDisabled(self) -> None:
        """
        C{--tls-redirect=false} serves plain HTTP normally.
        """
        self.assertIsNone(loc(tls_redirect=False))

    def test_acmeChallengeNeverRedirected(self) -> None:
        """
        HTTP-01 challenge paths are never redirected, even with a canonical host.
        """
        self.assertIsNone(
            loc(uri="/.well-known/acme-challenge/tok", canonical_host="other.com")
        )

    def test_internalNeverRedirected(self) -> None:
        """
        Internal (on-demand probe) requests are not redirected.
        """
        self.assertIsNone(loc(internal=True))

    def test_canonicalAndTlsInOneHop(self) -> None:
        """
        TLS and canonical host redirect happen in one hop.
        """
        self.assertEqual(
            loc(host_header="www.example.com", canonical_host="example.com"),
            "https://example.com/a?b=1",
        )

    def test_canonicalOnHttps(self) -> None:
        """
        HTTPS to a non-canonical host redirects to https://<canonical>.
        """
        self.assertEqual(
            loc(secure=True, host_header="www.example.com", canonical_host="example.com"),
            "https://example.com/a?b=1",
        )

    def test_canonicalSameHostCaseInsensitive(self) -> None:
        """
        The canonical host compared case-insensitively does not redirect.
        """
        self.assertIsNone(
            loc(secure=True, host_header="Example.COM:443", canonical_host="example.com")
        )

    def test_canonicalPlainWithoutTls(self) -> None:
        """
        Without TLS a canonical redirect stays on http, keeping a non-default
        HTTP port.
        """
        self.assertEqual(
            loc(tls_enabled=False, host_header="www.x.com:8080",
                canonical_host="x.com", http_port=8080),
            "http://x.com:8080/a?b=1",
        )

    def test_absoluteFormUri(self) -> None:
        """
        An absolute-form request target contributes only its path.
        """
        self.assertEqual(loc(uri="http://example.com/p?q"), "https://example.com/p?q")

    def test_ipv6Host(self) -> None:
        """
        Bracketed IPv6 hosts keep their brackets.
        """
        self.assertEqual(loc(host_header="[::1]:80", uri="/"), "https://[::1]/")

    def test_body(self) -> None:
        """
        The body links to the (escaped) location.
        """
        self.assertIn(b'href="https://x/?a=1&amp;b=2"', redirect_body("https://x/?a=1&b=2"))

    def test_splitHostPort(self) -> None:
        """
        Host headers split into host and port.
        """
        self.assertEqual(split_host_port("a.b:81"), ("a.b", "81"))
        self.assertEqual(split_host_port("a.b"), ("a.b", ""))
        self.assertEqual(split_host_port("[::1]"), ("[::1]", ""))
