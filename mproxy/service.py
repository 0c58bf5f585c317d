"""
A service: a name, its options, the active deployment (a L{LoadBalancer}), an
optional rollout deployment with its traffic split, and its pause state.

L{Service.select} is what the data plane calls for each request.
"""

from __future__ import annotations

import enum
import hashlib
import time
from typing import Callable

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
    check while paused or stopped.
    """

    status: int
    message: str = ""


NO_TARGET = Refusal(503)
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
        self.active = active
        self.rollout: LoadBalancer | None = None
        self.split: RolloutSplit | None = None
        self.pause = PauseController(clock)
        self._wallclock = wallclock

    @property
    def state_name(self) -> str:
        return self.pause.state.name.lower()

    def balancers(self) -> list[LoadBalancer]:
        out = [self.active]
        if self.rollout is not None:
            out.append(self.rollout)
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
                return self._choose(method, cookie, websocket)

            return d.addCallback(released)
        return self._choose(method, cookie, websocket)

    def _choose(
        self,
        method: bytes,
        cookie: Callable[[bytes], bytes | None],
        websocket: bool,
    ) -> Claim | Refusal:
        lb = self.active
        if self.split is not None and self.rollout is not None:
            if self.split.use_rollout(cookie(ROLLOUT_COOKIE)):
                lb = self.rollout
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
