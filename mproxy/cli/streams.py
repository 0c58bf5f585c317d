"""
Where a command's output goes, and how it reports an expected failure:
C{Error: <message>} on stderr and exit status 1.  Shared by the client
commands and by C{mproxy run} (L{mproxy.server}).
"""

from __future__ import annotations

from typing import IO


class Streams:
    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out = out
        self.err = err


def fail(streams: Streams, message: str) -> int:
    """
    Report C{message} as an error; returns the exit status, 1.
    """
    streams.err.write(f"Error: {message}\n")
    streams.err.flush()
    return 1
