# -*- test-case-name: tests.test_tls_hostcert -*-
"""
L{HostCertificate}: the ACME certificate lifecycle of one host under one ACME
directory, as a small state machine::

    idle --start--> waiting --timer--> ordering --issued--> waiting (renewal)
                                                --failed--> waiting (retry)
    waiting --stop--> idle           ordering --stop--> (result kept, nothing scheduled)
    idle/waiting --adopt--> waiting (renewal of a newer certificate another node got)
    any --drop--> dropped            (final: a late order result is ignored)

When to order is the injected L{RetryPolicy}'s decision; how to order is the
injected C{order(directory, host, challenge_type, on_demand) ->
Deferred[CertifiedKey]}.  In a cluster an order may find another node
holding the name's lock (wait for its certificate, then renew from it) or
the store unreachable (retry soon); neither counts as a failure.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mproxy.tls.issuing import IssueError
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.certs import CertifiedKey, format_time
from mproxy.tls.status import HostStatus

__all__ = ["HostCertificate", "Order", "IDLE", "WAITING", "ORDERING", "DROPPED"]

IDLE = "idle"
WAITING = "waiting"
ORDERING = "ordering"
DROPPED = "dropped"

Order = Callable[[str, str, str, bool], Deferred]


class HostCertificate:
    """
    @ivar certificate: the certificate served for the host, if any.
    @ivar refused: set when no public CA can issue for the name; such a
        host is never ordered and shows as failed with this reason.
    """

    def __init__(
        self,
        clock: Any,
        policy: RetryPolicy,
        order: Order,
        logger: Any,
        directory: str,
        name: str,
        service: str,
        on_demand: bool = False,
        certificate: CertifiedKey | None = None,
        refused: str | None = None,
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.order = order
        self.logger = logger
        self.directory = directory
        self.name = name
        self.service = service
        self.on_demand = on_demand
        self.certificate = certificate
        self.refused = refused
        self.state = IDLE
        self.started = False
        self.error: str | None = refused
        self.failures = 0
        self.permanent = refused is not None
        self.next_attempt: float | None = None
        self.lock_node: str | None = None
        self.store_waits = 0
        self._call: Any = None

    # -- inputs -------------------------------------------------------------

    def start(self, at: float | None = None) -> None:
        """
        Begin managing the certificate: order at C{at} (default: now, or at
        the renewal time of the certificate it already has).
        """
        self.started = True
        if self.state != IDLE or self.refused is not None:
            return
        now = self.clock.seconds()
        if at is None:
            at = now
            if self.certificate is not None:
                at = max(now, self.policy.renew_at(self.certificate))
        self._wait(at - now)

    def stop(self) -> None:
        """
        Cancel the next attempt; an order in flight still records its
        result but schedules nothing.
        """
        self.started = False
        self._cancel()
        if self.state == WAITING:
            self.state = IDLE

    def drop(self) -> None:
        """
        Stop for good: no renewal, no retries, a late result is ignored.
        """
        self.stop()
        self.state = DROPPED

    def adopt(self, certificate: CertifiedKey) -> bool:
        """
        Serve C{certificate} (another node ordered it) if it lasts longer
        than the current one, and renew from it.  Returns whether it did.
        """
        current = self.certificate
        if current is not None and certificate.not_after == current.not_after and current.issued_by is None:
            current.issued_by = certificate.issued_by  # the same one, now we know who got it
        if self.state == DROPPED or (current is not None and certificate.not_after <= current.not_after):
            return False
        self.certificate = certificate
        self._succeeded()
        if self.started and self.state != ORDERING:
            self._wait(self.policy.renew_at(certificate) - self.clock.seconds())
        return True

    def status(self) -> HostStatus:
        if self.certificate is not None:
            state = "valid"
        elif self.policy.is_failed(self.failures, self.permanent):
            state = "failed"
        else:
            state = "pending"
        return HostStatus(
            self.service,
            self.name,
            state,
            self.certificate.not_after if self.certificate else None,
            self.error,
            self.next_attempt,
            self.certificate.issued_by if self.certificate else None,
            self.lock_node,
        )

    # -- transitions --------------------------------------------------------

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.next_attempt = None

    def _wait(self, delay: float) -> None:
        self._cancel()
        delay = max(0.0, delay)
        self.state = WAITING
        self.next_attempt = self.clock.seconds() + delay
        self._call = self.clock.callLater(delay, self._attempt)

    def _attempt(self) -> Deferred:
        self._call = None
        self.next_attempt = None
        self.state = ORDERING
        challenge = self.policy.challenge_for(self.failures)
        self.logger.info(
            f"Requesting a certificate for {self.name} ({challenge})",
            host=self.name,
            challenge=challenge,
        )
        d = self.order(self.directory, self.name, challenge, self.on_demand)
        d.addCallbacks(self._issued, self._failed)
        return d

    def _issued(self, certificate: CertifiedKey) -> None:
        if self.state == DROPPED:
            return
        self.state = IDLE
        self.certificate = certificate
        self._succeeded()
        until = format_time(certificate.not_after)
        self.logger.info(f"Certificate for {self.name} valid until {until}", host=self.name, until=until)
        if self.started:
            self._wait(self.policy.renew_at(certificate) - self.clock.seconds())

    def _succeeded(self) -> None:
        self.failures = 0
        self.store_waits = 0
        self.error = None
        self.permanent = False
        self.lock_node = None

    def _failed(self, failure: Failure) -> None:
        if self.state == DROPPED:
            return
        self.state = IDLE
        error = self._issue_error(failure)
        if error.held_by is not None or error.store_unavailable:
            self._not_ordered(error)
            return
        self.lock_node = None
        self.store_waits = 0
        self.failures += 1
        self.error = str(error)
        self.permanent = error.permanent
        delay = self.policy.delay(self.failures, error)
        self.logger.warn(
            f"Certificate order for {self.name} failed (attempt {self.failures}),"
            f" retrying in {delay:.0f}s: {error}",
            host=self.name,
            attempt=self.failures,
            delay=delay,
            error=str(error),
        )
        if self.started:
            self._wait(delay)

    def _not_ordered(self, error: IssueError) -> None:
        """
        No order was placed: another node holds the lock (its certificate
        arrives through L{adopt}; check again when the lock expires), or the
        store is unreachable (retry soon, backing off).
        """
        if error.held_by is not None:
            delay = error.retry_after if error.retry_after is not None else self.policy.initial
            if error.cooling_down:
                self.lock_node = None
                self.error = str(error)
            else:
                self.lock_node = error.held_by
            self.logger.info(
                f"Certificate for {self.name}: {error}; waiting {delay:.0f}s",
                host=self.name,
                node=error.held_by,
                delay=delay,
            )
        else:
            self.store_waits += 1
            self.error = str(error)
            delay = self.policy.store_delay(self.store_waits)
            self.logger.warn(
                f"Certificate for {self.name} not ordered, retrying in {delay:.0f}s: {error}",
                host=self.name,
                delay=delay,
                error=str(error),
            )
        if self.started:
            self._wait(delay)

    def _issue_error(self, failure: Failure) -> IssueError:
        error = failure.value
        if isinstance(error, IssueError):
            return error
        if isinstance(error, ValueError):
            return IssueError(f"the CA sent an unusable certificate: {error}")
        self.logger.error(
            f"Certificate order for {self.name} crashed",
            host=self.name,
            error=f"{type(error).__name__}: {error}",
            traceback=failure.getTraceback(),
        )
        return IssueError(f"{type(error).__name__}: {error}")
