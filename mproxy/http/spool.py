# -*- test-case-name: tests.test_proxy -*-
"""
Bounded buffering of request and response bodies.

L{Spool} keeps up to C{memory} bytes in memory and spills the rest to an
anonymous temporary file (already unlinked, so it disappears with the
process even after a crash); L{Spool.close} releases it.  L{SpoolSender}
replays a spool into a consumer function with push-producer backpressure.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any, Callable

CHUNK = 65536


class Spool:
    """
    @ivar size: bytes written so far.
    @ivar spilled: whether part of it is on disk.
    """

    def __init__(self, memory: int, limit: int = 0, logger: Any = None) -> None:
        self.memory = memory
        self.limit = limit
        self.logger = logger
        self.size = 0
        self._mem: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._read_pos = 0
        self._mem_index = 0
        self.closed = False

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> bool:
        """
        Add C{data}; C{False} (and nothing kept) when the limit is exceeded.
        """
        if self.limit and self.size + len(data) > self.limit:
            return False
        if self._file is None and self.size + len(data) > self.memory:
            if self.logger is not None:
                self.logger.debug("Buffer: spilling to disk", size=self.size + len(data))
            self._file = tempfile.TemporaryFile(prefix="mproxy-")
        if self._file is not None:
            self._file.write(data)
        else:
            self._mem.append(data)
        self.size += len(data)
        return True

    def read(self, n: int = CHUNK) -> bytes:
        """
        The next piece of what was written (memory part first), b"" at the
        end.
        """
        mem = self._mem
        if self._mem_index < len(mem):
            piece = mem[self._mem_index]
            self._mem_index += 1
            return piece
        f = self._file
        if f is None:
            return b""
        f.seek(self._read_pos)
        data = f.read(n)
        self._read_pos += len(data)
        return data

    def rewind(self) -> None:
        """
        Read from the start again (a request sent again).
        """
        self._read_pos = 0
        self._mem_index = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._mem = []
        f, self._file = self._file, None
        if f is not None:
            if self.logger is not None:
                self.logger.debug("Buffer: removing spill")
            f.close()


class SpoolSender:
    """
    Feed a spool to C{write} as fast as the consumer takes it; an
    IPushProducer for whoever applies backpressure.  C{done} is called
    once everything was written.
    """

    def __init__(self, spool: Spool, write: Callable[[bytes], None],
                 done: Callable[[], None]) -> None:
        self.spool = spool
        self._write = write
        self._done = done
        self.paused = False
        self.stopped = False
        self._running = False
        self.finished = False

    def start(self) -> None:
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._running or self.stopped or self.finished:
            return
        self._running = True
        try:
            while not self.paused and not self.stopped:
                data = self.spool.read()
                if not data:
                    self.finished = True
                    self._done()
                    return
                self._write(data)
        finally:
            self._running = False

    def stopProducing(self) -> None:
        self.stopped = True
