"""
The operations behind every control command: deploy, remove, pause, stop,
resume, rollout, list; plus restoring from and saving to the state file.

A deploy never holds anything that other services need while it waits:
health waits and drains only touch the service being deployed, and commands
for one service are serialised by that service's own lock.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs

from twisted.internet.defer import (
    CancelledError,
    DeferredList,
    DeferredLock,
    TimeoutError,
    inlineCallbacks,
)
from twisted.internet.interfaces import IReactorTime

from mproxy.balancer import LoadBalancer
from mproxy.errors import (
    DeployTimedOut,
    InvalidOptions,
    InvalidTarget,
    RolloutNotSet,
    ServiceNotFound,
    StateError,
)
from mproxy.health import ProbeFunction
from mproxy.http import custompages
from mproxy.logging import JSONLogger
from mproxy.router import Router
from mproxy.service import PauseState, RolloutSplit, Service
from mproxy.spec import (
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_PAUSE_TIMEOUT,
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
    format_duration,
    from_json,
    parse_target,
    to_json,
    unique,
    validate_drain,
    validate_percentage,
    validate_targets,
    validate_timeouts,
)
from mproxy.state import StateStore
from mproxy.target import PoolFactory, no_pool

Progress = Callable[[str, str], None]


def _no_progress(phase: str, detail: str) -> None:
    pass


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
    ) -> None:
        self.router = router
        self.clock = clock
        self.probe = probe
        self.store = store
        self.logger = logger
        self.pool_factory = pool_factory
        self.certificates: Certificates = certificates or NoCertificates()
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

    def _balancer(self, writers: tuple[str, ...], readers: tuple[str, ...]) -> LoadBalancer:
        return LoadBalancer(writers, readers, self.clock, self.pool_factory, self.logger)

    # Deploy

    @inlineCallbacks
    def deploy(self, req: DeployRequest, progress: Progress = _no_progress) -> Any:
        """
        Health-check the new targets, switch the service to them, drain the
        old ones; fires with the new target addresses only when all of that is
        done.  On failure nothing changes and the old targets keep serving.
        """
        req.validate()
        self.certificates.validate(req.options)
        custompages.validate(req.options)
        lock = self._lock(req.service)
        yield lock.acquire()
        try:
            old_lb, save_error = yield self._install(
                req.service,
                req.targets,
                req.readers,
                req.options,
                req.target_options,
                req.deploy_timeout,
                req.force,
                progress,
                rollout=False,
            )
        finally:
            lock.release()
        if old_lb is not None:
            yield self._drain(req.service, old_lb, req.drain_timeout, progress)
        if save_error is not None:
            raise save_error
        self.logger.info(
            "Deployed",
            service=req.service,
            targets=list(req.targets),
            hosts=list(req.options.hosts),
            paths=list(req.options.path_prefixes),
            tls=req.options.tls_enabled,
        )
        progress("done", "")
        return list(req.targets + req.readers)

    @inlineCallbacks
    def _install(
        self,
        name: str,
        writers: tuple[str, ...],
        readers: tuple[str, ...],
        options: ServiceOptions,
        target_options: TargetOptions,
        deploy_timeout: float,
        force: bool,
        progress: Progress,
        rollout: bool,
    ) -> Any:
        self.logger.info(
            "Deploying for rollout" if rollout else "Deploying",
            service=name,
            targets=list(writers),
            hosts=list(options.hosts),
            paths=list(options.path_prefixes),
            tls=options.tls_enabled,
        )
        # Refuse a host conflict before spending the deploy timeout on health.
        self.router.check_conflicts(name, options)
        lb = self._balancer(writers, readers)

        def report_health(target: Any, ok: bool, error: str) -> None:
            progress("health-result", f"{target.address}: " + ("healthy" if ok else error))

        lb.health_listeners.append(report_health)
        lb.start_health_checks(target_options.health_check, self.probe)
        if not force:
            progress("health", f"waiting for {', '.join(lb.addresses)} to become healthy")
            wait = lb.wait_healthy()
            wait.addTimeout(deploy_timeout, self.clock)
            try:
                yield wait
            except (TimeoutError, CancelledError):
                lb.close()
                msg = (
                    "target failed to become healthy within configured timeout "
                    f"({format_duration(deploy_timeout)})"
                )
                if lb.last_health_error:
                    msg += f": {lb.last_health_error}"
                raise DeployTimedOut(msg)
        else:
            self.logger.warn("Deploying without waiting for health (--force)", service=name)
        # The switch: synchronous, so no request can slip between the old
        # balancer and the new one.
        try:
            self.router.check_conflicts(name, options)
            existing = self.router.services.get(name)
            if rollout:
                if existing is None:
                    # Removed while the rollout waited for health.
                    raise ServiceNotFound.named(name)
                old_lb = existing.rollout
                existing.rollout = lb
            elif existing is None:
                old_lb = None
                self.router.install(
                    Service(name, options, target_options, lb, self.clock)
                )
            else:
                old_lb = existing.active
                existing.options = options
                existing.target_options = target_options
                existing.active = lb
                self.router.install(existing)
        except BaseException:
            lb.close()
            raise
        if not rollout:
            self.certificates.update_service(name, options)
        lb.health_listeners.remove(report_health)
        save_error = None
        try:
            self.save()
        except StateError as e:
            # Traffic has switched: the old balancer must still be drained
            # before the error is reported.
            save_error = e
        progress("switched", "traffic switched to " + ", ".join(lb.addresses))
        return old_lb, save_error

    @inlineCallbacks
    def _drain(
        self, name: str, lb: LoadBalancer, timeout: float, progress: Progress
    ) -> Any:
        lb.stop_health_checks()
        n = lb.inflight()
        progress("draining", f"draining {n} request{'s' if n != 1 else ''} from "
                 + ", ".join(lb.addresses))
        yield lb.drain(timeout)
        lb.close()

    # Rollout

    @inlineCallbacks
    def rollout_deploy(
        self,
        name: str,
        targets: tuple[str, ...],
        readers: tuple[str, ...] = (),
        deploy_timeout: float = DEFAULT_DEPLOY_TIMEOUT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        progress: Progress = _no_progress,
    ) -> Any:
        targets, readers = unique(targets), unique(readers)
        validate_targets(targets, readers)
        validate_timeouts(deploy_timeout, drain_timeout)
        service = self._service(name)
        lock = self._lock(name)
        yield lock.acquire()
        try:
            service = self._service(name)
            old_lb, save_error = yield self._install(
                name,
                targets,
                readers,
                service.options,
                service.target_options,
                deploy_timeout,
                False,
                progress,
                rollout=True,
            )
        finally:
            lock.release()
        if old_lb is not None:
            yield self._drain(name, old_lb, drain_timeout, progress)
        if save_error is not None:
            raise save_error
        self.logger.info("Deployed for rollout", service=name, targets=list(targets))
        return list(targets + readers)

    def rollout_set(self, name: str, percentage: int, allowlist: tuple[str, ...]) -> None:
        validate_percentage(percentage)
        service = self._service(name)
        if service.rollout is None:
            raise RolloutNotSet()
        service.split = RolloutSplit(percentage, tuple(allowlist))
        self.logger.info(
            "Set rollout split", service=name, percentage=percentage, allowlist=list(allowlist)
        )
        self.save()

    def rollout_stop(self, name: str) -> None:
        service = self._service(name)
        service.split = None
        self.logger.info("Stopped rollout", service=name)
        self.save()

    # Remove, pause, stop, resume

    def remove(self, name: str) -> None:
        service = self._service(name)
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
        self.save()

    @inlineCallbacks
    def pause(
        self,
        name: str,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_pause: float = DEFAULT_PAUSE_TIMEOUT,
    ) -> Any:
        validate_drain(drain_timeout, max_pause)
        service = self._service(name)
        service.pause.pause(max_pause)
        self.logger.info("Service paused", service=name)
        self.save()
        yield DeferredList([lb.drain(drain_timeout) for lb in service.balancers()])
        self.logger.info("Service drained", service=name)

    @inlineCallbacks
    def stop(
        self, name: str, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, message: str = ""
    ) -> Any:
        validate_drain(drain_timeout)
        service = self._service(name)
        service.pause.stop(message)
        self.logger.info("Service stopped", service=name)
        self.save()
        yield DeferredList([lb.drain(drain_timeout) for lb in service.balancers()])
        self.logger.info("Service drained", service=name)

    def resume(self, name: str) -> None:
        service = self._service(name)
        service.pause.resume()
        self.logger.info("Service resumed", service=name)
        self.save()

    # Listing and state

    def list(self) -> list[dict[str, Any]]:
        certs = self.certificates.status()
        claimed = {h for s in self.router.services.values() for h in s.options.hosts if h}
        out = []
        for name in sorted(self.router.services):
            s = self.router.services[name]
            hosts = [h for h in s.options.hosts if h]
            if s.options.tls_on_demand_url:
                # Its certificates are for whichever names were approved.
                names = sorted(h for h in certs if h not in claimed)
            else:
                names = hosts
            out.append(
                {
                    "service": name,
                    "hosts": hosts,
                    "paths": list(s.options.path_prefixes),
                    "targets": s.active.addresses,
                    "rollout_targets": s.rollout.addresses if s.rollout else [],
                    "state": s.state_name,
                    "tls": s.options.tls_enabled,
                    "certificates": {h: certs[h] for h in names if h in certs},
                    "inflight": sum(lb.inflight() for lb in s.balancers()),
                }
            )
        return out

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.router.services):
            s = self.router.services[name]
            out.append(
                {
                    "name": name,
                    "options": to_json(s.options),
                    "target_options": to_json(s.target_options),
                    "active_targets": [t.address for t in s.active.writers],
                    "active_readers": [t.address for t in s.active.readers],
                    "rollout_targets": (
                        [t.address for t in s.rollout.writers] if s.rollout else None
                    ),
                    "rollout_readers": (
                        [t.address for t in s.rollout.readers] if s.rollout else None
                    ),
                    "pause": {
                        "state": int(s.pause.state),
                        "stop_message": s.pause.stop_message,
                        "max_pause": s.pause.max_pause,
                    },
                    "rollout_split": (
                        {"percentage": s.split.percentage, "allowlist": list(s.split.allowlist)}
                        if s.split
                        else None
                    ),
                }
            )
        return out

    def save(self) -> None:
        if self.store is None:
            return
        try:
            self.store.save(self.records())
        except OSError as e:
            self.logger.error("Unable to save state", path=self.store.path, error=str(e))
            raise StateError(
                f"cannot write state file {self.store.path}: {e.strerror or e}"
            ) from e
        self.logger.debug("Saved state", path=self.store.path)

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
        services = []
        try:
            for r in records:
                services.append(self._decode_record(r))
        except (InvalidOptions, InvalidTarget, TypeError, ValueError, KeyError,
                AttributeError) as e:
            raise StateError(f"state file {self.store.path} is invalid: {e}")
        for name, options, target_options, active, rollout, split, pause in services:
            lb = self._balancer(*active)
            lb.mark_all_healthy()
            lb.start_health_checks(target_options.health_check, self.probe)
            service = Service(name, options, target_options, lb, self.clock)
            if rollout[0]:
                rlb = self._balancer(*rollout)
                rlb.mark_all_healthy()
                rlb.start_health_checks(target_options.health_check, self.probe)
                service.rollout = rlb
            service.split = split
            state, max_pause, stop_message = pause
            if state is PauseState.PAUSED:
                service.pause.pause(max_pause)
            elif state is PauseState.STOPPED:
                service.pause.stop(stop_message)
            self.router.install(service)
            self.certificates.update_service(name, options)
        self.logger.info("Restored saved state", path=self.store.path, services=len(services))
        return len(services)

    @staticmethod
    def _decode_record(r: dict[str, Any]) -> tuple[Any, ...]:
        """
        Check and decode one saved service record completely, so that a bad
        record is found before anything is restored.
        """

        def mapping(key: str) -> dict[str, Any]:
            v = r.get(key) or {}
            if not isinstance(v, dict):
                raise TypeError(f"{key} of {r['name']!r} is not an object")
            return v

        def addresses(key: str) -> tuple[str, ...]:
            v = tuple(r.get(key) or ())
            for t in v:
                parse_target(t)
            return v

        options = from_json(ServiceOptions, mapping("options"))
        target_options = from_json(TargetOptions, mapping("target_options"))
        if "/" in options.path_prefixes:
            options.validate()
        else:
            # Path services' TLS flags are inherited from their host's root
            # service (Router._inherit_tls), not set by the user.
            attrs.evolve(options, tls_enabled=False, tls_redirect=True).validate()
        active = (addresses("active_targets"), addresses("active_readers"))
        if not active[0]:
            raise InvalidOptions(f"no active targets for {r['name']!r}")
        rollout = (addresses("rollout_targets"), addresses("rollout_readers"))
        split = None
        if r.get("rollout_split"):
            s = mapping("rollout_split")
            split = RolloutSplit(int(s.get("percentage", 0)), tuple(s.get("allowlist") or ()))
        pause = mapping("pause")
        state = PauseState(int(pause.get("state", 0)))
        max_pause = float(pause.get("max_pause", 30.0))
        stop_message = str(pause.get("stop_message", ""))
        return (r["name"], options, target_options, active, rollout, split,
                (state, max_pause, stop_message))

    def shutdown(self) -> None:
        for s in self.router.services.values():
            for lb in s.balancers():
                lb.stop_health_checks()

