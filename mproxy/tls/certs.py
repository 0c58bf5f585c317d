# -*- test-case-name: tests.test_tls_store -*-
"""
L{CertifiedKey}: a private key with its certificate chain, as served in a TLS
handshake, plus PEM helpers shared by the ACME store and custom certificates.
"""

from __future__ import annotations

import datetime
from typing import Any

from attrs import define
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["CertifiedKey", "load_certified_key", "certified_pem", "generate_key_pem", "format_time"]


@define(eq=False)
class CertifiedKey:
    """
    @ivar key: the private key (a C{cryptography} private key object).
    @ivar chain: the certificates, leaf first.

    Compared and hashed by identity (L{mproxy.tls.sni} caches one TLS context
    per instance).

    @ivar issued_by: in a cluster, the node that ordered it (if known).
    """

    key: Any
    chain: list[x509.Certificate]
    issued_by: str | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def renew_at(self, fraction: float = 1 / 3) -> float:
        """
        When to renew: when C{fraction} of the lifetime is left.
        """
        lifetime = self.not_after - self.not_before
        return self.not_after - lifetime * fraction

    def dns_names(self) -> list[str]:
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]


def _public_der(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_certified_key(chain_pem: bytes, key_pem: bytes) -> CertifiedKey:
    """
    Parse a PEM chain and PEM private key and check that they belong together.

    @raise ValueError: with a short human reason.
    """
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ValueError("no valid PEM certificate found") from None
    if not chain:
        raise ValueError("no valid PEM certificate found")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        msg = str(e).split("\n")[0] or "invalid key"
        if "password" in msg.lower() or "encrypted" in msg.lower():
            raise ValueError("private key is encrypted") from None
        raise ValueError("no valid PEM private key found") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) and not hasattr(
        key, "public_key"
    ):
        raise ValueError("unsupported private key type")
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise ValueError("private key does not match certificate")
    return CertifiedKey(key=key, chain=chain)


def certified_pem(certified: CertifiedKey) -> tuple[bytes, bytes]:
    """
    C{(chain PEM, key PEM)} of C{certified}, as L{load_certified_key} reads them.
    """
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certified.chain)
    key = certified.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return chain, key


def generate_key_pem() -> bytes:
    """
    A fresh ECDSA P-256 key (the certificate key type for ACME) as PKCS#8 PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def format_time(timestamp: float) -> str:
    """
    C{2026-11-27T04:00:00Z}.
    """
    return (
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        .replace(microsecond=0)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
    )
