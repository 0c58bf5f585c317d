"""
L{LocalDataPlane}: requests are served by the controller's own router in
this process (unit tests, L{mproxy.testing}'s in-memory harness, a server
without workers).  The controller has already changed that router when it
applies a change, and drains its own load balancers, so there is nothing
to send and nothing else in flight.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mproxy.target import Drained
from mproxy.workers.interfaces import IDataPlane, Switch


@implementer(IDataPlane)
class LocalDataPlane:
    def apply(self, records: Any, drain_timeout: float, targets: Any = None) -> Switch:
        return Switch(succeed(0), succeed(Drained()))

    def set_health(self, address: str, healthy: bool, key: str | None = None) -> None:
        pass

    def drain_service(self, name: str, timeout: float) -> Deferred[Any]:
        return succeed(Drained())

    def refresh(self) -> Deferred[None]:
        return succeed(None)

    def inflight(self, service: str) -> int:
        return 0
