# -*- test-case-name: tests.test_tls_backoff -*-
"""
L{RetryPolicy}: when a host's next ACME order happens, as a pure function of
how many orders failed in a row and how the last one failed; which challenge
type each attempt uses; when a certificate is due for renewal.

Injected into the certificate service (and from there into every
L{mproxy.tls.hostcert.HostCertificate}); tests pass a policy with small
numbers.
"""

from __future__ import annotations

from attrs import frozen

from mproxy.tls.issuing import HTTP_01, TLS_ALPN_01, IssueError
from mproxy.tls.certs import CertifiedKey

__all__ = ["RetryPolicy"]


@frozen
class RetryPolicy:
    """
    @ivar initial: the delay after the first failure; it doubles with every
        further failure up to C{maximum}.
    @ivar rate_limit_wait: the wait after a rateLimited error without
        Retry-After.
    @ivar failed_after: consecutive failures after which a host shows as
        failed (it is still retried, at C{maximum}).
    @ivar challenge_types: tried in turn, one per attempt.
    @ivar renew_fraction: renew when this fraction of the lifetime is left.
    @ivar store_initial: the wait after the cluster store could not be
        reached; it doubles up to C{store_maximum}.
    """

    initial: float = 60.0
    maximum: float = 6 * 3600.0
    rate_limit_wait: float = 3600.0
    failed_after: int = 5
    challenge_types: tuple[str, ...] = (HTTP_01, TLS_ALPN_01)
    renew_fraction: float = 1 / 3
    store_initial: float = 1.0
    store_maximum: float = 10.0

    def challenge_for(self, failures: int) -> str:
        """
        The challenge type of the attempt after C{failures} failures.
        """
        return self.challenge_types[failures % len(self.challenge_types)]

    def delay(self, failures: int, error: IssueError) -> float:
        """
        Seconds until the next attempt after the C{failures}-th failure in a
        row (counting the one that just happened) ended with C{error}.

        When a challenge failed validation and the next type has not been
        tried since, the next order starts at once (port 80 firewalled: a
        certificate through TLS-ALPN-01 in seconds, not after the first
        backoff).  Never sooner than the CA's Retry-After.
        """
        delay = min(self.initial * 2 ** (failures - 1), self.maximum)
        if error.challenge_failed and failures % len(self.challenge_types):
            delay = 0.0
        if error.permanent:
            delay = self.maximum
        if error.rate_limited and error.retry_after is None:
            delay = max(delay, self.rate_limit_wait)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    def store_delay(self, waits: int) -> float:
        """
        Seconds until the next attempt after the C{waits}-th attempt in a
        row that found the cluster store unreachable.
        """
        return min(self.store_initial * 2 ** (waits - 1), self.store_maximum)

    def is_failed(self, failures: int, permanent: bool) -> bool:
        """
        Whether a host without a certificate shows as failed (not pending).
        """
        return permanent or failures >= self.failed_after

    def renew_at(self, certificate: CertifiedKey) -> float:
        """
        When C{certificate} is due for renewal (POSIX time).
        """
        return certificate.renew_at(self.renew_fraction)
