"""
Tests for L{mproxy.tls.challenges}.
"""

import hashlib

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from mproxy.tls.challenges import (
    ACME_IDENTIFIER_OID,
    ACMEChallengeResource,
    ChallengeStore,
    tls_alpn_certificate,
)


class ChallengeStoreTests(SynchronousTestCase):
    def test_http01(self) -> None:
        """
        Known tokens on the challenge path answer with the key authorization.
        """
        s = ChallengeStore()
        s.add_http01("tok", "tok.thumb")
        self.assertEqual(s.http01_response(b"/.well-known/acme-challenge/tok"), b"tok.thumb")
        self.assertEqual(s.key_authorization("tok"), b"tok.thumb")
        self.assertIsNone(s.http01_response(b"/.well-known/acme-challenge/other"))
        self.assertIsNone(s.http01_response(b"/.well-known/acme-challenge/"))
        self.assertIsNone(s.http01_response(b"/.well-known/acme-challenge/tok/x"))
        self.assertIsNone(s.http01_response(b"/tok"))
        s.remove_http01("tok")
        self.assertIsNone(s.http01_response(b"/.well-known/acme-challenge/tok"))

    def test_tlsAlpnCertificate(self) -> None:
        """
        The TLS-ALPN-01 certificate names the domain and carries a critical
        acmeIdentifier with the DER OCTET STRING of SHA-256(key authz).
        """
        c = tls_alpn_certificate("a.test", "tok.thumb")
        ext = c.leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        self.assertTrue(ext.critical)
        digest = hashlib.sha256(b"tok.thumb").digest()
        self.assertEqual(ext.value.value, b"\x04\x20" + digest)
        san = c.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["a.test"])

    def test_alpnStore(self) -> None:
        """
        TLS-ALPN-01 certificates are looked up case-insensitively.
        """
        s = ChallengeStore()
        c = tls_alpn_certificate("a.test", "k")
        s.add_tls_alpn01("A.test", c)
        self.assertIs(s.alpn_certificate("a.test."), c)
        self.assertIsNone(s.alpn_certificate(None))
        s.remove_tls_alpn01("a.test")
        self.assertIsNone(s.alpn_certificate("a.test"))


class Leaf(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"app:" + request.path


def render(resource, path):
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.path = path
    child = resource
    while request.postpath and not child.isLeaf:
        name = request.postpath.pop(0)
        request.prepath.append(name)
        child = child.getChildWithDefault(name, request)
    return child.render(request), request


class ResourceTests(SynchronousTestCase):
    def test_wrapping(self) -> None:
        """
        The wrapper answers known tokens and passes everything else on.
        """
        s = ChallengeStore()
        s.add_http01("tok", "tok.thumb")
        root = ACMEChallengeResource(s, Leaf())
        body, req = render(root, b"/.well-known/acme-challenge/tok")
        self.assertEqual(body, b"tok.thumb")
        body, req = render(root, b"/some/path")
        self.assertEqual(body, b"app:/some/path")
