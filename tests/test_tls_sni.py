"""
Tests for L{mproxy.tls.sni}: certificate selection and ALPN, driven through
in-memory handshakes.
"""

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.tls.challenges import ACME_IDENTIFIER_OID, ChallengeStore, tls_alpn_certificate
from mproxy.tls.sni import ServerTLS, normalise_server_name
from mproxy.tls.testing import handshake, make_ca, make_certificate


def peer(client: SSL.Connection) -> x509.Certificate:
    return client.get_peer_certificate().to_cryptography()


class ServerTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca()
        self.certs = {
            "a.test": make_certificate(["a.test"], issuer=self.ca),
            "b.test": make_certificate(["b.test"]),
        }
        self.asked: list = []
        self.challenges = ChallengeStore()

        def select(name):
            self.asked.append(name)
            if name is None:
                return self.certs["b.test"]
            return self.certs.get(name)

        self.logger = ListLogger()
        self.tls = ServerTLS(select, self.challenges, logger=self.logger)

    def connect(self, name, alpn=None, **kw):
        return handshake(self.tls.serverConnectionForTLS(None), name, alpn, **kw)

    def test_provides(self) -> None:
        """
        L{ServerTLS} is an L{IOpenSSLServerConnectionCreator}.
        """
        self.assertTrue(IOpenSSLServerConnectionCreator.providedBy(self.tls))

    def test_selectsBySNI(self) -> None:
        """
        The certificate chosen by C{select} for the SNI name is served, with
        its chain.
        """
        client, err = self.connect(b"A.Test.")
        self.assertIsNone(err)
        self.assertEqual(self.asked, ["a.test"])
        self.assertEqual(peer(client), self.certs["a.test"].leaf)
        chain = client.get_peer_cert_chain()
        self.assertEqual(len(chain), 2)
        self.assertEqual(chain[1].to_cryptography(), self.ca.leaf)

    def test_noSNI(self) -> None:
        """
        Without SNI, C{select(None)} supplies the default certificate.
        """
        client, err = self.connect(None)
        self.assertIsNone(err)
        self.assertEqual(self.asked, [None])
        self.assertEqual(peer(client), self.certs["b.test"].leaf)

    def test_unknownRefused(self) -> None:
        """
        When C{select} returns None the handshake fails.
        """
        client, err = self.connect(b"c.test")
        self.assertIsInstance(err, SSL.Error)

    def test_selectRaisesRefused(self) -> None:
        """
        An exception from C{select} refuses the handshake (and is logged).
        """
        self.tls.select = lambda name: 1 / 0
        client, err = self.connect(b"a.test")
        self.assertIsInstance(err, SSL.Error)
        [error] = [r for r in self.logger.records if r["level"] == "ERROR"]
        self.assertEqual(error["msg"], "Selecting a certificate for 'a.test' failed")
        self.assertIn("ZeroDivisionError", error["traceback"])

    def test_alpnH2(self) -> None:
        """
        h2 is preferred over http/1.1.
        """
        client, err = self.connect(b"a.test", [b"http/1.1", b"h2"])
        self.assertIsNone(err)
        self.assertEqual(client.get_alpn_proto_negotiated(), b"h2")

    def test_alpnHttp11(self) -> None:
        """
        A client offering only http/1.1 gets it.
        """
        client, err = self.connect(b"a.test", [b"http/1.1"])
        self.assertEqual(client.get_alpn_proto_negotiated(), b"http/1.1")

    def test_alpnNoOverlap(self) -> None:
        """
        Unknown ALPN protocols are not fatal; none is negotiated.
        """
        client, err = self.connect(b"a.test", [b"spdy/3"])
        self.assertIsNone(err)
        self.assertEqual(client.get_alpn_proto_negotiated(), b"")

    def test_tls12Minimum(self) -> None:
        """
        TLS 1.1 clients are refused; TLS 1.2 works.
        """
        client, err = self.connect(b"a.test", max_version=SSL.TLS1_1_VERSION)
        self.assertIsNotNone(err)
        client, err = self.connect(b"a.test", max_version=SSL.TLS1_2_VERSION)
        self.assertIsNone(err)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")

    def test_acmeTlsAlpn(self) -> None:
        """
        A client offering acme-tls/1 for a name with a pending TLS-ALPN-01
        challenge gets the challenge certificate, even when the name has no
        regular certificate yet; the acmeIdentifier extension is critical.
        """
        self.challenges.add_tls_alpn01("new.test", tls_alpn_certificate("new.test", "tok.thumb"))
        for version in (None, SSL.TLS1_2_VERSION):
            client, err = self.connect(b"new.test", [b"acme-tls/1"], max_version=version)
            self.assertIsNone(err)
            self.assertEqual(client.get_alpn_proto_negotiated(), b"acme-tls/1")
            ext = peer(client).extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
            self.assertTrue(ext.critical)

    def test_acmeTlsAlpnOverridesExisting(self) -> None:
        """
        The challenge certificate wins over an existing certificate for
        acme-tls/1 clients only.
        """
        chal = tls_alpn_certificate("a.test", "x.y")
        self.challenges.add_tls_alpn01("a.test", chal)
        client, _ = self.connect(b"a.test", [b"acme-tls/1"])
        self.assertEqual(peer(client), chal.leaf)
        client, _ = self.connect(b"a.test", [b"h2"])
        self.assertEqual(peer(client), self.certs["a.test"].leaf)

    def test_acmeTlsAlpnWithoutChallenge(self) -> None:
        """
        acme-tls/1 without a pending challenge is not negotiated.
        """
        client, err = self.connect(b"a.test", [b"acme-tls/1"])
        self.assertEqual(client.get_alpn_proto_negotiated(), b"")

    def test_contextCached(self) -> None:
        """
        One context per certificate.
        """
        c = self.certs["a.test"]
        self.assertIs(self.tls.context_for(c), self.tls.context_for(c))

    def test_normaliseServerName(self) -> None:
        """
        Server names are lower-cased without trailing dots; empty and
        non-ASCII names count as absent.
        """
        self.assertEqual(normalise_server_name(b"WWW.X.Test."), "www.x.test")
        self.assertIsNone(normalise_server_name(b""))
        self.assertIsNone(normalise_server_name(None))
        self.assertIsNone(normalise_server_name(b"\xff"))
