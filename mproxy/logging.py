"""
JSON log lines on stdout, one object per line:
C{{"time": ..., "level": ..., "msg": ..., <attributes>}}.

A L{JSONLogger} is injected wherever something logs; tests use a logger that
writes to a list.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Callable

LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40}


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat()


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

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self._min

    def log(self, level: str, msg: str, **attrs: Any) -> None:
        if LEVELS[level] < self._min:
            return
        record = {"time": self._now(), "level": level, "msg": msg}
        record.update(attrs)
        line = json.dumps(record, default=str, ensure_ascii=False)
        try:
            self._stream.write(line + "\n")
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

    def messages(self) -> list[str]:
        return [r["msg"] for r in self.records]
