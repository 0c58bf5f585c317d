"""
Tests of L{mproxy.workers.reactor} (the worker's epoll reactor: dispatch
without a log context, errors handled as Twisted's reactor does, turn-end
calls), of the write batcher and the worker's log lines on it
(L{mproxy.workers.worker.FDLines}).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from mproxy.workers.reactor import WorkerReactor


def _close_reactor(reactor: Any) -> None:
    reactor._poller.close()
    reactor.waker.connectionLost(None)


class Selectable:
    """
    A readable end of a socket pair, as the reactor sees a connection:
    C{doRead} runs C{on_read}, C{connectionLost} records its reason.
    """

    def __init__(self, sock: socket.socket, on_read: Any = None) -> None:
        self.sock = sock
        self.on_read = on_read
        self.lost: list[Any] = []
        self.systems: list[str] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Selectable"

    def doRead(self) -> Any:
        self.systems.append(context.get(log.ILogContext)["system"])
        self.sock.recv(100)
        if self.on_read is not None:
            return self.on_read()
        return None

    def doWrite(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


class WorkerReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = WorkerReactor()
        self.addCleanup(self._close)
        self.errors: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("isError"):
                self.errors.append(event)

        log.addObserver(observe)
        self.addCleanup(log.removeObserver, observe)

    def _close(self) -> None:
        # the sockets are closed by then (later cleanups run first)
        _close_reactor(self.reactor)

    def readable(self, on_read: Any = None) -> tuple[Selectable, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        s = Selectable(a, on_read)
        self.reactor.addReader(s)
        b.send(b"x")
        return s, b

    def test_reads_dispatched_without_a_log_context(self) -> None:
        """
        The handler runs directly, not inside the log context Twisted's
        reactor sets up for each event (its C{system} is the selectable's
        log prefix there).
        """
        s, _ = self.readable()
        self.reactor.doIteration(0)
        self.assertEqual(s.systems, ["-"])

    def test_raising_handler_logged_and_disconnected(self) -> None:
        """
        A selectable whose C{doRead} raises is disconnected with that error,
        which is logged.
        """
        def fail() -> None:
            raise ZeroDivisionError("boom")

        s, _ = self.readable(fail)
        self.reactor.doIteration(0)
        self.assertEqual(len(s.lost), 1)
        s.lost[0].trap(ZeroDivisionError)
        self.assertNotIn(s, self.reactor.getReaders())
        self.assertEqual([e["failure"].type for e in self.errors], [ZeroDivisionError])
        self.flushLoggedErrors(ZeroDivisionError)

    def test_read_returning_a_reason_disconnects(self) -> None:
        from twisted.internet.main import CONNECTION_DONE

        s, _ = self.readable(lambda: CONNECTION_DONE)
        self.reactor.doIteration(0)
        self.assertEqual(len(s.lost), 1)
        self.assertNotIn(s, self.reactor.getReaders())
        self.assertEqual(self.errors, [])

    def test_failing_disconnect_logged_and_next_event_handled(self) -> None:
        """
        An exception while disconnecting (a C{connectionLost} that raises)
        is logged; the other events of the same poll are still handled.
        """
        def fail() -> None:
            raise ZeroDivisionError("boom")

        s, _ = self.readable(fail)

        def lost(reason: Any) -> None:
            raise KeyError("lost")

        s.connectionLost = lost  # type: ignore[method-assign]
        other, _ = self.readable()
        self.reactor.doIteration(0)
        self.assertEqual(other.systems, ["-"])
        self.assertEqual(sorted(e["failure"].type.__name__ for e in self.errors),
                         ["KeyError", "ZeroDivisionError"])
        self.flushLoggedErrors(ZeroDivisionError, KeyError)

    def test_peer_closed_is_connection_done(self) -> None:
        """
        A hang-up with nothing left to read disconnects a reader cleanly.
        """
        from twisted.internet import error

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        s = Selectable(a)
        self.reactor.addReader(s)
        b.shutdown(socket.SHUT_RDWR)
        b.close()
        for _ in range(3):
            self.reactor.doIteration(0)
            if s.lost:
                break
        # the socket pair reports EOF as readable first (doRead reads b"")
        # or as a hang-up: either way the reader is gone, without an error
        if s.lost:
            s.lost[0].trap(error.ConnectionDone, error.ConnectionLost)
        self.assertEqual(self.errors, [])

    def test_turn_end_after_every_event(self) -> None:
        """
        A call made at turn end runs once, after all the events of the
        poll, before the next one.
        """
        order: list[str] = []
        r = self.reactor

        def first() -> None:
            order.append("first")
            r.call_at_turn_end(lambda: order.append("end"))

        self.readable(first)
        self.readable(lambda: order.append("second"))
        r.doIteration(0)
        self.assertEqual(order, ["first", "second", "end"])
        r.doIteration(0)
        self.assertEqual(order, ["first", "second", "end"])

    def test_turn_end_after_timed_calls(self) -> None:
        """
        Timed calls have a turn end too; the reactor does not wait while a
        call is pending.
        """
        r = self.reactor
        order: list[str] = []
        r.callLater(0, lambda: r.call_at_turn_end(lambda: order.append("end")))
        r.callLater(0, lambda: order.append("timed"))
        r.runUntilCurrent()
        self.assertEqual(order, ["timed", "end"])
        r.call_at_turn_end(lambda: None)
        self.assertEqual(r.timeout(), 0)

    def test_turn_end_call_added_by_one_runs_in_that_turn(self) -> None:
        r = self.reactor
        order: list[str] = []
        r.call_at_turn_end(lambda: r.call_at_turn_end(lambda: order.append("second")))
        r.runUntilCurrent()
        self.assertEqual(order, ["second"])

    def test_failing_turn_end_call_logged_others_run(self) -> None:
        r = self.reactor
        order: list[str] = []

        def fail() -> None:
            raise ZeroDivisionError("boom")

        r.call_at_turn_end(fail)
        r.call_at_turn_end(lambda: order.append("ran"))
        r.runUntilCurrent()
        self.assertEqual(order, ["ran"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_batcher_flushes_at_turn_end(self) -> None:
        """
        The write batcher sends what a turn wrote when the turn ends,
        without a timed call.
        """
        from mproxy.http.batch import WriteBatcher

        r = self.reactor
        batcher = WriteBatcher(r)
        sent: list[str] = []
        batcher.flush = lambda: sent.append("flush")  # type: ignore[method-assign]
        transport = _fake_tcp()
        batcher.write(transport, b"abc")
        batcher.write(transport, b"def")
        self.assertEqual(r.getDelayedCalls(), [])
        r.runUntilCurrent()
        self.assertEqual(sent, ["flush"])


class TCPReadTests(SynchronousTestCase):
    """
    Reads of TCP connections (handled inline by the reactor) behave as
    Twisted's: data to the protocol, a raising protocol logged and its
    connection closed, the peer's close a clean C{connectionLost}.
    """

    def setUp(self) -> None:
        from twisted.internet.protocol import Factory, Protocol

        self.reactor = WorkerReactor()
        self.addCleanup(self._close)
        test = self
        self.received: list[bytes] = []
        self.lost: list[Any] = []
        self.protocols: list[Any] = []
        self.fail_with: BaseException | None = None

        class Recorder(Protocol):
            def connectionMade(self) -> None:
                test.protocols.append(self)

            def dataReceived(self, data: bytes) -> None:
                test.received.append(data)
                if test.fail_with is not None:
                    raise test.fail_with

            def connectionLost(self, reason: Any) -> None:
                test.lost.append(reason)

        self.port = self.reactor.listenTCP(0, Factory.forProtocol(Recorder),
                                           interface="127.0.0.1")
        self.client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(self.client.close)
        self.turns(lambda: self.protocols)

    def _close(self) -> None:
        for s in self.reactor.getReaders() + self.reactor.getWriters():
            sock = getattr(s, "socket", None)
            if sock is not None:
                sock.close()
        _close_reactor(self.reactor)

    def turns(self, done: Any) -> None:
        for _ in range(50):
            if done():
                return
            self.reactor.doIteration(0.1)
        self.fail("not done after 50 turns")

    def test_data_reaches_the_protocol(self) -> None:
        from twisted.internet import tcp

        def no_dispatch(self: Any) -> None:
            raise AssertionError("dispatched through doRead")

        # the reactor reads a plain TCP connection itself
        self.patch(tcp.Server, "doRead", no_dispatch)
        self.client.sendall(b"hello")
        self.turns(lambda: self.received)
        self.assertEqual(self.received, [b"hello"])
        self.assertEqual(self.lost, [])

    def test_connection_with_its_own_read(self) -> None:
        """
        A connection given a C{doRead} of its own (as Twisted does while a
        client connects) is read through it.
        """
        transport = self.protocols[0].transport
        calls: list[int] = []

        def own() -> None:
            calls.append(len(transport.socket.recv(100)))

        transport.doRead = own
        self.client.sendall(b"hello")
        self.turns(lambda: calls)
        self.assertEqual(calls, [5])
        self.assertEqual(self.received, [])

    def test_raising_protocol_logged_and_closed(self) -> None:
        self.fail_with = ZeroDivisionError("boom")
        self.client.sendall(b"hello")
        self.turns(lambda: self.lost)
        self.lost[0].trap(ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.client.settimeout(5)
        self.assertEqual(self.client.recv(10), b"")

    def test_raising_oserror_is_the_protocols(self) -> None:
        """
        An C{OSError} from the protocol is its error, not the socket's.
        """
        self.fail_with = BlockingIOError(11, "not the socket")
        self.client.sendall(b"hello")
        self.turns(lambda: self.lost)
        self.lost[0].trap(BlockingIOError)
        self.assertEqual(len(self.flushLoggedErrors(BlockingIOError)), 1)

    def test_peer_close_is_connection_done(self) -> None:
        from twisted.internet import error

        self.client.close()
        self.turns(lambda: self.lost)
        self.lost[0].trap(error.ConnectionDone)
        self.assertEqual(self.flushLoggedErrors(), [])


class ScriptedReactor(WorkerReactor):
    """
    A L{WorkerReactor} whose polls run the next step of a script instead
    of waiting (each records the timeout it was given); its clock is
    C{self.now}.  The loop stops when the script is done.
    """

    def __init__(self) -> None:
        self.now = 100.0
        self.steps: list[Any] = []
        self.timeouts: list[Any] = []
        self.full_turns = 0
        super().__init__()
        self.seconds = lambda: self.now  # type: ignore[method-assign]

    def doPoll(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)
        if not self.steps:
            self._started = False
            return
        self.steps.pop(0)()

    doIteration = doPoll

    def runUntilCurrent(self) -> None:
        self.full_turns += 1
        super().runUntilCurrent()


class MainLoopTests(SynchronousTestCase):
    """
    L{WorkerReactor.mainLoop}: Twisted's loop, with the common turn (nothing
    due) done without C{runUntilCurrent} and C{timeout}.
    """

    def setUp(self) -> None:
        self.reactor = ScriptedReactor()
        self.addCleanup(_close_reactor, self.reactor)
        self.reactor._started = True
        self.reactor.running = True

    def test_poll_waits_until_the_first_timed_call(self) -> None:
        """
        With a timed call pending, the poll waits until it is due, and it
        runs once due; with none, the poll waits for events only.
        """
        r = self.reactor
        ran: list[float] = []
        r.callLater(5, lambda: ran.append(r.now))
        r.callLater(9, lambda: ran.append(r.now))

        def advance(to: float) -> Any:
            return lambda: setattr(r, "now", to)

        r.steps = [advance(102.5), advance(105.0), advance(109.5)]
        r.mainLoop()
        self.assertEqual(ran, [105.0, 109.5])
        self.assertEqual(r.timeouts, [5.0, 2.5, 4.0, None])

    def test_common_turn_without_runUntilCurrent(self) -> None:
        """
        Turns with no timed call due, none added, and nothing from another
        thread do not run Twisted's C{runUntilCurrent}; one with a call due
        does.
        """
        r = self.reactor
        r.callLater(30, lambda: None)
        r.steps = [lambda: None, lambda: None, lambda: setattr(r, "now", 130.0)]
        r.mainLoop()
        self.assertEqual(r.full_turns, 1)
        self.assertEqual(r.timeouts, [30.0, 30.0, 30.0, None])

    def test_new_timed_call_counts(self) -> None:
        """
        A timed call added during a turn bounds the next poll.
        """
        r = self.reactor
        r.steps = [lambda: r.callLater(0.25, lambda: None)]
        r.mainLoop()
        self.assertEqual(r.timeouts, [None, 0.25])

    def test_cancelled_calls_dropped(self) -> None:
        """
        Once most pending timed calls are cancelled, they are dropped from
        the heap, as Twisted's loop does.
        """
        r = self.reactor
        calls = [r.callLater(60 + i, lambda: None) for i in range(60)]
        r.steps = [lambda: [c.cancel() for c in calls[:55]]]
        r.mainLoop()
        self.assertEqual(len(r._pendingTimedCalls), 5)

    def test_thread_call_runs_before_the_poll(self) -> None:
        r = self.reactor
        ran: list[str] = []
        r.callFromThread(ran.append, "called")
        r.mainLoop()
        self.assertEqual(ran, ["called"])

    def test_pending_turn_end_call_runs_before_the_poll(self) -> None:
        """
        A turn-end call still pending when a poll returned (added outside
        of the poll's dispatch) runs before the next poll.
        """
        r = self.reactor
        order: list[str] = []
        r.steps = [lambda: r._turn_end.append(lambda: order.append("end")),
                   lambda: order.append("poll")]
        r.mainLoop()
        self.assertEqual(order, ["end", "poll"])

    def test_not_running_poll_does_not_wait(self) -> None:
        r = self.reactor
        r.running = False
        r.callLater(10, lambda: None)
        r.mainLoop()
        self.assertEqual(r.timeouts, [False])

    def test_stop_fires_shutdown_and_ends_the_loop(self) -> None:
        r = self.reactor
        r._stopped = False
        fired: list[str] = []
        r.addSystemEventTrigger("during", "shutdown", fired.append, "shutdown")
        r.steps = [r.stop] + [lambda: None] * 5
        r.mainLoop()
        self.assertEqual(fired, ["shutdown"])
        self.assertFalse(r._started)
        self.assertEqual(len(r.timeouts), 2)

    def test_error_logged_and_loop_goes_on(self) -> None:
        r = self.reactor
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def fail() -> None:
            raise ZeroDivisionError("boom")

        r.steps = [fail, lambda: None]
        r.mainLoop()
        self.assertEqual(len(r.timeouts), 3)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual([e["log_format"] for e in failures], ["Unexpected error in main loop"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


def _fake_tcp() -> Any:
    from twisted.internet import tcp

    t = object.__new__(tcp.Server)
    t.connected = True
    t.disconnecting = False
    t._aborting = False
    t._tempDataLen = 0
    t.dataBuffer = b""
    return t


class FDLinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.r, self.w = r, w
        self.turn: list[Any] = []
        self.writes: list[bytes] = []
        real = os.write

        def write(fd: int, data: bytes) -> int:
            self.writes.append(bytes(data))
            return real(fd, data)

        self.patch(os, "write", write)

    def lines(self, limit: int = 4096) -> Any:
        from mproxy.workers.worker import FDLines

        return FDLines(self.w, self.turn.append, limit)

    def end_turn(self) -> None:
        calls, self.turn[:] = list(self.turn), []
        for f in calls:
            f()

    def test_a_turns_lines_in_one_write(self) -> None:
        lines = self.lines()
        lines.write('{"msg": "a"}\n')
        lines.write('{"msg": "b"}\n')
        self.assertEqual(self.writes, [])
        self.end_turn()
        self.assertEqual(self.writes, [b'{"msg": "a"}\n{"msg": "b"}\n'])
        self.assertEqual(os.read(self.r, 100), b'{"msg": "a"}\n{"msg": "b"}\n')

    def test_writes_hold_whole_lines_within_the_limit(self) -> None:
        """
        No write is longer than the limit (unless one line is) or splits a
        line; a longer line is written alone, in its place.
        """
        lines = self.lines(limit=30)
        sent = ["%s\n" % (c * 9) for c in "abcd"] + ["%s\n" % ("e" * 40), "f\n"]
        for line in sent:
            lines.write(line)
        self.end_turn()
        for data in self.writes:
            self.assertTrue(data.endswith(b"\n"))
            self.assertTrue(len(data) <= 30 or data.count(b"\n") == 1)
        self.assertEqual(b"".join(self.writes), "".join(sent).encode())
        self.assertEqual(len(self.writes), 4)

    def test_drain_writes_what_is_pending(self) -> None:
        lines = self.lines()
        lines.write("a\n")
        lines.drain()
        self.assertEqual(self.writes, [b"a\n"])
        self.end_turn()
        self.assertEqual(self.writes, [b"a\n"])

    def test_line_made_later_in_its_place(self) -> None:
        """
        A line to be made later is made when the turn's lines are written,
        in its place among them.
        """
        lines = self.lines()
        made: list[str] = []

        def make() -> bytes:
            made.append("b")
            return b"b\n"

        lines.write("a\n")
        lines.write_later(make)
        lines.write("c\n")
        self.assertEqual((made, self.writes), ([], []))
        self.end_turn()
        self.assertEqual(made, ["b"])
        self.assertEqual(self.writes, [b"a\nb\nc\n"])

    def test_line_made_later_alone_registers_the_turn_end(self) -> None:
        lines = self.lines()
        lines.write_later(lambda: b"x\n")
        self.assertEqual(len(self.turn), 1)
        self.end_turn()
        self.assertEqual(self.writes, [b"x\n"])

    def test_lines_made_later_held_within_the_limit(self) -> None:
        """
        Lines made later are written as the others: whole lines, no write
        longer than the limit unless one line is.
        """
        lines = self.lines(limit=30)
        sent = [("%s\n" % (c * 9)).encode() for c in "abcd"] + [b"e" * 40 + b"\n", b"f\n"]
        for i, line in enumerate(sent):
            if i % 2:
                lines.write(line.decode())
            else:
                lines.write_later(lambda line=line: line)
        self.end_turn()
        for data in self.writes:
            self.assertTrue(data.endswith(b"\n"))
            self.assertTrue(len(data) <= 30 or data.count(b"\n") == 1)
        self.assertEqual(b"".join(self.writes), b"".join(sent))
        self.assertEqual(len(self.writes), 4)

    def test_line_made_later_without_turn_end_at_once(self) -> None:
        from mproxy.workers.worker import FDLines

        lines = FDLines(self.w)
        lines.write_later(lambda: b"a\n")
        self.assertEqual(self.writes, [b"a\n"])

    def test_line_made_later_by_another_thread_at_once(self) -> None:
        import threading

        lines = self.lines()
        t = threading.Thread(target=lines.write_later, args=(lambda: b"t\n",))
        t.start()
        t.join()
        self.assertEqual(self.writes, [b"t\n"])
        self.assertEqual(self.turn, [])

    def test_failing_line_left_out_and_logged(self) -> None:
        """
        A line whose making fails is left out (and the error logged); the
        others are written.
        """
        lines = self.lines()

        def fail() -> bytes:
            raise ZeroDivisionError("boom")

        lines.write("a\n")
        lines.write_later(fail)
        lines.write("b\n")
        self.end_turn()
        self.assertEqual(self.writes, [b"a\nb\n"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        lines.write_later(fail)
        self.end_turn()
        self.assertEqual(self.writes, [b"a\nb\n"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_lines_made_later_written_when_the_reactor_stops(self) -> None:
        from mproxy.workers.worker import run_reactor

        lines = self.lines()

        class Reactor:
            def run(self, installSignalHandlers: bool = True) -> None:
                lines.write_later(lambda: b"last\n")

        run_reactor(Reactor(), lines)
        self.assertEqual(self.writes, [b"last\n"])

    def test_not_encodable_raises_at_write(self) -> None:
        """
        A line the stream cannot encode fails when written (the logger
        writes it escaped instead), not later.
        """
        lines = self.lines()
        self.assertRaises(UnicodeEncodeError, lines.write, "\ud800\n")
        self.end_turn()
        self.assertEqual(self.writes, [])

    def test_without_turn_end_each_line_at_once(self) -> None:
        from mproxy.workers.worker import FDLines

        lines = FDLines(self.w)
        lines.write("a\n")
        self.assertEqual(self.writes, [b"a\n"])

    def test_other_threads_lines_at_once(self) -> None:
        """
        A line logged by another thread is written at once (the reactor
        may be waiting, and the pending lines are the reactor thread's).
        """
        import threading

        lines = self.lines()
        t = threading.Thread(target=lines.write, args=("from a thread\n",))
        t.start()
        t.join()
        self.assertEqual(self.writes, [b"from a thread\n"])
        self.assertEqual(self.turn, [])

    def test_failed_write_dropped(self) -> None:
        lines = self.lines()
        lines.write("a\n")

        def fail(fd: int, data: bytes) -> int:
            raise BlockingIOError()

        self.patch(os, "write", fail)
        lines.drain()
        lines.drain()

    def test_lines_written_when_the_reactor_stops(self) -> None:
        """
        The worker writes the lines still pending once its reactor has
        stopped, even when it stopped by an exception.
        """
        from mproxy.workers.worker import run_reactor

        lines = self.lines()

        class Reactor:
            def run(self, installSignalHandlers: bool = True) -> None:
                lines.write("last\n")
                raise RuntimeError("stopped")

        self.assertRaises(RuntimeError, run_reactor, Reactor(), lines)
        self.assertEqual(self.writes, [b"last\n"])


class BatcherWithoutTurnEndTests(SynchronousTestCase):
    def test_timed_call(self) -> None:
        """
        On a reactor without turn-end calls (tests' clocks), the batcher
        flushes in a C{callLater(0)}.
        """
        from mproxy.http.batch import WriteBatcher

        clock = MemoryReactorClock()
        batcher = WriteBatcher(clock)
        batcher.write(_fake_tcp(), b"abc")
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [0])
