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
Health is the supervisor's, target by target: the records come with the
supervisor's name (key) and state for each target of each slot
(L{mproxy.controller.Controller.target_health_map}).  A target created here
takes that state (one not checked yet, as after C{--force}, is out of
rotation until the supervisor's first check passes), a deployment is kept
only while it has the same targets (a re-deployed address is a new target,
as in the supervisor), and L{Replica.set_health} follows what the
supervisor's checks find.  Without keys (records from an older supervisor)
targets are matched by address and taken as healthy unless said otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, gatherResults

from mproxy.balancer import LoadBalancer
from mproxy.router import Router
from mproxy.service import PauseState, Service
from mproxy.state import PauseRecord, ServiceRecord, Slot
from mproxy.target import Drained, Target, TargetState

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
        self._slots: Mapping[str, Any] = {}
        self._states: Mapping[str, str] = {}
        self._keyed = False
        #: the supervisor's key of each target here
        self._keys: weakref.WeakKeyDictionary[Target, str] = weakref.WeakKeyDictionary()

    def _wanted_keys(self, service: str, slot: str) -> Mapping[str, str]:
        return self._slots.get(service, {}).get(slot) or {}

    def _serving(self, service: str, slot_name: str, slot: Slot) -> LoadBalancer:
        lb = self.balancer(slot)
        if not self._keyed:
            for t in lb.targets:
                healthy = self._health.get(t.address, True)
                t.set_state(TargetState.HEALTHY if healthy else TargetState.UNHEALTHY)
            return lb
        keys = self._wanted_keys(service, slot_name)
        for t in lb.targets:
            key = keys.get(t.address)
            if key is not None:
                self._keys[t] = key
            state = self._states.get(key, "adding") if key is not None else "adding"
            t.set_state(TargetState(state) if state != "draining" else TargetState.ADDING)
        return lb

    def _same_targets(self, lb: LoadBalancer, service: str, slot_name: str) -> bool:
        if not self._keyed:
            return True
        keys = self._wanted_keys(service, slot_name)
        return all(self._keys.get(t) == keys.get(t.address) for t in lb.targets)

    def _reuse(self, service: str, slot_name: str, lb: LoadBalancer | None, slot: Slot | None,
               replaced: list[LoadBalancer]) -> LoadBalancer | None:
        """
        C{lb} when it already serves C{slot} with the same targets, else a
        new balancer for it (C{lb} goes to C{replaced}).
        """
        if slot is None:
            if lb is not None:
                replaced.append(lb)
            return None
        if lb is not None and slot_of(lb) == slot and self._same_targets(lb, service, slot_name):
            return lb
        if lb is not None:
            replaced.append(lb)
        return self._serving(service, slot_name, slot)

    def apply(self, records: Sequence[ServiceRecord],
              health: Mapping[str, bool] | None = None,
              targets: Mapping[str, Any] | None = None) -> list[LoadBalancer]:
        """
        Make the router serve exactly C{records}, each target as C{targets}
        (the supervisor's keys and states) says, or else as healthy as
        C{health} (address → healthy) says; returns the load balancers no
        longer serving, still holding their in-flight requests.
        """
        self._health = health or {}
        self._keyed = targets is not None
        self._slots = (targets or {}).get("slots") or {}
        self._states = (targets or {}).get("states") or {}
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
                                  self._serving(r.name, "active", r.active), self.clock)
                if r.rollout is not None:
                    service.rollout = self._serving(r.name, "rollout", r.rollout)
            else:
                service = existing
                active = self._reuse(r.name, "active", service.active, r.active, replaced)
                assert active is not None
                service.active = active
                service.rollout = self._reuse(r.name, "rollout", service.rollout, r.rollout,
                                              replaced)
                service.options = r.options
                service.target_options = r.target_options
            service.split = r.split
            _set_pause(service, r.pause)
            self.router.install(service)
        return replaced

    def key_of(self, target: Target) -> str | None:
        """
        The supervisor's key of a target here, if it gave one.
        """
        return self._keys.get(target)

    def set_health(self, address: str, healthy: bool, key: str | None = None) -> None:
        """
        The supervisor's health checks found target C{address} (the one it
        calls C{key}, when given) (un)healthy.
        """
        state = TargetState.HEALTHY if healthy else TargetState.UNHEALTHY
        for service in self.router.services.values():
            for lb in service.balancers():
                for target in lb.targets:
                    if target.address != address or target.state is TargetState.DRAINING:
                        continue
                    if key is None or self._keys.get(target) == key:
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
