"""
The stop signals (SIGTERM, SIGINT) while the server runs: the first one stops
the reactor as Twisted's own handler does (so twistd still ends a signalled
stop by re-raising that signal); any later one, or one arriving after the
shutdown began some other way, is logged and otherwise ignored.  Twisted's
handler would call C{reactor.stop} again, which fails with "Can't stop
reactor that isn't running" and logs it as an error.
"""

from __future__ import annotations

import signal as _signal
from typing import Any, Callable

#: The signals that stop the server, with the reactor method that handles
#: each the first time.
STOP_SIGNALS = {_signal.SIGTERM: "sigTerm", _signal.SIGINT: "sigInt"}


class StopSignals:
    """
    Handlers for the stop signals on C{reactor}, logging to C{logger}.

    @ivar stopping: the shutdown has begun (a stop signal arrived, or the
        reactor's "before shutdown" triggers ran).
    """

    def __init__(self, reactor: Any, logger: Any) -> None:
        self.reactor = reactor
        self.logger = logger
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def _shutting_down(self) -> None:
        self.stopping = True

    def handle(self, number: int, frame: Any = None) -> None:
        """
        A signal handler (called between bytecodes of the reactor thread).
        """
        if not self.stopping:
            self.stopping = True
            getattr(self.reactor, STOP_SIGNALS[number])(number, frame)
            return
        self.reactor.callFromThread(
            self.logger.info, "Already shutting down", signal=_signal.Signals(number).name
        )


def install_stop_signals(
    reactor: Any,
    logger: Any,
    install: Callable[[int, Any], Any] = _signal.signal,
    current: Callable[[int], Any] = _signal.getsignal,
) -> StopSignals | None:
    """
    Replace the reactor's handlers of the stop signals by L{StopSignals}';
    call once the reactor runs (it installs its own as it starts).  A signal
    whose handler is not the reactor's (a debugger's SIGINT, or none because
    the reactor runs without signal handlers) is left alone.  Returns the
    handlers, or C{None} when none was replaced.
    """
    ours = [
        number
        for number, method in STOP_SIGNALS.items()
        if _is_method(current(number), reactor, method)
    ]
    if not ours:
        return None
    handlers = StopSignals(reactor, logger)
    for number in ours:
        install(number, handlers.handle)
    return handlers


def _is_method(handler: Any, reactor: Any, method: str) -> bool:
    function = getattr(type(reactor), method, None)
    return (
        function is not None
        and getattr(handler, "__func__", None) is function
        and getattr(handler, "__self__", None) is reactor
    )


def install_upgrade_signal(
    reactor: Any,
    upgrades: Any,
    logger: Any,
    install: Callable[[int, Any], Any] = _signal.signal,
) -> Callable[[], None] | None:
    """
    SIGUSR2 upgrades the server, as C{mproxy upgrade} does (with the
    default drain timeout), for C{systemctl reload} and C{docker kill -s
    USR2}; its progress and outcome are logged.  Returns a function that
    puts the previous handler back, or C{None} where there is no SIGUSR2.
    """
    number = getattr(_signal, "SIGUSR2", None)
    if number is None:
        return None

    def start() -> None:
        import uuid

        from mproxy.upgrade import DEFAULT_DRAIN_TIMEOUT

        d = upgrades.upgrade(f"signal-{uuid.uuid4().hex[:12]}", DEFAULT_DRAIN_TIMEOUT)
        # a failure is logged by the upgrade itself
        d.addErrback(lambda f: logger.warn("Upgrade on SIGUSR2 refused",
                                           error=f.getErrorMessage()))

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(start)

    previous = install(number, handler)

    def uninstall() -> None:
        install(number, previous if previous is not None else _signal.SIG_DFL)

    return uninstall
