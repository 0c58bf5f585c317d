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
    """

    service: str
    host: str
    state: str
    not_after: float | None = None
    error: str | None = None
    next_attempt: float | None = None

    def describe(self) -> str:
        """
        The one-line form: C{valid until X}, C{pending (error)}, ...
        """
        if self.state in ("valid", "static"):
            text = f"valid until {format_time(self.not_after)}" if self.not_after else "valid"
            if self.error:
                text += f" (renewal failing: {self.error})"
            return text
        if self.error:
            return f"{self.state} ({self.error})"
        return self.state
