# -*- test-case-name: tests.test_tls_service -*-
"""
L{OnDemandGate}: which unknown names an on-demand service may order
certificates for, and when: one policy check at a time per name, a bounded
number of checks in flight (scanners sending random names), denials cached
for a while, and at most C{rate} new orders per C{window} seconds.

    gate = OnDemandGate(clock, policy, logger)
    gate.denied(service, name) -> bool      # a recent denial is cached
    gate.ask(service, url, name, approved)  # approved(service, name) later, maybe
    gate.reserve() -> float                 # when the next new order may start
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.python.failure import Failure

from mproxy.tls.interfaces import IOnDemandPolicy
from mproxy.tls.ondemand import OnDemandDenied

__all__ = ["OnDemandGate"]

_DENIED_LIMIT = 10000


class OnDemandGate:
    def __init__(
        self,
        clock: Any,
        policy: IOnDemandPolicy | None,
        logger: Any,
        rate: int = 10,
        window: float = 3600.0,
        deny_ttl: float = 60.0,
        max_checks: int = 16,
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.logger = logger
        self.rate = rate
        self.window = window
        self.deny_ttl = deny_ttl
        self.max_checks = max_checks
        self._checks: set[tuple[str, str]] = set()
        self._denied: dict[tuple[str, str], float] = {}
        self._orders: deque[float] = deque()

    def denied(self, service: str, name: str) -> bool:
        until = self._denied.get((service, name))
        return until is not None and until > self.clock.seconds()

    def ask(self, service: str, url: str, name: str, approved: Callable[[str, str], None]) -> None:
        """
        Ask the policy about C{name} unless a check for it is running or
        too many are; C{approved(service, name)} is called if it agrees.
        """
        check = (service, name)
        if check in self._checks or self.policy is None:
            return
        if len(self._checks) >= self.max_checks:
            # a flood of unknown names (scanners): don't hammer the policy
            # endpoint; these handshakes fail and clients may retry later
            return
        self._checks.add(check)
        d = self.policy.check(service, url, name)
        d.addCallbacks(self._approved, self._refused, (service, name, approved), None, (service, name))

    def _approved(self, _: Any, service: str, name: str, approved: Callable[[str, str], None]) -> None:
        self._checks.discard((service, name))
        self._denied.pop((service, name), None)
        approved(service, name)

    def _refused(self, failure: Failure, service: str, name: str) -> None:
        self._checks.discard((service, name))
        now = self.clock.seconds()
        if len(self._denied) >= _DENIED_LIMIT:
            for key, until in list(self._denied.items()):
                if until <= now:
                    del self._denied[key]
        self._denied[(service, name)] = now + self.deny_ttl
        if failure.check(OnDemandDenied):
            self.logger.warn(
                f"TLS on-demand check denied host {name}: {failure.value}",
                host=name,
                error=str(failure.value),
            )
        else:
            self.logger.error(
                f"TLS on-demand check for {name} crashed",
                host=name,
                error=f"{failure.type.__name__}: {failure.value}",
                traceback=failure.getTraceback(),
            )

    def reserve(self) -> float:
        """
        Take a slot for a new on-demand order: the time it may start (now,
        or when the window has room again).
        """
        now = self.clock.seconds()
        orders = self._orders
        while orders and orders[0] <= now - self.window:
            orders.popleft()
        if len(orders) < self.rate:
            at = now
        else:
            at = orders[len(orders) - self.rate] + self.window
        orders.append(at)
        return at
