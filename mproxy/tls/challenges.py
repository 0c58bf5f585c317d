# -*- test-case-name: tests.test_tls_challenges -*-
"""
ACME challenge responses: HTTP-01 and TLS-ALPN-01 (RFC 8737).

One L{ChallengeStore} is shared by the ACME worker thread (which publishes and
withdraws responses) and the reactor thread (which answers validation
requests), so it is guarded by a lock.

HTTP front integration (before any redirect or routing)::

    body = challenges.http01_response(request.path)   # bytes path
    if body is not None:
        request.setHeader(b"content-type", b"text/plain")
        return body                                    # 200
    # else: a path under /.well-known/acme-challenge/ with an unknown token
    # falls through to normal routing (so apps can answer their own tokens).

or wrap a resource: C{ACMEChallengeResource(challenges, root)}.

TLS side: L{mproxy.tls.sni} asks C{challenges.alpn_certificate(server_name)}
when a client offers ALPN C{acme-tls/1}.
"""

from __future__ import annotations

import datetime
import hashlib
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from twisted.web.resource import IResource, Resource, getChildForRequest
from zope.interface import implementer

from mproxy.tls.certs import CertifiedKey
from mproxy.http.interfaces import IHTTP01Responder
from mproxy.tls.interfaces import IChallengeResponder

__all__ = [
    "ChallengeStore",
    "ACMEChallengeResource",
    "ACME_IDENTIFIER_OID",
    "tls_alpn_certificate",
    "HTTP01_PREFIX",
]

HTTP01_PREFIX = b"/.well-known/acme-challenge/"
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def tls_alpn_certificate(domain: str, key_authorization: str) -> CertifiedKey:
    """
    Build the self-signed TLS-ALPN-01 certificate for C{domain}: SAN
    C{dNSName=domain} and the critical acmeIdentifier extension holding the
    DER OCTET STRING of SHA-256(key authorization).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    der = b"\x04" + bytes([len(digest)]) + digest
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, der), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(key=key, chain=[cert])


@implementer(IChallengeResponder, IHTTP01Responder)
class ChallengeStore:
    """
    Thread-safe map of pending challenge responses.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http01: dict[str, bytes] = {}
        self._alpn: dict[str, CertifiedKey] = {}

    # -- writers (any thread) --------------------------------------------

    def add_http01(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._http01[token] = key_authorization.encode("ascii")

    def remove_http01(self, token: str) -> None:
        with self._lock:
            self._http01.pop(token, None)

    def add_tls_alpn01(self, domain: str, certificate: CertifiedKey) -> None:
        with self._lock:
            self._alpn[domain.lower()] = certificate

    def remove_tls_alpn01(self, domain: str) -> None:
        with self._lock:
            self._alpn.pop(domain.lower(), None)

    # -- readers (reactor thread) ----------------------------------------

    def key_authorization(self, token: str) -> bytes | None:
        """
        The HTTP-01 response body for C{token}, or L{None}.
        """
        with self._lock:
            return self._http01.get(token)

    def http01_response(self, path: bytes) -> bytes | None:
        """
        The response body for a request path (no query) if it is an HTTP-01
        challenge path with a known token, else L{None}.
        """
        if not path.startswith(HTTP01_PREFIX):
            return None
        token = path[len(HTTP01_PREFIX) :]
        if not token or b"/" in token:
            return None
        try:
            return self.key_authorization(token.decode("ascii"))
        except UnicodeDecodeError:
            return None

    def alpn_certificate(self, server_name: str | None) -> CertifiedKey | None:
        """
        The TLS-ALPN-01 certificate for C{server_name}, or L{None}.
        """
        if not server_name:
            return None
        with self._lock:
            return self._alpn.get(server_name.lower().rstrip("."))


class _Body(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"text/plain")
        return self.body


@implementer(IResource)
class ACMEChallengeResource:
    """
    Wrap a root resource so that HTTP-01 challenges are answered first.
    """

    isLeaf = False

    def __init__(self, challenges: ChallengeStore, wrapped: IResource) -> None:
        self.challenges = challenges
        self.wrapped = wrapped

    def getChildWithDefault(self, name, request):  # type: ignore[no-untyped-def]
        body = self.challenges.http01_response(request.path)
        if body is not None:
            request.postpath = []
            return _Body(body)
        request.postpath.insert(0, request.prepath.pop())
        return getChildForRequest(self.wrapped, request)

    def putChild(self, path, child):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def render(self, request):  # type: ignore[no-untyped-def]
        return self.wrapped.render(request)
