# -*- test-case-name: tests.test_splice -*-
"""
The rest of a Content-Length response body relayed from the target's
socket to the client's with splice(2), through a pipe: the bytes go from
one socket to the other inside the kernel, never copied into Python
objects (and never copied at all between loopback sockets).

    splicer = splicer_for(reactor)          # None where splice is missing
    relay = splicer.start(source, sink, left, handler)   # or None
    relay.stop()                            # abandoned: pipe freed

C{source} and C{sink} are Twisted TCP transports (plain, with a real
socket).  While a relay runs it is the source's C{doRead}: a readable
target socket fills the (empty) pipe with what it holds, up to the pipe's
size and the body's rest, and the pipe is emptied into the client's socket
at once.  What the client's socket does not take waits in the pipe: the
relay becomes the sink's C{doWrite} until the socket takes it, and the
C{handler} hears C{stalled()} / C{flowing()} so that reading from the
target pauses meanwhile (the proxy's usual backpressure: the exchange is
the client's producer).  The handler (L{ISpliceHandler}) also hears the
bytes that reached the client (C{sent}), the end (C{ended}: the whole rest
went to the client's socket) and failures: the target's socket closing or
failing before the end (C{source_failed}) or the client's
(C{sink_failed}).  Every end gives the transports their own C{doRead} /
C{doWrite} back and the pipe back to the pool (an empty one) or closes it.

The system calls are behind L{ISpliceCalls} (L{OSSpliceCalls} on Linux),
so tests drive EAGAIN, partial splices, end of file and errors
synchronously.
"""

from __future__ import annotations

import errno
import os
import sys
import weakref
from typing import Any

from zope.interface import Interface, implementer

#: the smallest rest of a body worth a relay (its set-up costs a few calls)
SPLICE_MIN = 65536
#: the pipe size asked for (capped by the system's pipe-max-size); with a
#: fast target, smaller pipes measured slower per byte for 1 MiB bodies (half
#: of them 256 KiB: x1.15 CPU), and 64 KiB ones slower than the ordinary path
PIPE_SIZE = 1 << 20
#: pipes smaller than this (a user over its pipe quota gets tiny ones) are
#: not used: the body takes the ordinary path
PIPE_MIN = 65536
#: empty pipes kept for the next relays
MAX_IDLE_PIPES = 64
#: the most pipe capacity one process holds, in use and idle together
#: (capped lower by the user's pipe quota: see L{pipe_budget})
MAX_PIPE_BYTES = 16 << 20
#: the share of the user's pipe quota one process may hold
QUOTA_SHARE = 4

_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


class ISpliceCalls(Interface):
    """
    The system calls a relay makes.
    """

    def splice(src, dst, count):
        """
        Move up to C{count} bytes from fd C{src} to fd C{dst} without
        blocking; the number moved (0: C{src} is at its end).  Raises
        C{BlockingIOError} when nothing can move now, C{OSError} on errors.
        """

    def pipe(size):
        """
        A new pipe C{(read_fd, write_fd, size)}, of C{size} bytes if the
        system allows it (its real size is returned).
        """

    def close(fd):
        """
        Close C{fd}.
        """


@implementer(ISpliceCalls)
class OSSpliceCalls:
    """
    L{ISpliceCalls} with C{os.splice} and C{os.pipe2}.
    """

    _flags = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

    def splice(self, src: int, dst: int, count: int) -> int:
        return os.splice(src, dst, count, flags=self._flags)

    def pipe(self, size: int) -> tuple[int, int, int]:
        import fcntl

        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except OSError:
            # over the user's pipe quota, or a smaller maximum
            size = fcntl.fcntl(w, _F_GETPIPE_SZ)
        return r, w, size

    def close(self, fd: int) -> None:
        os.close(fd)


class ISpliceHandler(Interface):
    """
    Hears one relay (see the module docstring).
    """

    def sent(n):
        """
        C{n} more body bytes went to the client's socket.
        """

    def stalled():
        """
        The client's socket is full: stop reading from the target.
        """

    def flowing():
        """
        The client's socket took what waited: read from the target again.
        """

    def ended():
        """
        The whole rest of the body went to the client's socket.
        """

    def source_failed(message):
        """
        The target's socket closed or failed before the end.
        """

    def sink_failed(message):
        """
        The client's socket failed (the client went away).
        """


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _max_pipe_size() -> int:
    size = _read_int("/proc/sys/fs/pipe-max-size")
    return PIPE_SIZE if size is None else size


def pipe_budget(soft_pages: int | None = None, page_size: int | None = None) -> int:
    """
    The pipe capacity one process may hold: L{MAX_PIPE_BYTES}, or a quarter
    of the user's pipe quota (C{fs.pipe-user-pages-soft}, 64 MiB by
    default) when that is less.  Every pipe of a user counts against that
    quota, and once it is used up each new pipe of that user (the proxy's
    other workers', any other program's) gets two pages and cannot be
    made bigger: a pool of large pipes must leave most of it to others.
    """
    if soft_pages is None:
        soft_pages = _read_int("/proc/sys/fs/pipe-user-pages-soft")
    if page_size is None:
        page_size = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
    if not soft_pages:
        # no quota (0), or none to read
        return MAX_PIPE_BYTES
    return min(MAX_PIPE_BYTES, soft_pages * page_size // QUOTA_SHARE)


class Splicer:
    """
    The relays of one reactor and their pool of empty pipes.

    @ivar pipe_size: the size asked for new pipes.
    @ivar max_bytes: the most capacity the pipes held (in use and idle)
        may add up to; past it a body takes the ordinary path.
    @ivar held: the capacity of the pipes held now.
    """

    def __init__(self, calls: Any = None, pipe_size: int | None = None,
                 max_idle: int = MAX_IDLE_PIPES, max_bytes: int | None = None) -> None:
        self.calls = calls if calls is not None else OSSpliceCalls()
        if pipe_size is None:
            pipe_size = min(PIPE_SIZE, _max_pipe_size())
        self.pipe_size = pipe_size
        self.max_idle = max_idle
        self.max_bytes = pipe_budget() if max_bytes is None else max_bytes
        self.held = 0
        self._idle: list[tuple[int, int, int]] = []
        #: a pipe too small was made once: the quota is used up, later
        #: relays are not tried until a pipe is given back
        self._short = False

    def start(self, source: Any, sink: Any, left: int, handler: Any) -> SpliceRelay | None:
        """
        Relay the next C{left} bytes from C{source} to C{sink} (see the
        module docstring); C{None} (nothing changed) when no pipe of a
        useful size can be had.
        """
        pipe = self._take()
        if pipe is None:
            return None
        return SpliceRelay(self, pipe, source, sink, left, handler)

    def _take(self) -> tuple[int, int, int] | None:
        if self._idle:
            return self._idle.pop()
        if self._short or self.held + self.pipe_size > self.max_bytes:
            return None
        try:
            pipe = self.calls.pipe(self.pipe_size)
        except OSError:
            return None
        self.held += pipe[2]
        if pipe[2] < PIPE_MIN:
            self._short = True
            self._close(pipe)
            return None
        return pipe

    def _give(self, pipe: tuple[int, int, int]) -> None:
        """
        An empty pipe back: kept for the next relay, or closed.
        """
        self._short = False
        if len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            self._close(pipe)

    def _close(self, pipe: tuple[int, int, int]) -> None:
        self.held -= pipe[2]
        for fd in pipe[:2]:
            try:
                self.calls.close(fd)
            except OSError:
                pass

    @property
    def idle_pipes(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """
        Close the idle pipes.
        """
        idle, self._idle = self._idle, []
        for pipe in idle:
            self._close(pipe)


class SpliceRelay:
    """
    One body's rest on its way: see the module docstring.

    @ivar left: bytes still to read from the target.
    @ivar in_pipe: bytes read that the client's socket has not taken yet.
    @ivar closed: the relay ended (or was stopped).
    """

    def __init__(self, splicer: Splicer, pipe: tuple[int, int, int], source: Any, sink: Any,
                 left: int, handler: Any) -> None:
        self.splicer = splicer
        self._calls = splicer.calls
        self._pipe: tuple[int, int, int] | None = pipe
        self._pipe_r, self._pipe_w, self._pipe_size = pipe
        self.source = source
        self.sink = sink
        self._src = source.socket.fileno()
        self._dst = sink.socket.fileno()
        self.left = left
        self.in_pipe = 0
        self.handler = handler
        self.closed = False
        #: the relay is the sink's doWrite (its socket was full)
        self._waiting = False
        #: the relay stopped the source's reading itself
        self._source_stopped = False
        source.doRead = self._readable

    # --- the source's doRead, the sink's doWrite

    def _readable(self) -> None:
        if self.closed:
            return None
        if self.in_pipe:
            # (the handler pauses reading while the pipe holds bytes; a
            # readable socket must not be left to wake the reactor again)
            self._source_stopped = True
            self.source.stopReading()
            return None
        try:
            n = self._calls.splice(self._src, self._pipe_w, min(self.left, self._pipe_size))
        except BlockingIOError:
            return None
        except OSError as e:
            self._fail(True, "target connection failed mid-response: "
                       + (e.strerror or errno.errorcode.get(e.errno or 0, str(e))))
            return None
        if not n:
            self._fail(True, "target closed the connection mid-response")
            return None
        self.left -= n
        self.in_pipe = n
        self._drain()
        return None

    def _writable(self) -> None:
        if not self.closed:
            self._drain()
        return None

    def _drain(self) -> None:
        try:
            n = self._calls.splice(self._pipe_r, self._dst, self.in_pipe)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._fail(False, "client connection failed: "
                       + (e.strerror or errno.errorcode.get(e.errno or 0, str(e))))
            return
        handler = self.handler
        if n:
            self.in_pipe -= n
            handler.sent(n)
            if self.closed:
                return
        if self.in_pipe:
            # the rest waits for the client's socket to take it
            if not self._waiting:
                self._waiting = True
                sink = self.sink
                sink.doWrite = self._writable
                sink.startWriting()
                handler.stalled()
            return
        if self._waiting:
            self._unwait()
            if not self.left:
                self._end()
                return
            if self._source_stopped:
                self._source_stopped = False
                self.source.startReading()
            handler.flowing()
            return
        if not self.left:
            self._end()

    # --- ends

    def _unwait(self) -> None:
        self._waiting = False
        sink = self.sink
        if sink.__dict__.get("doWrite") == self._writable:
            del sink.doWrite
            sink.stopWriting()
            if sink._tempDataLen or sink.dataBuffer or sink.disconnecting:
                # (written to meanwhile: Twisted's own writing goes on)
                sink.startWriting()

    def _release(self, reuse: bool) -> None:
        self.closed = True
        source = self.source
        if source.__dict__.get("doRead") == self._readable:
            del source.doRead
        if self._waiting:
            self._unwait()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            if reuse and not self.in_pipe:
                self.splicer._give(pipe)
            else:
                self.splicer._close(pipe)

    def _end(self) -> None:
        self._release(True)
        self.handler.ended()

    def _fail(self, source: bool, message: str) -> None:
        self._release(False)
        if source:
            self.handler.source_failed(message)
        else:
            self.handler.sink_failed(message)

    def stop(self) -> None:
        """
        Abandon the relay (its exchange ended otherwise): the transports
        get their own reading and writing back, the pipe is closed (it may
        hold bytes).  The handler hears nothing more.
        """
        if not self.closed:
            self._release(False)


_splicers: weakref.WeakKeyDictionary[Any, Splicer] = weakref.WeakKeyDictionary()


def available() -> bool:
    """
    splice(2) can be used here (Linux, Python with C{os.splice}).
    """
    return sys.platform.startswith("linux") and hasattr(os, "splice")


def splicer_for(reactor: Any) -> Splicer | None:
    """
    The reactor's L{Splicer} (one per reactor: one pipe pool per worker),
    or C{None} where splice(2) is not available.
    """
    if not available():
        return None
    s = _splicers.get(reactor)
    if s is None:
        s = _splicers[reactor] = Splicer()
    return s


__all__ = ["Splicer", "SpliceRelay", "ISpliceCalls", "ISpliceHandler", "OSSpliceCalls",
           "splicer_for", "available", "pipe_budget", "SPLICE_MIN", "PIPE_SIZE",
           "MAX_PIPE_BYTES"]
