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
    from mproxy.cli.main import fail

    explicit = {spec.attr: getattr(ns, spec.attr, None) for spec in SERVER_OPTIONS}
    try:
        config = resolve_config(explicit)
    except MproxyError as e:
        return fail(streams, str(e))

    from twisted.internet import reactor

    from mproxy.tap import build_service

    service = build_service(reactor, config)
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
