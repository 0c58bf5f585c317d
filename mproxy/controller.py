"""
The operations behind every control command: deploy and rollout deploy
(run by L{mproxy.deploy.Deployer}), rollout split, remove, pause, stop,
resume, list; and restoring the services from the state file.

Every command that changes a service makes the new state durable first and
applies it only then: when the state file cannot be written the command
fails with L{StateError} and nothing changes, so what a command answers is
what is serving, and what a restart brings back.

The processes serving requests follow through an L{IDataPlane}: the
controller's own router (L{LocalDataPlane}, the default) or worker
processes (L{mproxy.workers.pool.WorkerPool}).  Each change is sent as the
full list of service records right after it is made durable, with the
health of every target (L{target_health_map}): a replica's targets are in
rotation exactly when the controller's are (a target not yet checked, as
after C{--force}, is not); a command answers once every replica switched,
and drains wait for the requests in flight everywhere.

A deploy never holds anything that other services need while it waits:
health waits and drains only touch the service being deployed, and commands
for one service are serialised by that service's own lock.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Mapping, Protocol

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from mproxy.balancer import LoadBalancer, gather_drains
from mproxy.deploy import Deployer, Progress, no_progress, plural
from mproxy.errors import RolloutNotSet, ServiceNotFound, StateError
from mproxy.health import ProbeFunction
from mproxy.listing import service_rows
from mproxy.logging import JSONLogger
from mproxy.router import Router
from mproxy.service import PauseState, RolloutSplit, Service
from mproxy.spec import (
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_PAUSE_TIMEOUT,
    DeployRequest,
    ServiceOptions,
    validate_drain,
    validate_percentage,
)
from mproxy.state import PauseRecord, ServiceRecord, Slot, StateStore
from mproxy.target import PoolFactory, Target, TargetState, no_pool
from mproxy.workers.interfaces import IDataPlane, Switch
from mproxy.workers.local import LocalDataPlane


class Certificates(Protocol):
    """
    What the controller needs from the certificate service (L{mproxy.tls}).
    """

    def validate(self, options: ServiceOptions) -> None: ...

    def update_service(self, name: str, options: ServiceOptions) -> None: ...

    def remove_service(self, name: str) -> None: ...

    def status(self) -> dict[str, str]: ...


class NoCertificates:
    def validate(self, options: ServiceOptions) -> None:
        pass

    def update_service(self, name: str, options: ServiceOptions) -> None:
        pass

    def remove_service(self, name: str) -> None:
        pass

    def status(self) -> dict[str, str]:
        return {}


class DeployRecorder(Protocol):
    """
    Told the outcome of every deploy (L{mproxy.metrics.Metrics} counts them):
    C{success}, C{failure} or C{cancelled}.
    """

    def deploy(self, service: str, outcome: str) -> None: ...


class _NoRecorder:
    def deploy(self, service: str, outcome: str) -> None:
        pass


def _accept_error_pages(options: ServiceOptions) -> None:
    pass


class Controller:
    def __init__(
        self,
        router: Router,
        clock: IReactorTime,
        probe: ProbeFunction,
        store: StateStore | None,
        logger: JSONLogger,
        pool_factory: PoolFactory = no_pool,
        certificates: Certificates | None = None,
        validate_error_pages: Callable[[ServiceOptions], None] = _accept_error_pages,
        deploys: DeployRecorder | None = None,
        dataplane: IDataPlane | None = None,
    ) -> None:
        """
        @param validate_error_pages: raises L{mproxy.errors.ErrorPagesError}
            when the options name error pages that cannot be loaded (the data
            plane's L{mproxy.http.custompages.validate}).
        @param deploys: told the outcome of every deploy.
        @param dataplane: where requests are served (default: this
            controller's router).
        """
        self.dataplane: IDataPlane = dataplane if dataplane is not None else LocalDataPlane()
        self.router = router
        self.clock = clock
        self.probe = probe
        self.store = store
        self.logger = logger
        self.pool_factory = pool_factory
        self.certificates: Certificates = certificates or NoCertificates()
        self.validate_error_pages = validate_error_pages
        self.deploys: DeployRecorder = deploys or _NoRecorder()
        #: each target's name on the data plane (a re-deployed address is a
        #: new target, with a health of its own)
        self._keys: weakref.WeakKeyDictionary[Target, str] = weakref.WeakKeyDictionary()
        self._numbers = itertools.count(1)
        self.deployer = Deployer(
            router, clock, probe, logger, self._commit, self._balancer, self.certificates,
            validate_error_pages, self.deploys,
        )

    def _service(self, name: str) -> Service:
        s = self.router.services.get(name)
        if s is None:
            raise ServiceNotFound.named(name)
        return s

    def _balancer(self, slot: Slot) -> LoadBalancer:
        lb = LoadBalancer(slot.writers, slot.readers, self.clock, self.pool_factory,
                          self.logger)
        for t in lb.targets:
            self._keys[t] = str(next(self._numbers))
            t.on_state_change = self._health_follower(t.on_state_change)
        return lb

    def _health_follower(self, changed: Any) -> Any:
        """
        C{changed}, then the data plane told of a move in or out of rotation.
        """
        dataplane = self.dataplane
        keys = self._keys

        def follow(target: Any, was: TargetState) -> None:
            changed(target, was)
            if target.state in (TargetState.HEALTHY, TargetState.UNHEALTHY):
                dataplane.set_health(target.address, target.healthy, keys.get(target))

        return follow

    def target_health_map(self, name: str | None = None,
                          record: ServiceRecord | None = None,
                          balancers: Mapping[str, LoadBalancer] | None = None
                          ) -> dict[str, Any]:
        """
        The targets of every service as the data plane needs them:
        C{{"slots": {service: {"active"|"rollout": {address: key}}},
        "states": {key: "adding"|"healthy"|"unhealthy"}}}.  Service C{name}
        is taken as C{record} (C{None}: gone) with the load balancers in
        C{balancers} by slot, the ones it has now for the others.
        """
        slots: dict[str, dict[str, dict[str, str]]] = {}
        states: dict[str, str] = {}

        def add(service: str, slot: str, lb: LoadBalancer | None) -> None:
            if lb is None:
                return
            by_address = slots.setdefault(service, {}).setdefault(slot, {})
            for t in lb.targets:
                key = self._keys.get(t)
                if key is None:
                    continue
                by_address[t.address] = key
                state = t.state
                if state is TargetState.DRAINING:
                    state = t._state_before_drain or TargetState.ADDING
                states[key] = state.value

        for n, s in self.router.services.items():
            if n != name:
                add(n, "active", s.active)
                add(n, "rollout", s.rollout)
        if name is not None and record is not None:
            current = self.router.services.get(name)
            chosen = dict(balancers or {})
            add(name, "active", chosen.get("active", current.active if current else None))
            if record.rollout is not None:
                add(name, "rollout",
                    chosen.get("rollout", current.rollout if current else None))
        return {"slots": slots, "states": states}

    def eject(self, address: str, error: str, key: str | None = None) -> None:
        """
        The data plane could not reach target C{address} (the target named
        C{key}, when given): take it out of rotation (see
        L{mproxy.target.Target.eject}); without a key, in every service.
        """
        for s in self.router.services.values():
            for lb in s.balancers():
                for t in lb.targets:
                    if t.address == address and (key is None or self._keys.get(t) == key):
                        t.eject(error)

    def _commit(self, name: str, record: ServiceRecord | None,
                drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                balancers: Mapping[str, LoadBalancer] | None = None) -> Switch:
        """
        Make durable the state in which service C{name} is C{record} (or is
        gone, for C{None}), and send it to the data plane, with the load
        balancers that are to serve its slots (C{balancers}, by slot: the
        ones it has for the others).  The caller applies the change to its
        router only after this returns.

        @raise StateError: when the state file cannot be written; the old
            file is intact and nothing has changed.
        """
        records = [ServiceRecord.of(s) for n, s in self.router.services.items() if n != name]
        if record is not None:
            records.append(record)
        records.sort(key=lambda r: r.name)
        self._save(records)
        return self.dataplane.apply(records, drain_timeout,
                                    targets=self.target_health_map(name, record, balancers))

    def _save(self, records: list[ServiceRecord]) -> None:
        if self.store is None:
            return
        try:
            self.store.save(records)
        except OSError as e:
            self.logger.error("Unable to save state", path=self.store.path, error=str(e))
            raise StateError(
                f"cannot write state file {self.store.path}: {e.strerror or e}; "
                "nothing was changed"
            ) from e
        self.logger.debug("Saved state", path=self.store.path)

    # Deploy

    def deploy(self, req: DeployRequest, progress: Progress = no_progress) -> Any:
        """
        See L{Deployer.deploy}.
        """
        return self.deployer.deploy(req, progress)

    def rollout_deploy(
        self,
        name: str,
        targets: tuple[str, ...],
        readers: tuple[str, ...] = (),
        deploy_timeout: float = DEFAULT_DEPLOY_TIMEOUT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        progress: Progress = no_progress,
    ) -> Any:
        """
        See L{Deployer.rollout_deploy}.
        """
        return self.deployer.rollout_deploy(
            name, targets, readers, deploy_timeout, drain_timeout, progress
        )

    # Rollout split

    def rollout_set(self, name: str, percentage: int, allowlist: tuple[str, ...]
                    ) -> Deferred[None]:
        validate_percentage(percentage)
        service = self._service(name)
        if service.rollout is None:
            raise RolloutNotSet()
        split = RolloutSplit(percentage, tuple(allowlist))
        switch = self._commit(name, attrs.evolve(ServiceRecord.of(service), split=split))
        service.split = split
        self.logger.info(
            "Set rollout split", service=name, percentage=percentage, allowlist=list(allowlist)
        )
        return _switched(switch)

    def rollout_stop(self, name: str) -> Deferred[None]:
        service = self._service(name)
        switch = self._commit(name, attrs.evolve(ServiceRecord.of(service), split=None))
        service.split = None
        self.logger.info("Stopped rollout", service=name)
        return _switched(switch)

    # Remove, pause, stop, resume

    def remove(self, name: str) -> Deferred[None]:
        service = self._service(name)
        switch = self._commit(name, None)
        self.router.remove(name)
        for lb in service.balancers():
            lb.stop_health_checks()
        # Requests in flight finish on their own; the pools' idle connections
        # are closed as each target's last request ends.
        for lb in service.balancers():
            for t in lb.targets:
                t.close()
        service.pause.resume()
        self.certificates.remove_service(name)
        self.logger.info("Service removed", service=name)
        return _switched(switch)

    def _set_pause(self, service: Service, pause: PauseRecord) -> Switch:
        switch = self._commit(service.name, attrs.evolve(ServiceRecord.of(service), pause=pause))
        if pause.state is PauseState.PAUSED:
            service.pause.pause(pause.max_pause)
        elif pause.state is PauseState.STOPPED:
            service.pause.stop(pause.stop_message)
        else:
            service.pause.resume()
        return switch

    @inlineCallbacks
    def _drain_service(self, service: Service, timeout: float, progress: Progress) -> Any:
        yield self.dataplane.refresh()
        n = sum(lb.inflight() for lb in service.balancers()) + self.dataplane.inflight(
            service.name)
        progress("draining", f"draining {plural(n, 'request')} from {service.name}")
        drained = yield gather_drains([lb.drain(timeout) for lb in service.balancers()]
                                      + [self.dataplane.drain_service(service.name, timeout)])
        self.logger.info("Service drained", service=service.name,
                         drained=drained.requests, cut=drained.cut)
        progress("done", "")
        return drained

    def pause(
        self,
        name: str,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_pause: float = DEFAULT_PAUSE_TIMEOUT,
        progress: Progress = no_progress,
    ) -> Any:
        """
        Hold the service's new requests (each for up to C{max_pause}); fires
        with a L{Drained} once its requests in flight have finished.
        """
        return self._pause_or_stop(
            name, PauseRecord(PauseState.PAUSED, max_pause, ""), drain_timeout, progress,
            "Service paused",
        )

    def stop(
        self,
        name: str,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        message: str = "",
        progress: Progress = no_progress,
    ) -> Any:
        """
        Answer the service's requests with a 503 page (showing C{message});
        fires with a L{Drained} once its requests in flight have finished.
        """
        return self._pause_or_stop(
            name, PauseRecord(PauseState.STOPPED, DEFAULT_PAUSE_TIMEOUT, message),
            drain_timeout, progress, "Service stopped",
        )

    @inlineCallbacks
    def _pause_or_stop(
        self, name: str, pause: PauseRecord, drain_timeout: float, progress: Progress,
        message: str,
    ) -> Any:
        validate_drain(drain_timeout, pause.max_pause)
        service = self._service(name)
        if pause.state is PauseState.STOPPED:
            pause = attrs.evolve(pause, max_pause=service.pause.max_pause)
        switch = self._set_pause(service, pause)
        self.logger.info(message, service=name)
        yield switch.switched
        return (yield self._drain_service(service, drain_timeout, progress))

    def resume(self, name: str) -> Deferred[None]:
        service = self._service(name)
        switch = self._set_pause(service, PauseRecord(PauseState.RUNNING,
                                                      service.pause.max_pause))
        self.logger.info("Service resumed", service=name)
        return _switched(switch)

    # Listing and state

    def list(self) -> list[dict[str, Any]]:
        """
        The rows of C{mproxy list}, requests in flight as of the last
        L{refresh}.
        """
        rows = service_rows(self.router, self.certificates.status())
        for row in rows:
            row["inflight"] += self.dataplane.inflight(row["service"])
        return rows

    def refresh(self) -> Deferred[None]:
        """
        Fetch the data plane's in-flight counts (before L{list}).
        """
        return self.dataplane.refresh()

    def target_health(self) -> list[tuple[str, str, bool]]:
        """
        C{(service, target, healthy)} for every deployed target (both slots).
        """
        return [
            (name, t.address, t.healthy)
            for name, s in sorted(self.router.services.items())
            for lb in s.balancers()
            for t in lb.targets
        ]

    def restore(self) -> int:
        """
        Rebuild every service from the state file, targets serving at once.

        @raise StateError: naming the file when it is unreadable or a record
            is invalid; nothing is restored then and the file is untouched.
        """
        if self.store is None:
            return 0
        records = self.store.load()
        if records is None:
            self.logger.info("No previous state to restore", path=self.store.path)
            return 0
        for r in records:
            self._restore(r)
        self.dataplane.apply(records, DEFAULT_DRAIN_TIMEOUT, targets=self.target_health_map())
        self.logger.info("Restored saved state", path=self.store.path, services=len(records))
        return len(records)

    def _restore(self, r: ServiceRecord) -> None:
        def serving(slot: Slot) -> LoadBalancer:
            lb = self._balancer(slot)
            lb.mark_all_healthy()
            lb.start_health_checks(r.target_options.health_check, self.probe)
            return lb

        service = Service(r.name, r.options, r.target_options, serving(r.active), self.clock)
        if r.rollout is not None:
            service.rollout = serving(r.rollout)
        service.split = r.split
        if r.pause.state is PauseState.PAUSED:
            service.pause.pause(r.pause.max_pause)
        elif r.pause.state is PauseState.STOPPED:
            service.pause.stop(r.pause.stop_message)
        self.router.install(service)
        self.certificates.update_service(r.name, r.options)

    def shutdown(self) -> None:
        for s in self.router.services.values():
            for lb in s.balancers():
                lb.stop_health_checks()


def _switched(switch: Switch) -> Deferred[None]:
    """
    Fires once every replica serves the change.
    """
    return switch.switched.addCallback(lambda _: None)
