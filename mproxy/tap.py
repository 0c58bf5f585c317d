"""
The C{twistd mproxy} plugin's module: its options (the same table as
C{mproxy run}) and L{makeService}, which builds the service tree of
L{mproxy.tree} with JSON log lines going where twistd logs: stdout with
C{-n}, else twistd's log file.  A start-up failure raises out of twistd, so it
exits non-zero; it is printed as C{Error: ...}, not as a traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Mapping

from twisted.python import usage

from mproxy.config import SERVER_OPTIONS, resolve_config
from mproxy.errors import MproxyError
from mproxy.listeners import StartupError
from mproxy.logging import JSONLogger, TwistedEvents
from mproxy.tree import MproxyService, build_service
from mproxy.upgrade import relaunch_for_twistd

__all__ = ["Options", "makeService", "twistd_log_stream", "MproxyService", "build_service"]


class Options(usage.Options):
    """
    C{twistd mproxy} options: the same table as C{mproxy run}.
    """

    optParameters = [
        [spec.name, None, None, f"{spec.help} [env MPROXY_{spec.env} or {spec.env}]"]
        for spec in SERVER_OPTIONS
        if not spec.flag
    ]
    optFlags = [[spec.name, None, spec.help] for spec in SERVER_OPTIONS if spec.flag]

    def postOptions(self) -> None:
        explicit: dict[str, Any] = {}
        for spec in SERVER_OPTIONS:
            key = spec.name
            value = self.get(key)
            if spec.flag:
                if value:
                    explicit[spec.attr] = True
            elif value is not None:
                try:
                    explicit[spec.attr] = spec.parse(value)
                except ValueError as e:
                    raise usage.UsageError(f"--{spec.name}: {e}")
        try:
            self.config = resolve_config(explicit)
        except MproxyError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> MproxyService:
    """
    The service tree for C{twistd mproxy}, logging JSON lines where twistd
    would have logged (L{twistd_log_stream}); twistd's own events go through
    the same logger (as JSON lines, or dropped as chatter).
    """
    from twisted.internet import reactor

    twistd_options: Mapping[str, Any] = getattr(options, "parent", None) or {}
    report_errors_plainly()
    if twistd_options.get("syslog"):
        raise StartupError(
            "twistd --syslog is not supported: mproxy logs JSON lines, on stdout with -n "
            "or in --logfile"
        )
    try:
        stream = twistd_log_stream(twistd_options)
    except OSError as e:
        raise StartupError(f"cannot open the log file {e.filename}: {e.strerror or e}")
    logger = JSONLogger(stream, level="DEBUG" if options.config.debug else "INFO")
    service = build_service(reactor, options.config, logger)
    service.log_observer = TwistedEvents(logger, reactor)
    service.upgrades.relaunch = relaunch_for_twistd(twistd_options)
    return service


def twistd_log_stream(twistd_options: Mapping[str, Any]) -> Any:
    """
    Where twistd itself would log: stdout with C{-n} (or C{--logfile -}),
    else the file C{--logfile} (default C{twistd.log}), rotated as twistd
    rotates it (every megabyte, and on SIGUSR1).  A daemon's stdout is
    /dev/null, so JSON lines written there would be lost.
    """
    from twisted.python.logfile import LogFile

    path = twistd_options.get("logfile") or ""
    if path == "-" or (not path and twistd_options.get("nodaemon")):
        return sys.stdout
    log_file = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def report_errors_plainly() -> None:
    """
    A start-up failure under twistd propagates out of twistd, which exits 1
    (a daemon's waiting parent prints it too): show an expected one as
    C{Error: ...} on the real stderr instead of a traceback.
    """
    previous = sys.excepthook

    def hook(kind: Any, value: Any, tb: Any) -> None:
        stream = sys.__stderr__
        if isinstance(value, MproxyError) and stream is not None:
            stream.write(f"Error: {value}\n")
            stream.flush()
            return
        previous(kind, value, tb)

    sys.excepthook = hook
