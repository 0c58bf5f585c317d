"""
C{mproxy run}: the service tree of L{mproxy.tree} in the foreground, on the
global reactor, exiting 0 after a graceful stop on SIGTERM/SIGINT and 1 with
C{Error: ...} when it cannot start.
"""

from __future__ import annotations

from typing import Any, Sequence

from mproxy.config import SERVER_OPTIONS, SHUTDOWN_GRACE, resolve_config
from mproxy.errors import MproxyError


def run_server(ns: Any, streams: Any, run_args: Sequence[str] = ()) -> int:
    """
    Run the server; C{run_args} are the flags it was given (for the
    upgrade's check of the new code).

    With workers, their sockets are bound and the workers started first,
    before the rest of the server is even imported (they start while it
    does, L{mproxy.workers.prestart}).
    """
    from mproxy.cli.streams import fail

    explicit = {spec.attr: getattr(ns, spec.attr, None) for spec in SERVER_OPTIONS}
    try:
        config = resolve_config(explicit)
    except MproxyError as e:
        return fail(streams, str(e))
    prestarted = None
    if config.workers:
        from mproxy.workers.prestart import inherits_sockets, prestart

        if not inherits_sockets():
            try:
                prestarted = prestart(config, SHUTDOWN_GRACE)
            except MproxyError as e:
                return fail(streams, str(e))
    try:
        return _run(config, streams, run_args, prestarted)
    finally:
        if prestarted is not None:
            prestarted.abandon()  # those not taken over: start-up failed


def _run(config: Any, streams: Any, run_args: Sequence[str], prestarted: Any) -> int:
    from twisted.internet import reactor

    from mproxy.cli.streams import fail
    from mproxy.tree import build_service
    from mproxy.upgrade import relaunch_for_run

    try:
        service = build_service(reactor, config, prestarted=prestarted)
    except MproxyError as e:
        return fail(streams, str(e))
    service.upgrades.relaunch = relaunch_for_run(run_args)
    forward_twisted_events(service.logger, reactor)
    # The same two steps as twistd, before the reactor runs: nothing is
    # accepted until the state is restored, and a failure exits at once.
    service.ready.addErrback(lambda f: None)  # reported below, once
    try:
        service.privilegedStartService()
        service.startService()
    except MproxyError as e:
        return fail(streams, str(e))
    except Exception as e:
        return fail(streams, f"{type(e).__name__}: {e}")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    from mproxy import collector

    collector.resume()
    reactor.run()
    if service.failure is not None:  # failed once running (its workers did not start)
        return fail(streams, str(service.failure))
    return 0


def forward_twisted_events(logger: Any, clock: Any = None) -> Any:
    """
    Send C{twisted.logger} events to mproxy's JSON log (see
    L{mproxy.logging.TwistedEvents}); nothing else begins Twisted's logging
    under C{mproxy run}, so without this those events were dropped.  Returns
    the observer.
    """
    from twisted.logger import globalLogPublisher

    from mproxy.logging import TwistedEvents

    if clock is None:
        from twisted.internet import reactor as clock
    observer = TwistedEvents(logger, clock)
    globalLogPublisher.addObserver(observer)
    return observer
