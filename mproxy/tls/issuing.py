"""
What the users of an issuer need to know of ACME without the ACME client
itself (L{mproxy.tls.acme}, which imports C{acme}, C{josepy} and
C{requests}: a large share of a server's start-up, and needed only once a
certificate is ordered): the Let's Encrypt directories, the challenge
types, and L{IssueError}.
"""

from __future__ import annotations

from mproxy.config import LETS_ENCRYPT, LETS_ENCRYPT_STAGING

__all__ = ["HTTP_01", "LETS_ENCRYPT", "LETS_ENCRYPT_STAGING", "TLS_ALPN_01", "IssueError"]

HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"


class IssueError(Exception):
    """
    An order failed.

    @ivar retry_after: seconds the CA asked us to wait (Retry-After), if any.
    @ivar rate_limited: the CA answered C{urn:ietf:params:acme:error:rateLimited}.
    @ivar permanent: the CA refuses this identifier; retrying soon won't help.
    @ivar challenge_failed: the challenge type used failed validation (or the
        CA does not offer it); another type may well succeed at once.
    @ivar held_by: another cluster node holds the order lock for the name
        (no order was placed); C{retry_after} says when the lock expires.
    @ivar store_unavailable: the cluster store could not be reached, so no
        order was placed.
    @ivar cooling_down: with C{held_by}: that node's last order failed and
        the cluster waits out its backoff.
    """

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        rate_limited: bool = False,
        permanent: bool = False,
        challenge_failed: bool = False,
        held_by: str | None = None,
        store_unavailable: bool = False,
        cooling_down: bool = False,
    ) -> None:
        super().__init__(message)
        self.held_by = held_by
        self.cooling_down = cooling_down
        self.store_unavailable = store_unavailable
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.permanent = permanent
        self.challenge_failed = challenge_failed
