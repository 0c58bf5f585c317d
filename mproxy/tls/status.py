"""
L{HostStatus}: one row of certificate status per (service, host), as the
certificate service reports it and C{mproxy list} shows it.
"""

from __future__ import annotations

from attrs import define

from mproxy.tls.certs import format_time

__all__ = ["HostStatus"]


@define(frozen=True)
class HostStatus:
    """
    One row of certificate status.

    @ivar state: C{"valid"}, C{"pending"}, C{"failed"} or C{"static"}.
    @ivar not_after: expiry (POSIX time) of the certificate in use, if any.
    @ivar error: the last error, if the last attempt failed.
    @ivar next_attempt: when the next order or renewal is scheduled.
    @ivar issued_by: the cluster node that ordered the certificate in use.
    @ivar ordering_on: the cluster node holding the order lock now.
    @ivar store_unreachable: the cluster store cannot be reached.
    """

    service: str
    host: str
    state: str
    not_after: float | None = None
    error: str | None = None
    next_attempt: float | None = None
    issued_by: str | None = None
    ordering_on: str | None = None
    store_unreachable: bool = False

    def describe(self) -> str:
        """
        The one-line form: C{valid until X}, C{pending (error)}, ...; in a
        cluster followed by C{; issued by A}, C{; ordering on B},
        C{; cluster store unreachable}.
        """
        extras = []
        if self.issued_by:
            extras.append(f"issued by {self.issued_by}")
        if self.ordering_on:
            extras.append(f"ordering on {self.ordering_on}")
        if self.store_unreachable:
            extras.append("cluster store unreachable")
        return "; ".join([self._base(), *extras])

    def _base(self) -> str:
        if self.state in ("valid", "static"):
            text = f"valid until {format_time(self.not_after)}" if self.not_after else "valid"
            if self.error:
                text += f" (renewal failing: {self.error})"
            return text
        if self.error:
            return f"{self.state} ({self.error})"
        return self.state
