"""
Deploys: a service's active slot (L{Deployer.deploy}) or its rollout slot
(L{Deployer.rollout_deploy}) gets a new load balancer in three steps: the
health wait (start checking it, wait until every target has passed once,
within the deploy timeout), the switch (durable first, then synchronous), and
the drain of the load balancer it replaced (let its requests finish, cut the
rest at the drain timeout).

Cancelling a deploy's Deferred before the switch stops the health wait and
closes the new load balancer, so nothing changes.  A drain cannot be
cancelled: once traffic has switched, the old targets are drained to the end
whatever the caller does.  Deploys of one service are serialised by its lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs
from attrs import frozen
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    TimeoutError,
    inlineCallbacks,
)
from twisted.internet.interfaces import IReactorTime

from mproxy.balancer import LoadBalancer, gather_drains
from mproxy.errors import DeployTimedOut, ServiceNotFound
from mproxy.health import ProbeFunction
from mproxy.logging import JSONLogger
from mproxy.router import Router
from mproxy.service import Service
from mproxy.spec import (
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DeployRequest,
    ServiceOptions,
    TargetOptions,
    format_duration,
    unique,
    validate_targets,
    validate_timeouts,
)
from mproxy.state import ServiceRecord, Slot
from mproxy.target import Drained, Target

if TYPE_CHECKING:
    from mproxy.controller import Certificates, DeployRecorder

#: Makes durable the state in which a service is the given record (or is
#: gone, for C{None}), with the drain timeout of what it replaces, and sends
#: it to the data plane (the L{mproxy.workers.interfaces.Switch} returned)
#: with the load balancers that are to serve it, by slot (C{"active"},
#: C{"rollout"}); raises L{mproxy.errors.StateError} when it cannot.
Commit = Callable[[str, "ServiceRecord | None", float, "dict[str, LoadBalancer]"], Any]

#: Progress of a long command: C{(phase, detail)}, e.g.
#: C{("health", "waiting for web-2:3000 to become healthy")}.
Progress = Callable[[str, str], None]


def no_progress(phase: str, detail: str) -> None:
    pass


@frozen
class DeployResult:
    """
    What a finished deploy did: the addresses now serving, and what draining
    the replaced ones took.
    """

    targets: tuple[str, ...]
    drained: Drained = Drained()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@inlineCallbacks
def wait_healthy(
    lb: LoadBalancer,
    target_options: TargetOptions,
    probe: ProbeFunction,
    clock: IReactorTime,
    deploy_timeout: float,
    progress: Progress,
) -> Any:
    """
    Start checking C{lb}'s targets and fire when every one has been healthy
    once.  On a timeout (L{DeployTimedOut}, naming the timeout and the last
    health error) or a cancellation (L{CancelledError}) C{lb} is closed.
    """

    def report(target: Target, ok: bool, error: str) -> None:
        progress("health-result", f"{target.address}: " + ("healthy" if ok else error))

    lb.health_listeners.append(report)
    lb.start_health_checks(target_options.health_check, probe)
    progress("health", f"waiting for {', '.join(lb.addresses)} to become healthy")
    wait = lb.wait_healthy()
    wait.addTimeout(deploy_timeout, clock)
    try:
        yield wait
    except TimeoutError:
        lb.close()
        msg = (
            "target failed to become healthy within configured timeout "
            f"({format_duration(deploy_timeout)})"
        )
        if lb.last_health_error:
            msg += f": {lb.last_health_error}"
        raise DeployTimedOut(msg)
    except CancelledError:
        lb.close()
        raise
    finally:
        lb.health_listeners.remove(report)


def _shield(d: Deferred[Drained]) -> Deferred[Drained]:
    """
    A Deferred that fires with C{d}'s result, and whose cancellation leaves
    C{d} alone.
    """
    out: Deferred[Drained] = Deferred()

    def passed(result: Drained) -> Drained:
        if not out.called:
            out.callback(result)
        return result

    d.addCallback(passed)
    return out


@inlineCallbacks
def drain_replaced(lb: LoadBalancer, timeout: float, progress: Progress,
                   elsewhere: int = 0, others: Deferred[Drained] | None = None) -> Any:
    """
    Stop checking a replaced load balancer, drain it, close it; fires with
    the L{Drained} totals, those of C{others} (the data plane's drain of its
    copies of it, with C{elsewhere} requests in flight) included.
    Cancelling the returned Deferred does not stop the drain (the switch
    has happened): it fires when the drain ends.
    """
    lb.stop_health_checks()
    progress(
        "draining",
        f"draining {plural(lb.inflight() + elsewhere, 'request')} from "
        + ", ".join(lb.addresses),
    )
    drain = lb.drain(timeout)
    if others is not None:
        drain = gather_drains([drain, others])
    while True:
        try:
            drained = yield _shield(drain)
        except CancelledError:
            continue
        lb.close()
        return drained


@inlineCallbacks
def _switched(switch: Any) -> Any:
    """
    Wait for every replica to serve a switch whatever the caller does
    (cancelling only stops waiting for it); fires with the requests in
    flight on what it replaced.
    """
    while True:
        try:
            return (yield _shield(switch.switched))
        except CancelledError:
            continue


class Deployer:
    """
    Runs deploys against the router.  Everything it touches is injected:
    C{commit} makes a new state durable (the controller's state file),
    C{balancer} builds a load balancer for a L{Slot}.
    """

    def __init__(
        self,
        router: Router,
        clock: IReactorTime,
        probe: ProbeFunction,
        logger: JSONLogger,
        commit: Commit,
        balancer: Callable[[Slot], LoadBalancer],
        certificates: "Certificates",
        validate_error_pages: Callable[[ServiceOptions], None],
        deploys: "DeployRecorder",
    ) -> None:
        self.router = router
        self.clock = clock
        self.probe = probe
        self.logger = logger
        self._commit = commit
        self._balancer = balancer
        self.certificates = certificates
        self.validate_error_pages = validate_error_pages
        self.deploys = deploys
        self._locks: dict[str, DeferredLock] = {}

    def _lock(self, name: str) -> DeferredLock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = DeferredLock()
        return lock

    def _service(self, name: str) -> Service:
        s = self.router.services.get(name)
        if s is None:
            raise ServiceNotFound.named(name)
        return s

    @inlineCallbacks
    def deploy(self, req: DeployRequest, progress: Progress = no_progress) -> Any:
        """
        Health-check the new targets, switch the service to them, drain the
        old ones; fires with a L{DeployResult} only when all of that is done.
        On failure nothing changes and the old targets keep serving.

        Cancelling the Deferred before the switch abandons the deploy (checks
        stopped, nothing changed); after the switch the drain goes on and the
        Deferred fires when it ends.
        """
        try:
            result = yield self._deploy(req, progress)
        except BaseException as e:
            self._deploy_failed(req.service, req.targets, e)
            raise
        self.deploys.deploy(req.service, "success")
        self.logger.info(
            "Deployed",
            service=req.service,
            targets=list(req.targets),
            hosts=list(req.options.hosts),
            paths=list(req.options.path_prefixes),
            tls=req.options.tls_enabled,
            drained=result.drained.requests,
            cut=result.drained.cut,
        )
        progress("done", "")
        return result

    def _deploy_failed(self, service: str, targets: tuple[str, ...], e: BaseException) -> None:
        if isinstance(e, CancelledError):
            self.deploys.deploy(service, "cancelled")
            self.logger.warn(
                "Deploy cancelled", service=service, targets=list(targets),
                reason="cancelled before the switch; the old targets keep serving",
            )
        else:
            self.deploys.deploy(service, "failure")
            self.logger.error(
                "Deploy failed", service=service, targets=list(targets),
                error=str(e) or e.__class__.__name__,
            )

    @inlineCallbacks
    def _deploy(self, req: DeployRequest, progress: Progress) -> Any:
        req.validate()
        self.certificates.validate(req.options)
        self.validate_error_pages(req.options)
        self.logger.info(
            "Deploying", service=req.service, targets=list(req.targets),
            hosts=list(req.options.hosts), paths=list(req.options.path_prefixes),
            tls=req.options.tls_enabled,
        )
        lock = self._lock(req.service)
        yield lock.acquire()
        try:
            # Refuse a host conflict before spending the deploy timeout on health.
            self.router.check_conflicts(req.service, req.options)
            lb = self._balancer(Slot(req.targets, req.readers))
            if req.force:
                self.logger.warn("Deploying without waiting for health (--force)",
                                 service=req.service)
                lb.start_health_checks(req.target_options.health_check, self.probe)
            else:
                yield wait_healthy(lb, req.target_options, self.probe, self.clock,
                                   req.deploy_timeout, progress)
            old, switch = self._switch_active(req, lb)
        finally:
            lock.release()
        elsewhere = yield _switched(switch)
        progress("switched", "traffic switched to " + ", ".join(lb.addresses))
        drained = Drained()
        if old is not None:
            drained = yield drain_replaced(old, req.drain_timeout, progress, elsewhere,
                                           switch.drained)
        return DeployResult(req.targets + req.readers, drained)

    def _switch_active(self, req: DeployRequest, lb: LoadBalancer
                       ) -> tuple[LoadBalancer | None, Any]:
        """
        Make C{lb} the service's active load balancer, creating the service
        or updating its options; returns the load balancer it replaced and
        the data plane's switch.
        Synchronous, so no request can slip between the old one and the new.
        On any error C{lb} is closed and nothing has changed.
        """
        name = req.service
        try:
            self.router.check_conflicts(name, req.options)
            existing = self.router.services.get(name)
            record = ServiceRecord(name, req.options, req.target_options,
                                   Slot(req.targets, req.readers))
            if existing is not None:
                kept = ServiceRecord.of(existing)
                record = attrs.evolve(record, rollout=kept.rollout, split=kept.split,
                                      pause=kept.pause)
            switch = self._commit(name, record, req.drain_timeout, {"active": lb})
        except BaseException:
            lb.close()
            raise
        if existing is None:
            old = None
            existing = Service(name, req.options, req.target_options, lb, self.clock)
        else:
            old = existing.active
            existing.options = req.options
            existing.target_options = req.target_options
            existing.active = lb
        self.router.install(existing)
        self.certificates.update_service(name, req.options)
        return old, switch

    # Rollout

    @inlineCallbacks
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
        Fill the service's rollout slot with healthy new targets (no traffic
        moves until L{rollout_set}); fires with a L{DeployResult} once the
        targets it replaced have drained.
        """
        slot = Slot(unique(targets), unique(readers))
        validate_targets(slot.writers, slot.readers)
        validate_timeouts(deploy_timeout, drain_timeout)
        service = self._service(name)
        lock = self._lock(name)
        yield lock.acquire()
        try:
            self.logger.info("Deploying for rollout", service=name, targets=list(slot.writers))
            lb = self._balancer(slot)
            yield wait_healthy(lb, service.target_options, self.probe, self.clock,
                               deploy_timeout, progress)
            old, switch = self._fill_rollout(name, lb, drain_timeout)
        finally:
            lock.release()
        elsewhere = yield _switched(switch)
        progress("switched", "rollout targets ready: " + ", ".join(lb.addresses)
                 + " (traffic moves with `mproxy rollout set`)")
        drained = Drained()
        if old is not None:
            drained = yield drain_replaced(old, drain_timeout, progress, elsewhere,
                                           switch.drained)
        self.logger.info("Deployed for rollout", service=name, targets=list(slot.writers))
        progress("done", "")
        return DeployResult(slot.writers + slot.readers, drained)

    def _fill_rollout(self, name: str, lb: LoadBalancer, drain_timeout: float
                      ) -> tuple[LoadBalancer | None, Any]:
        """
        Put C{lb} in the rollout slot; returns the load balancer it replaced
        and the data plane's switch.  On any error C{lb} is closed and
        nothing has changed.
        """
        try:
            service = self._service(name)  # removed while the rollout waited?
            slot = Slot(lb.writer_addresses, lb.reader_addresses)
            switch = self._commit(name, attrs.evolve(ServiceRecord.of(service), rollout=slot),
                                  drain_timeout, {"rollout": lb})
        except BaseException:
            lb.close()
            raise
        old, service.rollout = service.rollout, lb
        return old, switch
