# -*- test-case-name: tests.test_http_server -*-
"""
L{ConnectionControl}: how a L{mproxy.http.server.FastHTTPChannel} holds
reading back, times out and ends.

  - reading is paused for named reasons (a full body consumer, a queued
    body, a pending upgrade, an owed error) and resumes when none is left;
  - one timer (header, idle or body timeout), whose deadline moves with
    each request (see L{ConnectionControl.set_timer});
  - L{ConnectionControl.close} closes once what was written is sent;
    L{ConnectionControl.linger} half-closes after an early answer and
    discards what the client still sends for L{LINGER_TIMEOUT} seconds, so
    that its unread bytes do not make the kernel reset the connection
    before the client read the answer.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from zope.interface import alsoProvides

#: seconds unread request bytes are drained after an early response
LINGER_TIMEOUT = 2.0


class ConnectionControl:
    """
    See the module docstring (a mixin of the channel, which provides
    C{transport}, C{clock}, C{batcher} and C{_timed_out}).
    """

    transport: Any
    clock: Any
    batcher: Any
    _paused: set[str]
    _closing: bool
    _stopped: bool
    _timer: Any
    _timed_out: Callable[[], None]
    _linger_call: Any = None
    #: when the connection times out, and when its DelayedCall fires
    #: (never later than that)
    _deadline = 0.0
    _timer_at = 0.0

    def set_timer(self, delay: float) -> None:
        """
        Time out (C{_timed_out}) C{delay} seconds from now instead of when
        the timer was last set; 0 stops it.  It is set several times per
        request (header, body, idle timeouts), so this only moves the
        deadline: the one DelayedCall is moved only when the deadline comes
        before it, and when it fires before the deadline it is set again
        for the rest.
        """
        t = self._timer
        if not delay:
            if t is not None:
                self._timer = None
                t.cancel()
            return
        deadline = self._deadline = self.clock.seconds() + delay
        if t is None:
            self._timer = self.clock.callLater(delay, self._timer_fired)
            self._timer_at = deadline
        elif self._timer_at > deadline:
            t.reset(delay)
            self._timer_at = deadline

    def _timer_fired(self) -> None:
        self._timer = None
        rest = self._deadline - self.clock.seconds()
        if rest > 0:
            # (at least a millisecond: never early, never a busy loop)
            rest = max(rest, 0.001)
            self._timer = self.clock.callLater(rest, self._timer_fired)
            self._timer_at = self._deadline
            return
        self._timed_out()

    def pause_reading(self, reason: str) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self._closing:
                self.transport.resumeProducing()

    def abort(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    def set_nodelay(self) -> None:
        """
        Disable Nagle for this connection (when it starts): no piece (an
        SSE event, the end of a body written in several sends) waits for
        the client's ACK.
        """
        if ITCPTransport.providedBy(self.transport):
            try:
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass

    def close(self) -> None:
        """
        Close once everything written was sent.
        """
        self._closing = True
        self.batcher.flush_transport(self.transport)
        self.transport.loseConnection()

    def linger(self) -> None:
        """
        Close after answering a request whose body was not read: send our
        FIN but keep reading (and discarding) for a while, so that unread
        request bytes do not make the kernel reset the connection before
        the client has read the response.
        """
        self._closing = True
        self._stopped = True
        t = self.transport
        self.batcher.flush_transport(t)
        if not ITCPTransport.providedBy(t):
            t.loseConnection()
            return
        # The client's EOF must not drop what is still to be sent: a
        # lingering connection handles it (readConnectionLost) instead of
        # being closed at once.
        alsoProvides(self, IHalfCloseableProtocol)
        t.loseWriteConnection()
        if self._paused:
            self._paused.clear()
            t.resumeProducing()
        self._linger_call = self.clock.callLater(LINGER_TIMEOUT, t.loseConnection)

    def readConnectionLost(self) -> None:
        """
        The client finished sending while we linger: close once our
        response is out.
        """
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

