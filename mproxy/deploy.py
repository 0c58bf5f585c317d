"""
The two waits of a deploy, apart from the switch between them: health
(start checking a new load balancer, wait until every target has passed
once, within the deploy timeout) and drain (let the replaced load
balancer's requests finish, cut the rest at the drain timeout).

Cancelling a deploy's Deferred stops the health wait and closes the new load
balancer, so nothing changes.  A drain cannot be cancelled: once traffic has
switched, the old targets are drained to the end whatever the caller does.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from mproxy.balancer import LoadBalancer
from mproxy.errors import DeployTimedOut
from mproxy.health import ProbeFunction
from mproxy.spec import TargetOptions, format_duration
from mproxy.target import Drained, Target

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
def drain_replaced(lb: LoadBalancer, timeout: float, progress: Progress) -> Any:
    """
    Stop checking a replaced load balancer, drain it, close it; fires with
    the L{Drained} totals.  Cancelling the returned Deferred does not stop
    the drain (the switch has happened): it fires when the drain ends.
    """
    lb.stop_health_checks()
    progress(
        "draining",
        f"draining {plural(lb.inflight(), 'request')} from " + ", ".join(lb.addresses),
    )
    drain = lb.drain(timeout)
    while True:
        try:
            drained = yield _shield(drain)
        except CancelledError:
            continue
        lb.close()
        return drained
