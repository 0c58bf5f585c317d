"""
A worker's copy of the routing: the services the supervisor says there are,
rebuilt in the worker's own L{Router} from L{ServiceRecord}s (the plain value
the state file keeps, sent over the worker channel as its JSON).

The supervisor runs deploys, health checks and the state file; a worker only
serves.  L{Replica.apply} makes the worker's router match a full list of
records in one synchronous step (no request sees half of it): a service whose
deployment (its slot's addresses) is unchanged keeps its load balancer, and
with it the requests in flight; a changed or removed deployment's load
balancer is returned, for the caller to drain (L{drain_all}) and report.
Health is the supervisor's: a target created here takes the health the
supervisor gave with the records (healthy when it said nothing of it), and
L{Replica.set_health} follows what the supervisor's checks find.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, gatherResults

from mproxy.balancer import LoadBalancer
from mproxy.router import Router
from mproxy.service import PauseState, Service
from mproxy.state import PauseRecord, ServiceRecord, Slot
from mproxy.target import Drained, TargetState

#: Builds a load balancer for a slot (the worker's pools and clock inside).
BalancerFactory = Callable[[Slot], LoadBalancer]


def slot_of(lb: LoadBalancer) -> Slot:
    return Slot(lb.writer_addresses, lb.reader_addresses)


class Replica:
    """
    The worker's services, kept equal to the supervisor's records.
    """

    def __init__(self, router: Router, clock: Any, balancer: BalancerFactory) -> None:
        self.router = router
        self.clock = clock
        self.balancer = balancer
        self._health: Mapping[str, bool] = {}

    def _serving(self, slot: Slot) -> LoadBalancer:
        lb = self.balancer(slot)
        health = self._health
        for t in lb.targets:
            healthy = health.get(t.address, True)
            t.set_state(TargetState.HEALTHY if healthy else TargetState.UNHEALTHY)
        return lb

    def _reuse(self, lb: LoadBalancer | None, slot: Slot | None,
               replaced: list[LoadBalancer]) -> LoadBalancer | None:
        """
        C{lb} when it already serves C{slot}, else a new balancer for it
        (C{lb} goes to C{replaced}).
        """
        if slot is None:
            if lb is not None:
                replaced.append(lb)
            return None
        if lb is not None and slot_of(lb) == slot:
            return lb
        if lb is not None:
            replaced.append(lb)
        return self._serving(slot)

    def apply(self, records: Sequence[ServiceRecord],
              health: Mapping[str, bool] | None = None) -> list[LoadBalancer]:
        """
        Make the router serve exactly C{records}, new targets as healthy as
        C{health} (target address → healthy) says; returns the load
        balancers no longer serving, still holding their in-flight requests.
        """
        self._health = health or {}
        replaced: list[LoadBalancer] = []
        wanted = {r.name for r in records}
        for name in [n for n in self.router.services if n not in wanted]:
            gone = self.router.remove(name)
            if gone is not None:
                replaced.extend(gone.balancers())
        for r in records:
            existing = self.router.services.get(r.name)
            if existing is None:
                service = Service(r.name, r.options, r.target_options,
                                  self._serving(r.active), self.clock)
                if r.rollout is not None:
                    service.rollout = self._serving(r.rollout)
            else:
                service = existing
                active = self._reuse(service.active, r.active, replaced)
                assert active is not None
                service.active = active
                service.rollout = self._reuse(service.rollout, r.rollout, replaced)
                service.options = r.options
                service.target_options = r.target_options
            service.split = r.split
            _set_pause(service, r.pause)
            self.router.install(service)
        return replaced

    def set_health(self, address: str, healthy: bool) -> None:
        """
        The supervisor's health checks found target C{address} (un)healthy.
        """
        state = TargetState.HEALTHY if healthy else TargetState.UNHEALTHY
        for service in self.router.services.values():
            for lb in service.balancers():
                for target in lb.targets:
                    if target.address == address and target.state is not TargetState.DRAINING:
                        target.set_state(state)


def _set_pause(service: Service, pause: PauseRecord) -> None:
    current = service.pause
    if (current.state, current.max_pause, current.stop_message) == (
        pause.state, pause.max_pause, pause.stop_message
    ):
        return
    if pause.state is PauseState.PAUSED:
        current.pause(pause.max_pause)
    elif pause.state is PauseState.STOPPED:
        current.stop(pause.stop_message)
    else:
        current.resume()


def drain_all(balancers: Sequence[LoadBalancer], timeout: float) -> Deferred[Drained]:
    """
    Drain and close C{balancers}; fires with the summed L{Drained}.
    """

    def closed(drained: Drained, lb: LoadBalancer) -> Drained:
        lb.close()
        return drained

    ds = [lb.drain(timeout).addCallback(closed, lb) for lb in balancers]
    d = gatherResults(ds, consumeErrors=True)
    return d.addCallback(lambda results: sum(results, Drained()))
