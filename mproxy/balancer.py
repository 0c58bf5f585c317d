"""
A load balancer is one deployment of a service: its writer and reader targets,
round-robin over the healthy ones, with health checks that move targets in and
out of rotation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:  # the health checks' HTTP client is imported only where checks run
    from mproxy.health import HealthChecker, ProbeFunction
from mproxy.logging import JSONLogger
from mproxy.spec import HealthCheckConfig
from mproxy.target import Claim, Drained, PoolFactory, Target, TargetState, no_pool

OnHealth = Callable[[Target, bool, str], None]


def gather_drains(drains: list[Deferred[Drained]]) -> Deferred[Drained]:
    """
    Fire with the sum of C{drains} once all have fired.
    """
    if not drains:
        return succeed(Drained())

    def total(results: list[tuple[bool, Any]]) -> Drained:
        out = Drained()
        for ok, value in results:
            if ok and isinstance(value, Drained):
                out += value
        return out

    return DeferredList(drains, consumeErrors=True).addCallback(total)


class LoadBalancer:
    def __init__(
        self,
        writers: Iterable[str],
        readers: Iterable[str],
        clock: IReactorTime,
        pool_factory: PoolFactory = no_pool,
        logger: JSONLogger | None = None,
    ) -> None:
        self.clock = clock
        self.logger = logger
        self.writers = [Target(a, clock, pool_factory) for a in writers]
        self.readers = [Target(a, clock, pool_factory) for a in readers]
        self._writer_rotation: list[Target] = []
        self._reader_rotation: list[Target] = []
        self._w = 0
        self._r = 0
        self._checkers: list[HealthChecker] = []
        self._healthy_waiters: list[Deferred[None]] = []
        self.last_health_error = ""
        self.health_listeners: list[OnHealth] = []
        #: called with each target that becomes healthy
        self.on_target_healthy: Callable[[Target], None] | None = None
        for t in self.targets:
            t.on_state_change = self._target_state_changed
            t.balancer = self

    @property
    def targets(self) -> list[Target]:
        return self.writers + self.readers

    @property
    def addresses(self) -> list[str]:
        return [t.address for t in self.targets]

    @property
    def writer_addresses(self) -> list[str]:
        return [t.address for t in self.writers]

    @property
    def reader_addresses(self) -> list[str]:
        return [t.address for t in self.readers]

    def _rebuild(self) -> None:
        self._writer_rotation = [t for t in self.writers if t.healthy]
        self._reader_rotation = [t for t in self.readers if t.healthy]

    def _target_state_changed(self, target: Target, was: TargetState) -> None:
        state = target.state
        if self.logger is not None and state is not TargetState.DRAINING:
            fields = {"error": target.last_error} if state is TargetState.UNHEALTHY else {}
            self.logger.info(
                "Target health updated",
                target=target.address,
                state=state.value,
                was=was.value,
                **fields,
            )
        self._rebuild()
        if state is TargetState.HEALTHY and self.on_target_healthy is not None:
            self.on_target_healthy(target)
        if self.all_healthy():
            waiters, self._healthy_waiters = self._healthy_waiters, []
            for d in waiters:
                d.callback(None)

    def all_healthy(self) -> bool:
        return all(t.healthy for t in self.targets)

    def mark_all_healthy(self) -> None:
        """
        Used when restoring state: the targets served before, so they serve
        at once.
        """
        for t in self.targets:
            t.set_state(TargetState.HEALTHY)
        self._rebuild()

    def claim(self, is_read: bool) -> Claim | None:
        """
        Pick the next healthy target and register the request on it, in one
        step.  Reads prefer healthy readers.  C{None} when no target can take
        the request.
        """
        if is_read and self._reader_rotation:
            rotation = self._reader_rotation
            self._r = (self._r + 1) % len(rotation)
            start = self._r
        else:
            rotation = self._writer_rotation
            if not rotation:
                return None
            self._w = (self._w + 1) % len(rotation)
            start = self._w
        n = len(rotation)
        for i in range(n):
            c = rotation[(start + i) % n].claim()
            if c is not None:
                return c
        return None

    def claim_other(self, is_read: bool, tried: Collection[str]) -> Claim | None:
        """
        For a request sent again: a healthy target (in the role L{claim}
        would pick) whose address is not in C{tried}, else a healthy one
        that is; C{None} when none is healthy.
        """
        rotation = self._reader_rotation if is_read and self._reader_rotation else (
            self._writer_rotation)
        for t in rotation:
            if t.address not in tried:
                c = t.claim()
                if c is not None:
                    return c
        for t in rotation:
            c = t.claim()
            if c is not None:
                return c
        return None

    # Health

    def start_health_checks(
        self, config: HealthCheckConfig, probe: ProbeFunction
    ) -> None:
        """
        Start checking every target, a lone one too, until
        L{stop_health_checks}: a dead target leaves rotation (and, when it
        was the only one, requests get the 503 page at once instead of a 502
        each after a connect attempt).
        """
        from mproxy.health import HealthChecker

        self.stop_health_checks()
        for t in self.targets:
            checker = HealthChecker(t, config, self.clock, probe, self._health_result)
            self._checkers.append(checker)
            checker.start()

    def _health_result(self, target: Target, ok: bool, error: str) -> None:
        for listener in self.health_listeners:
            listener(target, ok, error)
        if not ok:
            self.last_health_error = error
            # While a deploy waits for the target, each failure is news; once
            # it has served, only its transitions are logged.
            if self.logger is not None and target.state is TargetState.ADDING:
                self.logger.info("Healthcheck failed", target=target.address, error=error)

    def stop_health_checks(self) -> None:
        for c in self._checkers:
            c.stop()
        self._checkers = []

    def wait_healthy(self) -> Deferred[None]:
        if self.all_healthy():
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._forget(d))
        self._healthy_waiters.append(d)
        return d

    def _forget(self, d: Deferred[None]) -> None:
        if d in self._healthy_waiters:
            self._healthy_waiters.remove(d)

    # Drain

    def inflight(self) -> int:
        return sum(len(t.inflight) for t in self.targets)

    def drain(self, timeout: float) -> Deferred[Drained]:
        """
        Drain every target at once (see L{Target.drain}); fires with the sum
        of what they did.
        """
        return gather_drains([t.drain(timeout) for t in self.targets])

    def close(self) -> None:
        self.stop_health_checks()
        for t in self.targets:
            t.close()


