"""
L{IDataPlane}: what the controller drives to make the processes serving
requests follow its routing.  L{mproxy.workers.local.LocalDataPlane} is the
router of the controller's own process (nothing to send);
L{mproxy.workers.pool.WorkerPool} is a set of worker processes, each with
a replica of the routing.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface


@frozen
class Switch:
    """
    One routing change on the data plane: C{switched} fires (with the
    requests in flight on the load balancers it replaced) once every
    replica serves the new routing; C{drained} fires (with a
    L{mproxy.target.Drained}) once those requests have ended everywhere.
    """

    switched: Deferred[int]
    drained: Deferred[Any]


class IDataPlane(Interface):
    def apply(records: Any, drain_timeout: float, targets: Any = None) -> Switch:
        """
        Serve exactly C{records} (the L{mproxy.state.ServiceRecord} of every
        service); what the change replaced drains, cut after
        C{drain_timeout} seconds.  C{targets}: the key and health of every
        target (L{mproxy.controller.Controller.target_health_map}).
        """

    def set_health(address: str, healthy: bool, key: str | None = None) -> None:
        """
        The control plane's health checks moved target C{address} (the one
        named C{key} in the last C{targets}).
        """

    def drain_service(name: str, timeout: float) -> Deferred[Any]:
        """
        Drain the requests in flight in service C{name} (a pause or stop);
        fires with the summed L{mproxy.target.Drained}.
        """

    def refresh() -> Deferred[None]:
        """
        Fetch the in-flight counts L{inflight} answers with.
        """

    def inflight(service: str) -> int:
        """
        Requests in flight in C{service} (as of the last L{refresh}).
        """
