"""
A target is one upstream address (C{host:port}) inside a load balancer.  It
counts the requests in flight on it (one L{Claim} each) so that a deploy can
drain it: stop new claims, wait for the claims it had, and cancel whatever is
left at the drain deadline.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mproxy.http.interfaces import IClaim, IProxiedTarget

from mproxy.spec import parse_target


@frozen
class Drained:
    """
    What a drain did: how many requests it waited for, and how many of them
    it cut at its deadline.
    """

    requests: int = 0
    cut: int = 0

    def __add__(self, other: Drained) -> Drained:
        return Drained(self.requests + other.requests, self.cut + other.cut)


class TargetState(enum.Enum):
    ADDING = "adding"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class Pool(Protocol):
    """
    What a target needs of its upstream connection pool (see
    L{mproxy.http.upstream}).
    """

    def close_idle(self) -> None: ...

    def close(self) -> None: ...


#: Builds the upstream connection pool of a target from its host and port.
PoolFactory = Callable[[str, int], Pool]


class _NoPool:
    """
    The pool of targets built without a data plane (the control plane's unit
    tests); the server always passes the data plane's pools.
    """

    def close_idle(self) -> None:
        pass

    def close(self) -> None:
        pass


def no_pool(host: str, port: int) -> _NoPool:
    return _NoPool()


@implementer(IClaim)
class Claim:
    """
    One request in flight on a target.  The data plane calls L{release} exactly
    once when the request is over, and registers a canceller that a drain
    calls when its deadline passes.
    """

    __slots__ = ("target", "_canceller", "upgraded", "released", "set_cookie")

    def __init__(self, target: Target) -> None:
        self.target = target
        self._canceller: Callable[[], object] | None = None
        self.upgraded = False
        self.released = False
        self.set_cookie: bytes | None = None

    def set_canceller(self, fn: Callable[[], object] | None) -> None:
        self._canceller = fn

    def mark_upgraded(self) -> None:
        self.upgraded = True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.target._released(self)

    def cancel(self) -> None:
        """
        Called by a drain whose deadline passed.  The canceller is expected to
        end the request (and release the claim); if there is none, or it does
        not release, the claim is released here so the drain can finish.
        """
        fn = self._canceller
        self._canceller = None
        if fn is not None:
            try:
                fn()
            except Exception:
                pass
        self.release()


@implementer(IProxiedTarget)
class Target:
    def __init__(
        self,
        address: str,
        clock: IReactorTime,
        pool_factory: PoolFactory = no_pool,
    ) -> None:
        self.address = address
        self.host, self.port = parse_target(address)
        self.clock = clock
        self.state = TargetState.ADDING
        self.inflight: set[Claim] = set()
        self.pool = pool_factory(self.host, self.port)
        self._drain_waiters: list[tuple[set[Claim], Deferred[None]]] = []
        self._state_before_drain: TargetState | None = None
        self.on_state_change: Callable[[Target, TargetState], None] | None = None
        #: when the state last changed (C{clock.seconds()})
        self.since = clock.seconds()
        #: why the last check failed, or why the target was ejected
        self.last_error = ""
        #: the load balancer the target belongs to (set by it)
        self.balancer: object = None

    def __repr__(self) -> str:
        return f"<Target {self.address} {self.state.value} inflight={len(self.inflight)}>"

    @property
    def healthy(self) -> bool:
        return self.state is TargetState.HEALTHY

    def set_state(self, state: TargetState, error: str = "") -> None:
        """
        Move to C{state}; C{error} says why when it is C{unhealthy}.
        """
        old = self.state
        if old is state:
            return
        self.state = state
        self.since = self.clock.seconds()
        if error:
            self.last_error = error
        if self.on_state_change is not None:
            self.on_state_change(self, old)

    def eject(self, error: str) -> bool:
        """
        The data plane could not reach the target (refused, reset, timed
        out): take it out of rotation at once, until a health check passes.
        Only a healthy target is ejected; returns whether this one was.
        """
        if self.state is not TargetState.HEALTHY:
            return False
        self.set_state(TargetState.UNHEALTHY, error)
        return True

    def claim(self) -> Claim | None:
        """
        Register a new request in flight, or return C{None} if the target is
        draining.
        """
        if self.state is TargetState.DRAINING:
            return None
        c = Claim(self)
        self.inflight.add(c)
        return c

    def _released(self, claim: Claim) -> None:
        self.inflight.discard(claim)
        if not self._drain_waiters:
            return
        still = []
        for snapshot, d in self._drain_waiters:
            snapshot.discard(claim)
            if snapshot:
                still.append((snapshot, d))
            else:
                d.callback(None)
        self._drain_waiters = still

    def drain(self, timeout: float) -> Deferred[Drained]:
        """
        Stop new claims, wait for the requests in flight now to finish, and
        cancel those still running after C{timeout} seconds.  Fires with a
        L{Drained} when every request has ended; the target's state is then
        restored (a pause drains targets that stay in use).
        """
        if self.state is TargetState.DRAINING:
            return succeed(Drained())
        self._state_before_drain = self.state
        self.state = TargetState.DRAINING
        snapshot = set(self.inflight)
        waited = len(snapshot)
        cut = 0
        if snapshot:
            d: Deferred[None] = Deferred()
            self._drain_waiters.append((snapshot, d))

            def deadline() -> None:
                nonlocal cut
                cut = len(snapshot)
                for c in list(snapshot):
                    c.cancel()

            call = self.clock.callLater(timeout, deadline)

            def done(_: object) -> None:
                if call.active():
                    call.cancel()

            d.addCallback(done)
            # Upgraded connections (WebSockets) are deliberately NOT cut at
            # once (kamal-proxy and Caddy do, and users complain): they stay
            # up until the deadline, when their canceller sends a close frame
            # (1001 going away) so clients reconnect cleanly to the new target.
        else:
            d = succeed(None)

        def restore(_: object) -> Drained:
            if self.state is TargetState.DRAINING and self._state_before_drain:
                self.state = self._state_before_drain
            return Drained(waited, cut)

        return d.addCallback(restore)

    def close(self) -> None:
        """
        The target is gone for good: close idle upstream connections.
        """
        self.pool.close_idle()
