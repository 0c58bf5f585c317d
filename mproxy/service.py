"""
A service: a name, its options, the active deployment (a L{LoadBalancer}), an
optional rollout deployment with its traffic split, and its pause state.

L{Service.select} is what the data plane calls for each request, and
L{Service.retry} when a request could not be delivered to its target.

With a retry timeout (C{--retry-timeout}), a request that finds no healthy
target waits for one: it is woken by the next target that becomes healthy
(a health transition, or a deploy switching to healthy targets), not by
polling, and gets the 503 page when the wait runs out.  Without one it gets
the 503 page at once.
"""

from __future__ import annotations

import enum
import hashlib
import time
from typing import Any, Callable, Collection

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mproxy.balancer import LoadBalancer
from mproxy.http.interfaces import IProxiedService, IRefusal
from mproxy.spec import DEFAULT_PAUSE_TIMEOUT, ServiceOptions, TargetOptions
from mproxy.target import Claim

WRITER_COOKIE = b"mproxy-writer"
ROLLOUT_COOKIE = b"mproxy-rollout"


@implementer(IRefusal)
@frozen
class Refusal:
    """
    The service answers itself: C{status} with the built-in page (C{message}
    is the stop message shown on a 503), or 200 with an empty body for a health
    check while paused or stopped.  C{unavailable}: a 503 because no target
    was healthy.
    """

    status: int
    message: str = ""
    unavailable: bool = False


NO_TARGET = Refusal(503, unavailable=True)
PAUSE_EXPIRED = Refusal(504)
HEALTH_OK = Refusal(200)


class PauseState(enum.IntEnum):
    RUNNING = 0
    PAUSED = 1
    STOPPED = 2


class PauseController:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.state = PauseState.RUNNING
        self.stop_message = ""
        self.max_pause = DEFAULT_PAUSE_TIMEOUT
        self._held: list[tuple[Deferred[bool], object]] = []

    def pause(self, max_pause: float) -> None:
        self.state = PauseState.PAUSED
        self.stop_message = ""
        self.max_pause = max_pause

    def stop(self, message: str) -> None:
        self.state = PauseState.STOPPED
        self.stop_message = message
        self._release(False)

    def resume(self) -> None:
        self.state = PauseState.RUNNING
        self.stop_message = ""
        self._release(True)

    def _release(self, proceed: bool) -> None:
        held, self._held = self._held, []
        for d, call in held:
            if call.active():  # type: ignore[attr-defined]
                call.cancel()  # type: ignore[attr-defined]
            d.callback(proceed)

    def wait(self) -> Deferred[bool]:
        """
        Hold a request: fires C{True} on resume, C{False} on stop, and
        C{None} when the max pause has passed.
        """
        d: Deferred[bool] = Deferred()

        def expire() -> None:
            self._held = [h for h in self._held if h[0] is not d]
            d.callback(None)  # type: ignore[arg-type]

        call = self.clock.callLater(self.max_pause, expire)
        self._held.append((d, call))
        return d

    @property
    def held(self) -> int:
        return len(self._held)


def rollout_bucket(value: bytes) -> float:
    """
    Where a rollout cookie value falls in [0, 1): the first 8 bytes of its
    BLAKE2b digest.  A well-mixed hash, so that sequential values
    (C{user1}, C{user2}, ...; C{1}, C{2}, ...) split as evenly as random
    ones do.
    """
    digest = hashlib.blake2b(value, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@frozen
class RolloutSplit:
    """
    Which requests go to the rollout slot: those whose C{mproxy-rollout}
    cookie value is in C{allowlist}, and a C{percentage} of the others,
    chosen by hashing the value (so one value always lands on the same side).
    """

    percentage: int
    allowlist: tuple[str, ...] = ()

    def use_rollout(self, value: bytes | None) -> bool:
        if not value:
            return False
        if value.decode("utf-8", "replace") in self.allowlist:
            return True
        return rollout_bucket(value) < self.percentage / 100


def is_health_check(method: bytes, target_path: str, health_path: str) -> bool:
    if method not in (b"GET", b"HEAD"):
        return False
    path = target_path.partition("?")[0]
    return path == "/" + health_path.lstrip("/")


class _TargetWait:
    """
    A request waiting for a healthy target: C{attempt()} gives a claim or
    C{None}; C{d} fires with the claim, or L{NO_TARGET} at the deadline.
    """

    __slots__ = ("attempt", "d", "call")

    def __init__(self, attempt: Callable[[], Claim | None], d: Deferred[Claim | Refusal]
                 ) -> None:
        self.attempt = attempt
        self.d = d
        self.call: object = None


@implementer(IProxiedService)
class Service:
    def __init__(
        self,
        name: str,
        options: ServiceOptions,
        target_options: TargetOptions,
        active: LoadBalancer,
        clock: IReactorTime,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.options = options
        self.target_options = target_options
        self.clock = clock
        self._waits: list[_TargetWait] = []
        self._rollout: LoadBalancer | None = None
        self.active = active
        self.split: RolloutSplit | None = None
        self.pause = PauseController(clock)
        self._wallclock = wallclock

    @property
    def active(self) -> LoadBalancer:
        return self._active

    @active.setter
    def active(self, lb: LoadBalancer) -> None:
        self._active = lb
        lb.on_target_healthy = self._target_healthy
        self._target_healthy(None)

    @property
    def rollout(self) -> LoadBalancer | None:
        return self._rollout

    @rollout.setter
    def rollout(self, lb: LoadBalancer | None) -> None:
        self._rollout = lb
        if lb is not None:
            lb.on_target_healthy = self._target_healthy
            self._target_healthy(None)

    # Waiting for a healthy target

    @property
    def waiting(self) -> int:
        """
        Requests waiting for a healthy target.
        """
        return len(self._waits)

    def _wait_for_target(self, seconds: float, attempt: Callable[[], Claim | None]
                         ) -> Deferred[Claim | Refusal]:
        w = _TargetWait(attempt, Deferred())

        def expire() -> None:
            if w in self._waits:
                self._waits.remove(w)
                w.d.callback(NO_TARGET)

        w.call = self.clock.callLater(seconds, expire)
        self._waits.append(w)
        return w.d

    def _target_healthy(self, target: object) -> None:
        """
        A target became healthy (or new targets were installed): give each
        waiting request a claim while there are targets to claim.
        """
        if not self._waits:
            return
        for w in list(self._waits):
            c = w.attempt()
            if c is None:
                continue
            self._waits.remove(w)
            call: Any = w.call
            if call.active():
                call.cancel()
            w.d.callback(c)

    @property
    def state_name(self) -> str:
        return self.pause.state.name.lower()

    def balancers(self) -> list[LoadBalancer]:
        out = [self._active]
        if self._rollout is not None:
            out.append(self._rollout)
        return out

    def select(
        self,
        method: bytes,
        target_path: str,
        cookie: Callable[[bytes], bytes | None],
        websocket: bool,
    ) -> Claim | Refusal | Deferred[Claim | Refusal]:
        """
        Decide what happens to one request: a L{Claim} on a target (the request
        is then in flight on it), a L{Refusal}, or a L{Deferred} of either when
        the service is paused and holds the request.
        """
        state = self.pause.state
        if state is not PauseState.RUNNING:
            if is_health_check(method, target_path, self.target_options.health_check.path):
                return HEALTH_OK
            if state is PauseState.STOPPED:
                return Refusal(503, self.pause.stop_message)
            d = self.pause.wait()

            def released(proceed: bool | None) -> Claim | Refusal:
                if proceed is None:
                    return PAUSE_EXPIRED
                if not proceed:
                    return Refusal(503, self.pause.stop_message)
                return self._choose_or_wait(method, cookie, websocket)

            return d.addCallback(released)
        return self._choose_or_wait(method, cookie, websocket)

    def _choose_or_wait(
        self,
        method: bytes,
        cookie: Callable[[bytes], bytes | None],
        websocket: bool,
    ) -> Claim | Refusal | Deferred[Claim | Refusal]:
        c = self._choose(method, cookie, websocket)
        if c is NO_TARGET and self.target_options.retry_timeout:
            def attempt() -> Claim | None:
                c = self._choose(method, cookie, websocket)
                return c if isinstance(c, Claim) else None

            return self._wait_for_target(self.target_options.retry_timeout, attempt)
        return c

    def retry(
        self, failed: Claim, tried: Collection[str], wait: float
    ) -> Claim | Refusal | Deferred[Claim | Refusal]:
        """
        Another target for a request that could not be delivered to
        C{failed.target} (whose claim the caller has released): a healthy
        one not in C{tried} (addresses already tried) when there is one,
        else a healthy one tried before; in the same role (writer or reader)
        and slot.  With none healthy: wait up to C{wait} seconds for one (a
        Deferred), or L{NO_TARGET} at once.
        """
        target = failed.target
        lb: LoadBalancer = target.balancer  # type: ignore[assignment]
        if lb is not self._active and lb is not self._rollout:
            lb = self._active  # replaced by a deploy meanwhile
        is_read = target in lb.readers

        def attempt() -> Claim | None:
            return lb.claim_other(is_read, tried)

        c = attempt()
        if c is not None:
            return c
        if wait > 0:
            return self._wait_for_target(wait, attempt)
        return NO_TARGET

    def _choose(
        self,
        method: bytes,
        cookie: Callable[[bytes], bytes | None],
        websocket: bool,
    ) -> Claim | Refusal:
        lb = self._active
        if self.split is not None and self._rollout is not None:
            if self.split.use_rollout(cookie(ROLLOUT_COOKIE)):
                lb = self._rollout
        if not lb.readers:
            c = lb.claim(False)
            return NO_TARGET if c is None else c
        is_read = method in (b"GET", b"HEAD") and (
            not websocket or self.options.read_targets_accept_websockets
        )
        now = self._wallclock()
        if is_read:
            v = cookie(WRITER_COOKIE)
            if v:
                try:
                    if int(v) > now * 1000:
                        is_read = False
                except ValueError:
                    pass
        c = lb.claim(is_read)
        if c is None:
            return NO_TARGET
        timeout = self.options.writer_affinity_timeout
        if not is_read and timeout > 0:
            until = now + timeout
            expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(until + 1))
            c.set_cookie = (
                f"mproxy-writer={int(until * 1000)}; Path=/; Expires={expires}; HttpOnly"
            ).encode("ascii")
        return c
