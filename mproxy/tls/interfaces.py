"""
The contracts where the pieces of L{mproxy.tls} meet: the ACME client the
certificate service drives (L{IIssuer}), where accounts and certificates are
kept (L{ICertificateStore}, L{IDirectoryStore}), who answers the CA's
challenges (L{IChallengeResponder}) and who approves on-demand names
(L{IOnDemandPolicy}).

Real implementations declare these with C{@implementer}; test fakes are
checked with C{verifyObject}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "IIssuer",
    "IDirectoryStore",
    "ICertificateStore",
    "IChallengeResponder",
    "IOnDemandPolicy",
    "IOrderGuard",
]


class IIssuer(Interface):
    """
    A blocking ACME client for one directory (run off the reactor thread).
    """

    def issue(host: str, challenge_type: str) -> tuple[bytes, bytes]:
        """
        Run one order for C{host} answering C{challenge_type} (C{"http-01"}
        or C{"tls-alpn-01"}).

        @return: C{(key_pem, chain_pem)}.
        @raise mproxy.tls.acme.IssueError: on any failure.
        """

    def cancel() -> None:
        """
        Give up an order in progress at its next wait and refuse new ones
        (any thread); used when the service stops.
        """


class IDirectoryStore(Interface):
    """
    The account and certificates for one ACME directory URL.
    """

    directory_url = Attribute("The ACME directory URL these belong to.")

    def load_account_key() -> bytes | None:
        """The account private key (PEM), or None."""

    def save_account_key(pem: bytes) -> None:
        """Keep the account private key."""

    def load_account() -> str | None:
        """The registration resource (JSON text), or None."""

    def save_account(json_text: str) -> None:
        """Keep the registration resource."""

    def forget_account() -> None:
        """Drop the registration (the CA no longer knows it)."""

    def load_certificate(host: str) -> object:
        """The stored L{CertifiedKey} for C{host}, or None."""

    def save_certificate(host: str, key_pem: bytes, chain_pem: bytes) -> object:
        """Validate and keep a certificate; returns the L{CertifiedKey}."""

    def hosts() -> list[str]:
        """Hosts with a stored certificate, sorted."""


class ICertificateStore(Interface):
    """
    Accounts and certificates, one L{IDirectoryStore} per directory URL.
    """

    def for_directory(directory_url: str) -> IDirectoryStore:
        """The store for one ACME directory."""


class IChallengeResponder(Interface):
    """
    Pending ACME challenge responses: published by the issuer (any thread),
    read when the CA validates (reactor thread).
    """

    def add_http01(token: str, key_authorization: str) -> None:
        """Answer C{/.well-known/acme-challenge/<token>}."""

    def remove_http01(token: str) -> None:
        """Stop answering C{token}."""

    def add_tls_alpn01(domain: str, certificate: object) -> None:
        """Serve C{certificate} to C{acme-tls/1} handshakes for C{domain}."""

    def remove_tls_alpn01(domain: str) -> None:
        """Stop serving the TLS-ALPN-01 certificate for C{domain}."""

    def key_authorization(token: str) -> bytes | None:
        """The HTTP-01 response body for C{token}, or None."""

    def http01_response(path: bytes) -> bytes | None:
        """The response body for an HTTP-01 challenge path, or None."""

    def alpn_certificate(server_name: str | None) -> object:
        """The TLS-ALPN-01 L{CertifiedKey} for C{server_name}, or None."""


class IOrderGuard(Interface):
    """
    Decides, in the ACME worker thread, whether and how an order happens:
    a cluster takes the name's lock first and may hand back a certificate
    another node already got.
    """

    def run(directory_url: str, host: str, on_demand: bool, issue: object) -> object:
        """
        Call C{issue() -> CertifiedKey} if this node may order now, or
        return a certificate without ordering; raise
        L{mproxy.tls.acme.IssueError} (C{held_by}, C{store_unavailable},
        C{retry_after}) when no order may happen now.
        """


class IOnDemandPolicy(Interface):
    """
    Asks the application whether a name may get a certificate.
    """

    def check(service: str, url: str, host: str) -> object:
        """
        A Deferred that fires with None when C{host} is approved and fails
        with L{mproxy.tls.ondemand.OnDemandDenied} otherwise.
        """
