"""
JSON log lines, one object per line:
C{{"time": ..., "level": ..., "msg": ..., <attributes>}}, on stdout (or, under
a daemonized twistd, in twistd's log file).

A L{JSONLogger} is injected wherever something logs; tests use a logger that
writes to a list.  L{TwistedEvents} turns the C{twisted.logger} events worth
a line (from the certificate service, warnings and errors from anywhere,
running out of file descriptors) into JSON lines too.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from typing import IO, Any, Callable

from zope.interface import implementer
from twisted.logger import ILogObserver, formatEvent

LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40}


# (second, "YYYY-MM-DDTHH:MM:SS", "+HH:MM") of the last time formatted: the
# local time of a whole second is worked out once per second, not per line
_second: list[Any] = [None, "", ""]


def _now_rfc3339() -> str:
    """
    The local time with its UTC offset, as C{datetime.isoformat} writes it
    (microseconds only when not zero).
    """
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached = _second
    if cached[0] != second:
        whole = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).astimezone()
        text = whole.isoformat()
        cached[:] = [second, text[:19], text[19:]]
    us = ns // 1000
    if us:
        return "%s.%06d%s" % (cached[1], us, cached[2])
    return cached[1] + cached[2]


def _make_dumps() -> Callable[[dict[str, Any]], str]:
    """
    C{json.dumps(record, default=str, ensure_ascii=False)}, with the
    encoder built once instead of per line.
    """
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:
        return json.JSONEncoder(default=str, ensure_ascii=False).encode
    encode = make(None, str, json.encoder.encode_basestring, None, ": ", ", ",
                  False, False, True)
    join = "".join

    def dumps(record: dict[str, Any]) -> str:
        return join(encode(record, 0))

    return dumps


_dumps = _make_dumps()

_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(line: str) -> str:
    """
    C{line} (JSON text) with each lone surrogate written as its C{\\uXXXX}
    escape: valid UTF-8, and the same value once decoded.
    """
    return _SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), line)


#: a string as L{_dumps} writes it (quoted, escaped, non-ASCII kept)
encode_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


class JSONLogger:
    def __init__(
        self,
        stream: IO[str] | None = None,
        level: str = "INFO",
        now: Callable[[], str] = _now_rfc3339,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._min = LEVELS[level]
        self._now = now
        #: the stream's way to take a line made when it is written, if any
        self._write_later = getattr(self._stream, "write_later", None)

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self._min

    def log(self, level: str, msg: str, **attrs: Any) -> None:
        if LEVELS[level] < self._min:
            return
        record = {"time": self._now(), "level": level, "msg": msg}
        record.update(attrs)
        self._write(_dumps(record) + "\n")

    def log_encoded(self, level: str, msg: str, fields: str) -> None:
        """
        L{log} for attributes the caller encoded itself (a record with
        known keys, written often: no dict, no encoder run).  C{fields} is
        the line's text after C{msg}: each attribute as C{, "key": value},
        keys and values encoded as L{log} would (L{encode_string} for
        strings, C{%d} for integers).
        """
        if LEVELS[level] < self._min:
            return
        line = '{"time": %s, "level": %s, "msg": %s%s}\n' % (
            encode_string(self._now()), encode_string(level), encode_string(msg), fields)
        self._write(line)

    def log_encoded_later(self, level: str, msg: str, fields: Callable[[], str]) -> None:
        """
        L{log_encoded} with C{fields()} called when the line is written,
        for a stream that writes a reactor turn's lines when the turn ends
        (C{write_later}): a request's line is then built after what the
        turn sent, in its place among the other lines, with the time of
        this call.  Other streams get the line now.
        """
        if LEVELS[level] < self._min:
            return
        later = self._write_later
        if later is None:
            self.log_encoded(level, msg, fields())
            return
        now = self._now()

        def line() -> bytes:
            text = '{"time": %s, "level": %s, "msg": %s%s}\n' % (
                encode_string(now), encode_string(level), encode_string(msg), fields())
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError:
                # (as L{_write} does)
                return escape_surrogates(text).encode("utf-8")

        later(line)

    def _write(self, line: str) -> None:
        try:
            try:
                self._stream.write(line)
            except UnicodeEncodeError:
                # A lone surrogate (a path's undecodable %-escape, decoded
                # with surrogateescape) has no UTF-8: it is written as its
                # JSON escape, which decodes back to the same string.
                self._stream.write(escape_surrogates(line))
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def debug(self, msg: str, **attrs: Any) -> None:
        self.log("DEBUG", msg, **attrs)

    def info(self, msg: str, **attrs: Any) -> None:
        self.log("INFO", msg, **attrs)

    def warn(self, msg: str, **attrs: Any) -> None:
        self.log("WARN", msg, **attrs)

    def error(self, msg: str, **attrs: Any) -> None:
        self.log("ERROR", msg, **attrs)


class ListLogger(JSONLogger):
    """
    A logger for tests: records are kept as dicts in C{self.records}.
    """

    def __init__(self, level: str = "DEBUG") -> None:
        self.records: list[dict[str, Any]] = []
        self._min = LEVELS[level]

    def log(self, level: str, msg: str, **attrs: Any) -> None:
        if LEVELS[level] < self._min:
            return
        self.records.append(dict(level=level, msg=msg, **attrs))

    def log_encoded(self, level: str, msg: str, fields: str) -> None:
        """
        Kept as the record it encodes (C{fields} must be valid JSON text).
        """
        self.log(level, msg, **json.loads("{" + fields[2:] + "}"))

    def log_encoded_later(self, level: str, msg: str, fields: Callable[[], str]) -> None:
        """
        Kept at once, as L{log_encoded} keeps it.
        """
        self.log_encoded(level, msg, fields())

    def messages(self) -> list[str]:
        return [r["msg"] for r in self.records]


_TWISTED_LEVELS = {
    "debug": "DEBUG", "info": "INFO", "warn": "WARN", "error": "ERROR", "critical": "ERROR",
}
_EVENT_KEYS = frozenset(
    ("format", "message", "time", "system", "isError", "printed", "why", "failure", "msg", "level")
)
#: What Twisted's listening ports log when accept() finds the process (or the
#: system) out of file descriptors or memory: with the reserve descriptor,
#: each refused client is closed and logged; without it, the accept error.
_ACCEPT_CLOSED = "EMFILE recovery: Closed socket from {address}"
_ACCEPT_FAILED = "Could not accept new connection ({acceptError})"
_EXHAUSTION = frozenset(("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"))
#: At most one "Out of file descriptors" line per this many seconds.
EXHAUSTION_REPORT_INTERVAL = 10.0


@implementer(ILogObserver)
class TwistedEvents:
    """
    A C{twisted.logger} observer writing to a L{JSONLogger}: every event from
    the C{mproxy.tls} modules (the certificate service logs that way) and
    warnings and errors from anywhere (unhandled errors in Deferreds); not
    Twisted's informational chatter, even from mproxy's subclasses of its
    classes ("Starting factory ...", whose namespace is the subclass's).

    The message is the formatted event; its own keys become attributes, and
    a failure adds C{error} and C{traceback}.

    Connections refused for lack of file descriptors are reported as one
    C{WARN} line at once and then at most one per
    L{EXHAUSTION_REPORT_INTERVAL} seconds on C{clock}, counting the refusals
    in between, so a server at its descriptor limit does not also flood its
    log.
    """

    def __init__(self, logger: JSONLogger, clock: Any) -> None:
        self.logger = logger
        self.clock = clock
        self._suppressed = 0
        self._window: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format")
        if fmt == _ACCEPT_CLOSED or (
            fmt == _ACCEPT_FAILED and event.get("acceptError") in _EXHAUSTION
        ):
            self._exhausted(str(event.get("acceptError", "EMFILE")))
            return
        level = _TWISTED_LEVELS.get(getattr(event.get("log_level"), "name", ""), "INFO")
        namespace = event.get("log_namespace") or ""
        if level in ("DEBUG", "INFO") and not namespace.startswith("mproxy.tls"):
            return
        if not self.logger.enabled(level):
            return
        attrs = {
            k: v for k, v in event.items() if not k.startswith("log_") and k not in _EVENT_KEYS
        }
        failure = event.get("log_failure")
        if failure is not None:
            attrs["error"] = failure.getErrorMessage()
            attrs["traceback"] = failure.getTraceback()
        self.logger.log(level, formatEvent(event), **attrs)

    def _exhausted(self, error: str) -> None:
        if self._window is not None:
            self._suppressed += 1
            return
        self.logger.warn(
            "Out of file descriptors: refusing new connections",
            error=error,
            hint="raise the open files limit (ulimit -n, LimitNOFILE=)",
        )
        self._window = self.clock.callLater(EXHAUSTION_REPORT_INTERVAL, self._window_ended)

    def _window_ended(self) -> None:
        self._window = None
        if self._suppressed:
            count, self._suppressed = self._suppressed, 0
            self.logger.warn(
                "Out of file descriptors: refusing new connections",
                refused=count,
                seconds=EXHAUSTION_REPORT_INTERVAL,
            )
            self._window = self.clock.callLater(
                EXHAUSTION_REPORT_INTERVAL, self._window_ended
            )
