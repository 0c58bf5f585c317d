# -*- test-case-name: tests.test_worker_reactor -*-
"""
The worker's reactor: Twisted's epoll reactor, with a cheaper dispatch of
I/O events and work to do at the end of each reactor turn.

Twisted's epoll reactor wraps every read or write event in
C{log.callWithLogger}, which asks the selectable for its log prefix and
runs the handler inside a new log context (a dict and two more Python
calls through the context tracker): for a proxy that handles a few small
reads per request, a large share of its per-event cost.  Nothing of
mproxy's logging reads that context, so L{WorkerReactor} calls the
handler directly.  Errors are handled as before: an exception raised by a
selectable's C{doRead} or C{doWrite} is logged and the selectable is
disconnected (Twisted's C{_doReadOrWrite}); one raised while
disconnecting it is logged too.

L{WorkerReactor.call_at_turn_end} runs a callable once, after the reactor
has dispatched the I/O events or the timed calls it is handling now (and
before it waits for the next events): what a turn's handlers wrote can be
sent, or a turn's log lines written, together, without a C{callLater(0)}
(a timed call, its heap entry, and a zero timeout for the next poll).

Between two polls Twisted's main loop runs C{runUntilCurrent} and
C{timeout} (each reads the clock and looks for new timed calls) inside a
context manager that logs what they raise.  At a moderate request rate
every request has turns to itself, so that is paid for each of them:
L{WorkerReactor.mainLoop} reads the clock once, and when no timed call is
due, none was added, no call came from another thread or waits for the
turn's end and the reactor is not stopping (the common turn), it only
works out how long the poll may wait; otherwise it runs Twisted's C{runUntilCurrent} and C{timeout} as
they are.  An exception is logged as Twisted's loop logs it, and the loop
goes on.

    reactor = install()   # in the worker, before anything imports the reactor
    reactor.call_at_turn_end(flush)
"""

from __future__ import annotations

import errno
import sys
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.epollreactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger, LogLevel
from twisted.python import log

_DISCONNECTED = EPOLLHUP | EPOLLERR
#: the longest poll timeout (seconds) epoll takes (a C int of milliseconds),
#: as Twisted's C{timeout} bounds it
_LONGEST = 2147483

_log = Logger()

#: TCP connection types that read as Twisted's Connection.doRead does
#: (inlined in L{WorkerReactor.doPoll})
_TCP_READS = {
    t for t in (tcp.Server, tcp.Client)
    if t.doRead is tcp.Connection.doRead and t._dataReceived is tcp.Connection._dataReceived
}


class WorkerReactor(EPollReactor):
    """
    An epoll reactor dispatching events without a log context, with
    turn-end calls (L{call_at_turn_end}).
    """

    def __init__(self) -> None:
        self._turn_end: list[Callable[[], None]] = []
        super().__init__()

    def call_at_turn_end(self, f: Callable[[], None]) -> None:
        """
        Call C{f} once, when the events or timed calls this turn is
        handling have been handled (before the reactor next waits).
        """
        self._turn_end.append(f)

    def _end_turn(self) -> None:
        # a call may add another: it runs in this turn too
        while self._turn_end:
            calls, self._turn_end = self._turn_end, []
            for f in calls:
                try:
                    f()
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err()

    def runUntilCurrent(self) -> None:
        super().runUntilCurrent()
        if self._turn_end:
            self._end_turn()

    def timeout(self) -> float | None:
        if self._turn_end:
            return 0
        return super().timeout()

    def mainLoop(self) -> None:
        while self._started:
            try:
                self._turns()
            except BaseException:
                # as Twisted's main loop does: logged, and the loop goes on
                _log.failure("Unexpected error in main loop", level=LogLevel.critical)
        _log.info("Main loop terminated.")

    def _turns(self) -> None:
        """
        Poll and dispatch until the reactor stops (Twisted's loop: timed
        calls, the poll's timeout, the poll).
        """
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            if self._newTimedCalls:
                self._insertNewDelayedCalls()
            pending = self._pendingTimedCalls
            # until the first timed call (the clock read once)
            first = pending[0].time - seconds() if pending else None
            cancelled = self._cancellations
            if (self.threadCallQueue or self._justStopped or self._turn_end
                    or (first is not None and first <= 0)
                    or (cancelled > 50 and cancelled > len(pending) >> 1)):
                # something to run (or cancelled calls to drop): Twisted's way
                self.runUntilCurrent()
                t = self.timeout()
            elif first is None:
                t = None
            else:
                t = min(_LONGEST, first)
            poll(self.running and t)

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                why = None
                in_read = False
                if (event == EPOLLIN and type(selectable) in _TCP_READS
                        and "doRead" not in selectable.__dict__):
                    # a TCP connection with data (the common event):
                    # Twisted's Connection.doRead, inline (unless the
                    # connection has a doRead of its own: connecting,
                    # aborted)
                    in_read = True
                    try:
                        if selectable.fileno() == -1:
                            why = _NO_FILEDESC
                        else:
                            try:
                                data = selectable.socket.recv(selectable.bufferSize)
                            except OSError as se:
                                if se.args[0] != tcp.EWOULDBLOCK:
                                    why = CONNECTION_LOST
                            else:
                                if data:
                                    selectable.protocol.dataReceived(data)
                                else:
                                    why = CONNECTION_DONE
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.err()
                # the other events: Twisted's _doReadOrWrite, inline
                elif event & _DISCONNECTED and not event & EPOLLIN:
                    # disconnected, and no input left to read first
                    if fd in self._reads:
                        in_read = True
                        why = CONNECTION_DONE
                    else:
                        why = CONNECTION_LOST
                else:
                    try:
                        if selectable.fileno() == -1:
                            why = _NO_FILEDESC
                        else:
                            if event & EPOLLIN:
                                why = selectable.doRead()
                                in_read = True
                            if not why and event & EPOLLOUT:
                                why = selectable.doWrite()
                                in_read = False
                    except BaseException:
                        # an exception from the protocol: logged, and its
                        # connection closed
                        why = sys.exc_info()[1]
                        log.err()
                if why:
                    self._disconnectSelectable(selectable, why, in_read)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # raised while disconnecting (a connectionLost that
                # failed): logged, as Twisted's callWithLogger does
                log.err()
        if self._turn_end:
            self._end_turn()

    doIteration = doPoll


def install() -> Any:
    """
    Install a L{WorkerReactor} as the process's reactor (unless one is
    installed already) and return the process's reactor.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet.main import installReactor

        installReactor(WorkerReactor())
    from twisted.internet import reactor

    return reactor
