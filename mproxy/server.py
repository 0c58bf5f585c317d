"""
C{mproxy run}: the service tree of L{mproxy.tap} in the foreground, on the
global reactor, exiting 0 after a graceful stop on SIGTERM/SIGINT and 1 with
C{Error: ...} when it cannot start.
"""

from __future__ import annotations

from typing import Any

from mproxy.config import SERVER_OPTIONS, resolve_config
from mproxy.errors import MproxyError


def run_server(ns: Any, streams: Any) -> int:
    from mproxy.cli.streams import fail

    explicit = {spec.attr: getattr(ns, spec.attr, None) for spec in SERVER_OPTIONS}
    try:
        config = resolve_config(explicit)
    except MproxyError as e:
        return fail(streams, str(e))

    from twisted.internet import reactor

    from mproxy.tap import build_service

    service = build_service(reactor, config)
    forward_twisted_events(service.logger)
    status = {"code": 0}

    def failed(f: Any) -> None:
        msg = str(f.value) if f.check(MproxyError) else f"{f.type.__name__}: {f.getErrorMessage()}"
        status["code"] = fail(streams, msg)
        if reactor.running:
            reactor.stop()

    def start() -> None:
        service.ready.addErrback(failed)
        try:
            service.startService()
        except MproxyError as e:
            status["code"] = fail(streams, str(e))
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: service.stopService() if service.running else None)
    reactor.run()
    return status["code"]


_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARN", "error": "ERROR", "critical": "ERROR"}
_EVENT_KEYS = frozenset(
    ("format", "message", "time", "system", "isError", "printed", "why", "failure", "msg", "level")
)


def forward_twisted_events(logger: Any) -> Any:
    """
    Send C{twisted.logger} events to mproxy's JSON log: every event from the
    C{mproxy.tls} modules (the certificate service logs that way: orders,
    failures, renewals, on-demand decisions) and warnings and errors from
    anywhere (unhandled errors in Deferreds).  Not Twisted's informational
    chatter, even from mproxy's subclasses of its classes ("Starting factory
    ...", whose namespace is the subclass's).  Nothing else begins Twisted's
    logging under C{mproxy run}, so without this those events were dropped.

    The message is the formatted event; its own keys become attributes, and
    a failure adds C{error} and C{traceback}.  Returns the observer.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    def observe(event: dict[str, Any]) -> None:
        level = _LEVELS.get(getattr(event.get("log_level"), "name", ""), "INFO")
        namespace = event.get("log_namespace") or ""
        if level in ("DEBUG", "INFO") and not namespace.startswith("mproxy.tls"):
            return
        if not logger.enabled(level):
            return
        attrs = {
            k: v for k, v in event.items() if not k.startswith("log_") and k not in _EVENT_KEYS
        }
        failure = event.get("log_failure")
        if failure is not None:
            attrs["error"] = failure.getErrorMessage()
            attrs["traceback"] = failure.getTraceback()
        logger.log(level, formatEvent(event), **attrs)

    globalLogPublisher.addObserver(observe)
    return observe
