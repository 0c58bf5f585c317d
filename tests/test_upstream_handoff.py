"""
Tests for L{mproxy.http.upstream.UpstreamPool} handing a released
connection to a request still waiting for its own connect, and what
becomes of that connect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http.upstream import CLOSED, NOT_CONNECTED, UpstreamPool
from tests.doubles import Producer


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.errors: list[Any] = []

    def upstream_informational(self, status: int, headers: Any) -> None:
        self.events.append(("info", status))

    def upstream_response(self, status: int, reason: bytes, headers: Any) -> None:
        self.events.append(("response", status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", bytes(data)))

    def upstream_done(self, trailers: Any) -> None:
        self.events.append(("done",))

    def upstream_failed(self, err: Any) -> None:
        self.errors.append(err)
        self.events.append(("failed", err.status))


class Harness:
    """
    A pool on a MemoryReactorClock; connects are completed (or failed)
    one by one, in any order, by their index in C{reactor.tcpClients}.
    """

    def __init__(self, **kw: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, "10.0.0.2", 3000, **kw)
        self.transports: dict[int, StringTransport] = {}

    def request(self, target: bytes = b"/x", **kw: Any) -> tuple[Any, Receiver]:
        r = Receiver()
        ex = self.pool.request(b"GET", target, [(b"Host", b"h")], r, **kw)
        return ex, r

    def requests(self, *targets: bytes, **kw: Any) -> list[tuple[Any, Receiver]]:
        """
        A request for each of C{targets}, in order.
        """
        return [self.request(target, **kw) for target in targets]

    def handed_on(self, *targets: bytes,
                  **kw: Any) -> tuple[Any, StringTransport, list[tuple[Any, Receiver]]]:
        """
        Requests for C{targets}; the first one's connect made and its
        response received, so that its connection goes on to the second
        request (whose own connect goes on, a spare or for the third).
        """
        exchanges = self.requests(*targets, **kw)
        proto, t = self.connect(0)
        proto.dataReceived(OK)
        return proto, t, exchanges

    @property
    def connects(self) -> int:
        return len(self.reactor.tcpClients)

    def connect(self, i: int) -> tuple[Any, StringTransport]:
        factory = self.reactor.tcpClients[i][2]
        proto = factory.buildProtocol(None)
        t = StringTransport()
        self.transports[i] = t
        proto.makeConnection(t)
        return proto, t

    def fail(self, i: int, reason: Exception | None = None) -> None:
        factory = self.reactor.tcpClients[i][2]
        factory.clientConnectionFailed(self.reactor.connectors[i],
                                       Failure(reason or error.ConnectionRefusedError()))

    def stopped(self, i: int) -> bool:
        return bool(self.reactor.connectors[i].stoppedConnecting)

    def stop_connect(self, i: int) -> None:
        """
        What a real connector does after stopConnecting().
        """
        assert self.stopped(i)
        self.fail(i, error.UserError())


def sent(t: StringTransport) -> list[bytes]:
    """
    The request targets written on C{t}, in order.
    """
    return [line.split(b" ")[1] for line in t.value().split(b"\r\n") if line.startswith(b"GET ")]


class HandOffTests(SynchronousTestCase):
    def test_released_goes_to_waiting(self) -> None:
        """
        A connection released while requests wait for their connects goes
        to the oldest of them at once, as a re-used connection.
        """
        h = Harness()
        (a, ra), (b, rb), (c, rc) = h.requests(b"/a", b"/b", b"/c")
        self.assertEqual(h.connects, 3)
        self.assertEqual(h.pool.waiting_count, 3)
        pa, ta = h.connect(0)
        self.assertEqual(h.pool.waiting_count, 2)
        pa.dataReceived(OK)
        self.assertEqual(ra.events[-1], ("done",))
        self.assertEqual(sent(ta), [b"/a", b"/b"])
        self.assertEqual(h.pool.idle_count, 0)
        self.assertEqual(h.pool.busy_count, 1)
        self.assertEqual(h.pool.waiting_count, 1)
        self.assertEqual(h.pool.spare_count, 1)
        pa.dataReceived(OK)
        self.assertEqual(rb.events, [("response", 200), ("data", b"hello"), ("done",)])
        self.assertEqual(sent(ta), [b"/a", b"/b", b"/c"])
        pa.dataReceived(OK)
        self.assertEqual(rc.events[-1], ("done",))
        self.assertEqual(h.pool.idle_count, 1)
        self.assertEqual(h.pool.waiting_count, 0)
        self.assertEqual(h.pool.spare_count, 2)
        self.assertEqual(h.connects, 3)

    def test_fifo_order(self) -> None:
        """
        Released connections go to the waiting requests in the order they
        were made, whichever connect completes first.
        """
        h = Harness()
        rs = [h.request(b"/%d" % i)[1] for i in range(4)]
        p3, t3 = h.connect(3)
        self.assertEqual(sent(t3), [b"/3"])
        p3.dataReceived(OK)
        self.assertEqual(sent(t3), [b"/3", b"/0"])
        p3.dataReceived(OK)
        self.assertEqual(sent(t3), [b"/3", b"/0", b"/1"])
        self.assertEqual(rs[0].events[-1], ("done",))
        self.assertEqual(rs[2].events, [])

    def test_spare_connect_serves_next_waiting(self) -> None:
        """
        The connect of a request served by another connection, once made,
        serves the oldest request still waiting (as a new connection).
        """
        h = Harness()
        pa, ta, _ = h.handed_on(b"/a", b"/b", b"/c")  # /b on ta; /b's connect (1) is spare
        pb, tb = h.connect(1)
        self.assertEqual(sent(tb), [b"/c"])
        self.assertEqual(h.pool.waiting_count, 0)
        self.assertEqual(h.pool.spare_count, 1)
        # /c's own connect is spare now; made, it goes idle
        pc, tc = h.connect(2)
        self.assertEqual(tc.value(), b"")
        self.assertFalse(tc.disconnecting)
        self.assertEqual(h.pool.idle_count, 1)
        self.assertEqual(h.pool.spare_count, 0)
        # and a new request takes it
        d, rd = h.request(b"/d")
        self.assertEqual(sent(tc), [b"/d"])
        self.assertEqual(h.connects, 3)

    def test_spare_connect_dropped_when_idle_full(self) -> None:
        """
        A spare connect made when nothing waits and the idle set is full
        is closed: C{max_idle} still bounds what is kept.
        """
        h = Harness(max_idle=1)
        pa, ta, _ = h.handed_on(b"/a", b"/b")  # -> /b
        pa.dataReceived(OK)  # idle: 1
        self.assertEqual(h.pool.idle_count, 1)
        pb, tb = h.connect(1)
        self.assertTrue(tb.disconnecting)
        self.assertEqual(h.pool.idle_count, 1)
        self.assertEqual(h.pool.spare_count, 0)

    def test_spare_connect_idle_timeout(self) -> None:
        """
        A spare connection that goes idle is not re-used after the idle
        reuse limit, counted from when it was made.
        """
        h = Harness(idle_reuse_limit=10)
        pa, ta, _ = h.handed_on(b"/a", b"/b")
        pa.dataReceived(OK)
        h.reactor.advance(5)
        pb, tb = h.connect(1)
        self.assertEqual(h.pool.idle_count, 2)
        h.reactor.advance(8)  # ta idle for 13 s, tb for 8 s
        h.request(b"/c")
        self.assertEqual(sent(tb), [b"/c"])
        h.request(b"/d")
        self.assertTrue(ta.disconnecting)
        self.assertEqual(h.connects, 3)

    def test_fresh_request_never_waits(self) -> None:
        """
        A request asking for a new connection (a request sent again) is
        not given a released one.
        """
        h = Harness()
        h.request(b"/a")
        f, rf = h.request(b"/f", fresh=True)
        self.assertEqual(h.pool.waiting_count, 1)
        pa, ta = h.connect(0)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a"])
        self.assertEqual(h.pool.idle_count, 1)
        pf, tf = h.connect(1)
        self.assertEqual(sent(tf), [b"/f"])

    def test_body_queued_while_waiting(self) -> None:
        """
        The body a waiting request queued goes out on the connection it is
        handed, after its head; the body producer paused by the queue
        resumes.
        """
        h = Harness()
        h.request(b"/a")
        b, rb = h.request(b"/b", body_length=6)
        producer = Producer()
        b.set_body_producer(producer)
        b.write_body(b"x" * 70000)
        self.assertEqual(producer.calls, ["pause"])
        pa, ta = h.connect(0)
        ta.clear()
        pa.dataReceived(OK)
        self.assertTrue(ta.value().startswith(b"GET /b HTTP/1.1\r\n"))
        self.assertTrue(ta.value().endswith(b"\r\n\r\n" + b"x" * 70000))
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_announced_keep_alive_too_short(self) -> None:
        """
        A connection whose announced keep-alive timeout leaves no time is
        closed, not handed to a waiting request.
        """
        h = Harness()
        h.request(b"/a")
        b, rb = h.request(b"/b")
        pa, ta = h.connect(0)
        pa.dataReceived(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0.4\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(ta.disconnecting)
        self.assertEqual(sent(ta), [b"/a"])
        self.assertEqual(h.pool.waiting_count, 1)
        pb, tb = h.connect(1)
        self.assertEqual(sent(tb), [b"/b"])

    def test_connection_close_not_handed(self) -> None:
        """
        A response that ends its connection does not hand it on.
        """
        h = Harness()
        h.request(b"/a")
        h.request(b"/b")
        pa, ta = h.connect(0)
        pa.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sent(ta), [b"/a"])
        self.assertEqual(h.pool.waiting_count, 1)


class CancellationTests(SynchronousTestCase):
    def test_cancelled_waiter_removed(self) -> None:
        """
        A waiting request that is abandoned (its client went away) stops
        its connect and is not handed a connection.
        """
        h = Harness()
        _, (b, rb), (c, rc) = h.requests(b"/a", b"/b", b"/c")
        b.cancel()
        self.assertTrue(h.stopped(1))
        self.assertEqual(h.pool.waiting_count, 2)
        h.stop_connect(1)
        pa, ta = h.connect(0)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a", b"/c"])
        self.assertEqual(rb.events, [])

    def test_cancel_after_hand_off(self) -> None:
        """
        A request abandoned after it was handed a connection aborts that
        connection (as any busy one); its spare connect goes on.
        """
        h = Harness()
        pa, ta, [_, (b, rb)] = h.handed_on(b"/a", b"/b")
        b.cancel()
        self.assertTrue(ta.disconnecting)
        self.assertFalse(h.stopped(1))
        self.assertEqual(rb.events, [])
        pb, tb = h.connect(1)
        self.assertEqual(h.pool.idle_count, 1)

    def test_spare_connect_failure_is_harmless(self) -> None:
        """
        A connect that fails after its request was served by another
        connection fails no request and is forgotten.
        """
        h = Harness()
        pa, ta, [(a, ra), (b, rb), (c, rc)] = h.handed_on(b"/a", b"/b", b"/c")
        # /b on ta, connect 1 spare
        h.fail(1)
        h.fail(1, error.TimeoutError())  # (a second report is no different)
        self.assertEqual(h.pool.spare_count, 0)
        self.assertEqual(ra.errors + rb.errors + rc.errors, [])
        self.assertEqual(h.pool.waiting_count, 1)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a", b"/b", b"/c"])
        self.assertEqual(rb.events[-1], ("done",))

    def test_own_connect_failure_fails_only_its_request(self) -> None:
        """
        A waiting request whose own connect fails gets the connect error
        (which may send it again); the other waiting requests stay, and
        are served.
        """
        h = Harness()
        (a, ra), (b, rb), (c, rc) = h.requests(b"/a", b"/b", b"/c")
        h.fail(1)
        self.assertEqual(rb.events, [("failed", 502)])
        self.assertEqual(rb.errors[0].kind, NOT_CONNECTED)
        self.assertEqual(ra.events + rc.events, [])
        self.assertEqual(h.pool.waiting_count, 2)
        pa, ta = h.connect(0)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a", b"/c"])
        pa.dataReceived(OK)
        self.assertEqual(rc.events[-1], ("done",))
        self.assertEqual(rb.events, [("failed", 502)])

    def test_waiter_bounded_by_own_connect(self) -> None:
        """
        No request waits longer than its own connect: a connect that times
        out fails its request with a 504 even while other connections are
        busy.
        """
        h = Harness()
        a, ra = h.request(b"/a", timeout=5)
        pa, ta = h.connect(0)
        b, rb = h.request(b"/b", timeout=5)
        self.assertEqual(h.reactor.tcpClients[1][3], 5)
        h.fail(1, error.TimeoutError())
        self.assertEqual(rb.events, [("failed", 504)])
        self.assertEqual(rb.errors[0].kind, NOT_CONNECTED)
        self.assertEqual(h.pool.waiting_count, 0)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a"])
        self.assertEqual(h.pool.idle_count, 1)

    def test_own_connect_serves_its_request_first(self) -> None:
        """
        A waiting request's own connect, made, serves that request even
        when older requests still wait.
        """
        h = Harness()
        h.request(b"/a")
        h.request(b"/b")
        pb, tb = h.connect(1)
        self.assertEqual(sent(tb), [b"/b"])
        self.assertEqual(h.pool.waiting_count, 1)

    def test_handed_connection_closed_is_reused_failure(self) -> None:
        """
        A released connection that the target closes before answering the
        request it was handed is a re-used connection's close (the request
        may be sent again, the target is not blamed); a spare connection
        handed on is a new one.
        """
        h = Harness()
        pa, ta, [_, (b, rb), (c, rc)] = h.handed_on(b"/a", b"/b", b"/c")
        pa.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(rb.events, [("failed", 502)])
        self.assertEqual((rb.errors[0].kind, rb.errors[0].reused), (CLOSED, True))
        pb, tb = h.connect(1)  # /b's connect, spare: to /c
        self.assertEqual(sent(tb), [b"/c"])
        pb.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((rc.errors[0].kind, rc.errors[0].reused), (CLOSED, False))


class CloseTests(SynchronousTestCase):
    def test_closed_pool_hands_nothing(self) -> None:
        """
        After close() a released connection is closed, not handed to a
        waiting request, which its own connect serves.
        """
        h = Harness()
        h.request(b"/a")
        b, rb = h.request(b"/b")
        pa, ta = h.connect(0)
        h.pool.close()
        pa.dataReceived(OK)
        self.assertTrue(ta.disconnecting)
        self.assertEqual(sent(ta), [b"/a"])
        pb, tb = h.connect(1)
        self.assertEqual(sent(tb), [b"/b"])
        pb.dataReceived(OK)
        self.assertTrue(tb.disconnecting)
        self.assertEqual(rb.events[-1], ("done",))

    def test_close_idle_stops_spare_connects(self) -> None:
        """
        close_idle() (a drained or removed target) stops the spare
        connects too, so no connection is left idle after it; waiting
        requests keep their connects.
        """
        h = Harness()
        pa, ta, [_, _, (c, rc)] = h.handed_on(b"/a", b"/b", b"/c")  # connect 1 spare
        h.pool.close_idle()
        self.assertTrue(h.stopped(1))
        self.assertFalse(h.stopped(2))
        self.assertEqual(h.pool.spare_count, 0)
        h.stop_connect(1)
        self.assertEqual(rc.events, [])

    def test_spare_connect_made_after_close(self) -> None:
        """
        A spare connect that completes once the pool is closed is closed.
        """
        h = Harness()
        h.handed_on(b"/a", b"/b")
        h.pool.closed = True  # (as close() does, without its close_idle)
        pb, tb = h.connect(1)
        self.assertTrue(tb.disconnecting)
        self.assertEqual(h.pool.idle_count, 0)

    def test_request_on_closed_pool(self) -> None:
        """
        A closed pool takes no request, even with connections in progress.
        """
        h = Harness()
        h.handed_on(b"/a", b"/b")
        h.pool.close()
        d, rd = h.request(b"/d")
        self.assertEqual(rd.events, [("failed", 502)])
        self.assertEqual(h.pool.waiting_count, 0)


class ConnectLimitTests(SynchronousTestCase):
    """
    At most C{max_connecting} connects are in progress; the requests beyond
    wait for one of them or for a released connection, in order.
    """

    def test_connects_limited(self) -> None:
        """
        Requests beyond the limit start no connect; each connect made, or
        connection released, serves the oldest waiting request, and a
        connect made frees its place for the next one.
        """
        h = Harness(max_connecting=2)
        rs = [h.request(b"/%d" % i)[1] for i in range(5)]
        self.assertEqual(h.connects, 2)
        self.assertEqual(h.pool.connecting_count, 2)
        self.assertEqual(h.pool.waiting_count, 5)
        p0, t0 = h.connect(0)
        self.assertEqual(sent(t0), [b"/0"])
        self.assertEqual(h.connects, 3)  # for /2
        p0.dataReceived(OK)
        # /1 takes the released connection; its connect goes to /3
        self.assertEqual(sent(t0), [b"/0", b"/1"])
        self.assertEqual(h.connects, 3)
        p1, t1 = h.connect(1)
        self.assertEqual(sent(t1), [b"/3"])
        self.assertEqual(h.connects, 4)  # for /4
        p2, t2 = h.connect(2)
        self.assertEqual(sent(t2), [b"/2"])
        p3, t3 = h.connect(3)
        self.assertEqual(sent(t3), [b"/4"])
        self.assertEqual(h.pool.waiting_count, 0)
        self.assertEqual(h.pool.connecting_count, 0)
        for p in (p0, p1, p2, p3):
            p.dataReceived(OK)
        self.assertEqual([r.events[-1] for r in rs], [("done",)] * 5)
        self.assertEqual(h.pool.idle_count, 4)

    def test_released_serves_queued_in_order(self) -> None:
        """
        Released connections go to the waiting requests oldest first,
        whether they have a connect of their own or not.
        """
        h = Harness(max_connecting=1)
        rs = [h.request(b"/%d" % i)[1] for i in range(3)]
        p0, t0 = h.connect(0)  # /0; a connect for /1 starts
        self.assertEqual(h.connects, 2)
        p0.dataReceived(OK)  # -> /1; its connect goes to /2
        p0.dataReceived(OK)  # -> /2; its connect is spare
        self.assertEqual(sent(t0), [b"/0", b"/1", b"/2"])
        self.assertEqual(h.pool.spare_count, 1)
        self.assertEqual(h.connects, 2)
        p1, t1 = h.connect(1)
        self.assertEqual(h.pool.idle_count, 1)
        self.assertEqual(rs[1].events[-1], ("done",))

    def test_queued_waits_its_connect_timeout_at_most(self) -> None:
        """
        A request that got no connect within its connect timeout fails as
        if its connect had timed out (a 504 it may be sent again after);
        the others wait on.
        """
        h = Harness(max_connecting=1)
        a, ra = h.request(b"/a", timeout=5)
        h.reactor.advance(1)
        b, rb = h.request(b"/b", timeout=5)
        c, rc = h.request(b"/c", timeout=5)
        h.reactor.advance(4.9)
        self.assertEqual(rb.events, [])
        h.reactor.advance(0.2)
        self.assertEqual(rb.events, [("failed", 504)])
        self.assertEqual(rc.events, [("failed", 504)])
        self.assertEqual(rb.errors[0].kind, NOT_CONNECTED)
        self.assertEqual(ra.events, [])
        self.assertEqual(h.pool.waiting_count, 1)
        self.assertEqual(h.connects, 1)
        pa, ta = h.connect(0)
        pa.dataReceived(OK)
        self.assertEqual(sent(ta), [b"/a"])
        self.assertEqual(h.pool.idle_count, 1)

    def test_queue_timer_follows_oldest(self) -> None:
        """
        Each waiting request's own connect timeout counts, also for those
        that came later than the first.
        """
        h = Harness(max_connecting=1)
        h.request(b"/a", timeout=5)
        b, rb = h.request(b"/b", timeout=5)
        h.reactor.advance(3)
        c, rc = h.request(b"/c", timeout=5)
        h.reactor.advance(2.1)
        self.assertEqual(rb.events, [("failed", 504)])
        self.assertEqual(rc.events, [])
        h.reactor.advance(2.9)
        self.assertEqual(rc.events, [("failed", 504)])
        self.assertEqual(h.pool.waiting_count, 1)

    def test_late_connect_gets_rest_of_timeout(self) -> None:
        """
        A request whose connect starts after it waited gets what is left
        of its connect timeout; a failed connect fails only its own request
        and lets the next one connect.
        """
        h = Harness(max_connecting=1)
        (a, ra), (b, rb) = h.requests(b"/a", b"/b", timeout=5)
        h.reactor.advance(2)
        h.fail(0)
        self.assertEqual(ra.events, [("failed", 502)])
        self.assertEqual(rb.events, [])
        self.assertEqual(h.connects, 2)
        self.assertEqual(h.reactor.tcpClients[1][3], 3)
        pb, tb = h.connect(1)
        self.assertEqual(sent(tb), [b"/b"])

    def test_queued_cancelled(self) -> None:
        """
        A waiting request without a connect that is abandoned is forgotten:
        no connect is started for it.
        """
        h = Harness(max_connecting=1)
        _, (b, rb), _ = h.requests(b"/a", b"/b", b"/c")
        b.cancel()
        self.assertEqual(h.pool.waiting_count, 2)
        pa, ta = h.connect(0)
        self.assertEqual(h.connects, 2)
        pc, tc = h.connect(1)
        self.assertEqual(sent(tc), [b"/c"])
        self.assertEqual(rb.events, [])

    def test_cancelled_connect_goes_to_queued(self) -> None:
        """
        The connect of an abandoned request goes on for the oldest request
        waiting without one, instead of being stopped.
        """
        h = Harness(max_connecting=1)
        (a, ra), (b, rb) = h.requests(b"/a", b"/b")
        a.cancel()
        self.assertFalse(h.stopped(0))
        self.assertEqual(h.pool.waiting_count, 1)
        pa, ta = h.connect(0)
        self.assertEqual(sent(ta), [b"/b"])
        self.assertEqual(ra.events, [])

    def test_taken_over_connect_failing(self) -> None:
        """
        A request waiting for a connect made for another one does not fail
        when that connect fails: it connects itself, for what is left of
        its connect timeout, and only that connect failing fails it.
        """
        h = Harness(max_connecting=1)
        h.request(b"/a", timeout=5)
        b, rb = h.request(b"/b", timeout=5)
        pa, ta = h.connect(0)  # /a; connect 1 for /b
        c, rc = h.request(b"/c", timeout=5)  # waits without a connect
        h.reactor.advance(1)
        pa.dataReceived(OK)  # -> /b; connect 1 goes to /c
        h.reactor.advance(1)
        h.fail(1)
        self.assertEqual(rc.events, [])
        self.assertEqual(h.connects, 3)
        self.assertEqual(h.reactor.tcpClients[2][3], 3)
        h.fail(2)
        self.assertEqual(rc.events, [("failed", 502)])
        self.assertEqual(rc.errors[0].kind, NOT_CONNECTED)
        self.assertEqual(h.pool.waiting_count, 0)
        self.assertEqual(h.pool.connecting_count, 0)

    def test_taken_over_spare_failing(self) -> None:
        """
        The same for a new request that took over a spare connect.
        """
        h = Harness()
        h.handed_on(b"/a", b"/b", timeout=5)  # /b on ta; connect 1 spare
        d, rd = h.request(b"/d", timeout=5)
        self.assertEqual(h.connects, 2)
        self.assertEqual(h.pool.spare_count, 0)
        h.fail(1, error.TimeoutError())
        self.assertEqual(rd.events, [])
        self.assertEqual(h.connects, 3)
        pd, td = h.connect(2)
        self.assertEqual(sent(td), [b"/d"])

    def test_close_connects_queued(self) -> None:
        """
        Once the pool is closed nothing is handed on: every request still
        waiting without a connect gets its own.
        """
        h = Harness(max_connecting=1)
        h.requests(b"/a", b"/b", b"/c")
        pa, ta = h.connect(0)
        self.assertEqual(h.connects, 2)
        h.pool.close()
        self.assertEqual(h.connects, 3)
        pa.dataReceived(OK)
        self.assertTrue(ta.disconnecting)
        pb, tb = h.connect(1)
        pc, tc = h.connect(2)
        self.assertEqual((sent(tb), sent(tc)), ([b"/b"], [b"/c"]))

    def test_fresh_not_limited(self) -> None:
        """
        A request sent again on a new connection connects at once.
        """
        h = Harness(max_connecting=1)
        h.request(b"/a")
        f, rf = h.request(b"/f", fresh=True)
        self.assertEqual(h.connects, 2)
        self.assertEqual(h.pool.waiting_count, 1)
