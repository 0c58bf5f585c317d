"""
L{mproxy.http.h2.H2Channel} on a L{StringTransport} and a
L{MemoryReactorClock}: the client side is hyper-h2 (valid frames) or raw
bytes (invalid ones); what the server sends is parsed frame by frame.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.interfaces import INegotiated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from mproxy.http.h2 import ABORT_TIMEOUT, H2Channel
from mproxy.http.server import ProxySite

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
           (b":authority", b"example.com")]
IDLE = 75.0


class App(Resource):
    """
    Answers C{body}; C{/wait} is held open until the test finishes it.
    """

    isLeaf = True

    def __init__(self, body: bytes = b"0123456789") -> None:
        super().__init__()
        self.body = body
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/wait":
            self.waiting.append(request)
            return NOT_DONE_YET
        return self.body


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream_id.to_bytes(4, "big") + payload)


def request_block(*extra: bytes, path: bytes = b"/") -> bytes:
    headers = [(n, path if n == b":path" else v) for n, v in REQUEST]
    return Encoder().encode(headers) + b"".join(extra)


class Reactor(MemoryReactorClock):
    """
    Fails a test whose send loop keeps rescheduling itself with a zero
    delay (which would otherwise hang L{Clock.advance}).
    """

    spins = 0

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        if delay == 0:
            self.spins += 1
            if self.spins > 10000:
                raise AssertionError("the send loop never waits")
        return super().callLater(delay, f, *args, **kw)


@implementer(INegotiated)
class NegotiatedTransport(StringTransport):
    """
    A TLS connection on which ALPN chose h2.
    """

    negotiatedProtocol = b"h2"
    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class Harness:
    def __init__(self, app: Resource | None = None,
                 settings: dict[int, int] | None = None) -> None:
        self.app = app or App()
        self.reactor = Reactor()
        self.site = ProxySite(self.app, self.reactor, secure=True, idle_timeout=IDLE)
        self.transport = StringTransport()
        self.channel = H2Channel(self.site, self.reactor, IDLE)
        self.channel.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if settings:
            self.client.update_settings(settings)
        self._buf = b""
        self.flush()
        self.frames()  # the server's SETTINGS and its ACK of ours

    def send(self, data: bytes) -> None:
        self.reactor.spins = 0
        self.channel.dataReceived(data)
        self.pump()

    def flush(self) -> None:
        self.send(self.client.data_to_send())

    def get(self, stream_id: int = 1, path: bytes = b"/") -> None:
        headers = [(n, path if n == b":path" else v) for n, v in REQUEST]
        self.client.send_headers(stream_id, headers, end_stream=True)
        self.flush()

    def pump(self) -> None:
        """
        Run what is due now (the send loop reschedules itself with a zero
        delay while it has data it may send).
        """
        now = self.reactor.seconds()
        while [c for c in self.reactor.getDelayedCalls() if c.getTime() <= now]:
            self.reactor.advance(0)

    def frames(self) -> list[Frame]:
        self._buf += self.transport.value()
        self.transport.clear()
        out = []
        while len(self._buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                break
            f.parse_body(memoryview(self._buf[9:9 + length]))
            self._buf = self._buf[9 + length:]
            out.append(f)
        return out

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def goaways(frames: list[Frame]) -> list[int]:
    return [f.error_code for f in frames if isinstance(f, GoAwayFrame)]


def data_of(frames: list[Frame], stream_id: int = 1) -> bytes:
    return b"".join(f.data for f in frames
                    if isinstance(f, DataFrame) and f.stream_id == stream_id)


class ConnectionErrorTests(SynchronousTestCase):
    """
    Every connection error: one GOAWAY with its code, the transport closed
    (and no longer producing for), nothing more sent after it.
    """

    def assertConnectionError(self, h: Harness, code: int) -> None:
        self.assertEqual(goaways(h.frames()), [code])
        self.assertTrue(h.closed)
        self.assertIsNone(h.transport.producer)
        # a PING after the error is not answered
        h.send(frame(0x6, 0, 0, b"12345678"))
        self.assertEqual(h.frames(), [])

    def test_registers_as_producer(self) -> None:
        """
        The connection is its transport's producer (backpressure) until it
        closes.
        """
        h = Harness()
        self.assertIs(h.transport.producer, h.channel)
        self.assertTrue(h.transport.streaming)

    def test_invalid_preface(self) -> None:
        h = Harness.__new__(Harness)
        h.app = App()
        h.reactor = Reactor()
        h.site = ProxySite(h.app, h.reactor, secure=True)
        h.transport = StringTransport()
        h.channel = H2Channel(h.site, h.reactor, IDLE)
        h.channel.makeConnection(h.transport)
        h._buf = b""
        self.assertIsInstance(h.frames()[0], SettingsFrame)
        h.send(b"INVALID CONNECTION PREFACE\r\n\r\n")
        self.assertConnectionError(h, ErrorCodes.PROTOCOL_ERROR)

    def test_hpack_invalid_index(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(b"\xc6")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_index_zero(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(b"\x80")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_literal_with_invalid_name_index(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(b"\x7f\x01\x01a")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_huffman_eos(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(
            b"\x00\x85\xf2\xb2\x4a\x84\xff\x87\x49\x51\xff\xff\xff\xfa\x7f")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_huffman_zero_padding(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(
            b"\x00\x85\xf2\xb2\x4a\x84\xff\x83\x49\x50\x90")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_table_size_update_at_end(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, request_block(b"\x21")))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_hpack_table_size_update_above_limit(self) -> None:
        h = Harness()
        # 4097, more than our SETTINGS_HEADER_TABLE_SIZE of 4096
        h.send(frame(0x1, 0x5, 1, b"\x3f\xe2\x1f" + request_block()))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_truncated_header_block(self) -> None:
        h = Harness()
        h.send(frame(0x1, 0x5, 1, b"\x40"))
        self.assertConnectionError(h, ErrorCodes.COMPRESSION_ERROR)

    def test_settings_ack_with_payload(self) -> None:
        h = Harness()
        h.send(frame(0x4, 0x1, 0, b"\x00\x04\x00\x00\xff\xff"))
        self.assertConnectionError(h, ErrorCodes.FRAME_SIZE_ERROR)

    def test_ping_on_a_stream(self) -> None:
        h = Harness()
        h.send(frame(0x6, 0, 3, b"12345678"))
        self.assertConnectionError(h, ErrorCodes.PROTOCOL_ERROR)

    def test_ping_wrong_length(self) -> None:
        h = Harness()
        h.send(frame(0x6, 0, 0, b"1234567"))
        self.assertConnectionError(h, ErrorCodes.FRAME_SIZE_ERROR)

    def test_error_fails_open_streams(self) -> None:
        """
        A connection error while a response is in progress: the request
        learns that its connection is gone.
        """
        app = App()
        h = Harness(app)
        h.get(path=b"/wait")
        [req] = app.waiting
        lost: list[Any] = []
        req.notifyFinish().addErrback(lost.append)
        h.send(frame(0x6, 0, 3, b"12345678"))
        self.assertConnectionError(h, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(len(lost), 1)

    def test_peer_that_does_not_read_is_aborted(self) -> None:
        """
        After a connection error the transport closes once our GOAWAY is
        out; a peer that never reads it is cut off after a while.
        """
        h = Harness()
        aborted: list[bool] = []
        h.transport.abortConnection = lambda: aborted.append(True)
        h.send(frame(0x6, 0, 3, b"12345678"))
        self.assertTrue(h.closed)
        h.reactor.advance(ABORT_TIMEOUT)
        self.assertEqual(aborted, [True])

    def test_closed_connection_is_not_aborted_later(self) -> None:
        h = Harness()
        aborted: list[bool] = []
        h.transport.abortConnection = lambda: aborted.append(True)
        h.send(frame(0x6, 0, 3, b"12345678"))
        h.channel.connectionLost(None)
        h.reactor.advance(ABORT_TIMEOUT)
        self.assertEqual(aborted, [])


class OrphanStreamTests(SynchronousTestCase):
    def test_data_on_answered_stream_keeps_connection_window(self) -> None:
        """
        Request body bytes arriving for a stream that was already answered
        (and reset by the client) are dropped, but still given back to the
        connection's flow-control window.
        """
        app = App()
        h = Harness(app)
        h.client.send_headers(1, [(n, v) for n, v in REQUEST if n != b":method"]
                              + [(b":method", b"POST")])
        h.flush()
        h.frames()
        h.channel._requestDone(1)
        for _ in range(4):
            h.send(frame(0x0, 0, 1, b"x" * 16000))
        updates = [f for f in h.frames() if isinstance(f, WindowUpdateFrame)
                   and f.stream_id == 0]
        self.assertTrue(updates)
        self.assertFalse(h.closed)


class FlowControlTests(SynchronousTestCase):
    def test_negative_window(self) -> None:
        """
        A smaller SETTINGS_INITIAL_WINDOW_SIZE after data was sent makes the
        stream's window negative: nothing is sent (no error) until
        WINDOW_UPDATEs make it positive again.
        """
        h = Harness(settings={SettingCodes.INITIAL_WINDOW_SIZE: 3})
        h.get()
        fs = h.frames()
        self.assertEqual(data_of(fs), b"012")
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2})
        h.flush()
        self.assertEqual(data_of(h.frames()), b"")
        self.assertEqual(h.channel.conn.local_flow_control_window(1), -1)
        h.client.increment_flow_control_window(2, stream_id=1)
        h.flush()
        self.assertEqual(data_of(h.frames()), b"3")
        h.client.increment_flow_control_window(100, stream_id=1)
        h.flush()
        fs = h.frames()
        self.assertEqual(data_of(fs), b"456789")
        self.assertIn("END_STREAM", [f for f in fs if isinstance(f, DataFrame)][-1].flags)
        self.assertFalse(h.closed)

    def test_zero_window_waits_without_spinning(self) -> None:
        """
        With a zero window the send loop waits (no zero-delay call stays
        scheduled) and resumes when SETTINGS opens the window.
        """
        h = Harness(settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        h.get()
        self.assertEqual(data_of(h.frames()), b"")
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1})
        h.flush()
        self.assertEqual(data_of(h.frames()), b"0")
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        h.flush()
        self.assertEqual(data_of(h.frames()), b"123456789")

    def test_connection_window(self) -> None:
        """
        The connection window caps every stream; a connection-level
        WINDOW_UPDATE resumes them.
        """
        big = b"a" * 70000
        h = Harness(App(big))
        h.get()
        self.assertEqual(len(data_of(h.frames())), 65535)
        h.client.increment_flow_control_window(10000)
        h.client.increment_flow_control_window(10000, stream_id=1)
        h.flush()
        self.assertEqual(len(data_of(h.frames())), 70000 - 65535)


class ClientGoAwayTests(SynchronousTestCase):
    def test_goaway_without_streams_closes(self) -> None:
        h = Harness()
        h.client.close_connection()
        h.flush()
        self.assertTrue(h.closed)
        self.assertEqual(goaways(h.frames()), [])

    def test_goaway_then_ping_in_one_read(self) -> None:
        """
        A PING right behind the client's GOAWAY is answered or dropped, never
        taken for a protocol error.
        """
        h = Harness()
        h.send(frame(0x7, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x00h2spec")
               + frame(0x6, 0, 0, b"h2spec\x00\x00"))
        fs = h.frames()
        self.assertEqual(goaways(fs), [])
        self.assertTrue(h.closed)
        self.assertIsNone(h.transport.producer)

    def test_goaway_lets_open_stream_finish(self) -> None:
        app = App()
        h = Harness(app)
        h.get(path=b"/wait")
        h.client.close_connection(last_stream_id=0)
        h.flush()
        self.assertFalse(h.closed)
        h.send(frame(0x6, 0, 0, b"pingpong"))
        [ack] = [f for f in h.frames() if isinstance(f, PingFrame)]
        self.assertIn("ACK", ack.flags)
        [req] = app.waiting
        req.write(b"late")
        req.finish()
        h.pump()
        self.assertEqual(data_of(h.frames()), b"late")
        self.assertTrue(h.closed)

    def test_goaway_with_error_closes_at_once(self) -> None:
        app = App()
        h = Harness(app)
        h.get(path=b"/wait")
        h.send(frame(0x7, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x02"))
        self.assertTrue(h.closed)
        self.assertEqual(goaways(h.frames()), [])


class ShutdownTests(SynchronousTestCase):
    def test_idle_closes_at_once(self) -> None:
        h = Harness()
        h.channel.close_when_idle()
        self.assertEqual(goaways(h.frames()), [ErrorCodes.NO_ERROR])
        self.assertTrue(h.closed)
        self.assertIsNone(h.transport.producer)

    def test_open_stream_completes_newer_refused(self) -> None:
        """
        GOAWAY names the last stream taken; that stream's response still
        goes out, a newer stream is refused, then the connection closes.
        """
        app = App()
        h = Harness(app)
        h.get(1, path=b"/wait")
        h.channel.close_when_idle()
        fs = h.frames()
        [g] = [f for f in fs if isinstance(f, GoAwayFrame)]
        self.assertEqual((g.error_code, g.last_stream_id), (ErrorCodes.NO_ERROR, 1))
        self.assertFalse(h.closed)
        self.assertFalse(h.channel.is_idle())
        h.get(3)
        [rst] = [f for f in h.frames() if isinstance(f, RstStreamFrame)]
        self.assertEqual((rst.stream_id, rst.error_code), (3, ErrorCodes.REFUSED_STREAM))
        self.assertEqual(len(app.waiting), 1)
        [req] = app.waiting
        req.write(b"done")
        req.finish()
        h.pump()
        fs = h.frames()
        self.assertEqual(data_of(fs), b"done")
        self.assertTrue(h.closed)
        self.assertTrue(h.channel.is_idle())

    def test_site_shutdown_uses_channel(self) -> None:
        """
        Through the TLS listener's protocol: ALPN h2 builds an H2Channel and
        the site's shutdown drains it.
        """
        reactor = MemoryReactorClock()
        site = ProxySite(App(), reactor, secure=True)
        p = site.buildProtocol(None)
        t = NegotiatedTransport()
        p.makeConnection(t)
        p.dataReceived(PREFACE + frame(0x4, 0, 0, b""))
        self.assertIsInstance(p._channel, H2Channel)
        done: list[None] = []
        site.shutdown(10).addCallback(done.append)
        self.assertTrue(t.disconnecting)
        p.connectionLost(None)
        self.assertEqual(done, [None])


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_connection_times_out(self) -> None:
        h = Harness()
        h.reactor.advance(IDLE)
        self.assertEqual(goaways(h.frames()), [ErrorCodes.NO_ERROR])
        self.assertTrue(h.closed)

    def test_busy_connection_does_not(self) -> None:
        """
        A stream waiting for its response (a long poll) keeps the connection
        open past the idle timeout; once it is done the timeout applies.
        """
        app = App()
        h = Harness(app)
        h.get(path=b"/wait")
        h.reactor.advance(IDLE * 3)
        self.assertFalse(h.closed)
        [req] = app.waiting
        req.write(b"x")
        req.finish()
        h.pump()
        h.reactor.advance(IDLE)
        self.assertTrue(h.closed)


class WritingTransport(StringTransport):
    """
    Counts the writes the channel makes.
    """

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class SendBatchingTests(SynchronousTestCase):
    """
    What the streams write during one reactor iteration goes out together:
    as many frames as the windows allow, the last data frame ending the
    stream, in one write to the transport.
    """

    def harness(self, app: App) -> Harness:
        h = Harness(app)
        h.transport = WritingTransport()
        h.channel.transport = h.transport
        return h

    def test_small_response_in_one_write(self) -> None:
        """
        Headers and body of a response finished at once go to the transport
        in one write, and the body's only DATA frame carries END_STREAM (no
        empty DATA frame after it).
        """
        app = App()
        h = self.harness(app)
        h.get(path=b"/wait")
        [req] = app.waiting
        h.transport.writes = 0
        req.write(b"hello")
        req.finish()
        h.pump()
        fs = [f for f in h.frames() if f.stream_id == 1]
        self.assertEqual([type(f) for f in fs], [HeadersFrame, DataFrame])
        self.assertEqual(fs[1].data, b"hello")
        self.assertIn("END_STREAM", fs[1].flags)
        self.assertEqual(h.transport.writes, 1)

    def test_many_frames_in_one_iteration(self) -> None:
        """
        A body of several frames (within the window) is sent in one reactor
        iteration and one write, not one frame per iteration.
        """
        app = App()
        h = self.harness(app)
        h.get(path=b"/wait")
        [req] = app.waiting
        h.frames()
        req.write(b"a" * 40000)
        h.transport.writes = 0
        h.reactor.advance(0)
        fs = [f for f in h.frames() if isinstance(f, DataFrame)]
        self.assertEqual(len(fs), 3)
        self.assertEqual(sum(len(f.data) for f in fs), 40000)
        self.assertEqual(h.transport.writes, 1)
        req.finish()
        h.pump()
        [last] = [f for f in h.frames() if isinstance(f, DataFrame)]
        self.assertIn("END_STREAM", last.flags)

    def test_streams_written_together_share_one_write(self) -> None:
        """
        Data written to several streams in one iteration goes out in one
        write at the start of the next.
        """
        app = App()
        h = self.harness(app)
        for sid in (1, 3, 5):
            h.get(sid, path=b"/wait")
        h.frames()
        for req in app.waiting:
            req.write(b"part")
        h.transport.writes = 0
        h.reactor.advance(0)
        fs = [f for f in h.frames() if isinstance(f, DataFrame)]
        self.assertEqual(sorted(f.stream_id for f in fs), [1, 3, 5])
        self.assertEqual(h.transport.writes, 1)

    def test_send_budget_yields_to_other_connections(self) -> None:
        """
        Past SEND_BUDGET bytes the loop stops and the rest goes out in a
        later run (scheduled with a zero delay, after the other
        connections' calls), in a write of its own.
        """
        from mproxy.http import h2 as h2mod

        self.patch(h2mod, "SEND_BUDGET", 20000)
        app = App()
        h = self.harness(app)
        h.get(path=b"/wait")
        [req] = app.waiting
        h.frames()
        req.write(b"a" * 60000)
        h.transport.writes = 0
        h.pump()
        self.assertEqual(len(data_of(h.frames())), 60000)
        # 16384 + 16384 bytes (over the budget), then 16384 + 10848
        self.assertEqual(h.transport.writes, 2)


class ResponseHeaderTests(SynchronousTestCase):
    def test_response_headers_normalized(self) -> None:
        """
        Response header names are sent lowercase, connection-specific
        fields are dropped, values are stripped, and credentials are sent
        never-indexed.
        """
        from hpack import Decoder, NeverIndexedHeaderTuple

        class Headers(App):
            def render(self, request: Any) -> Any:
                request.responseHeaders.setRawHeaders(b"X-Thing", [b" v "])
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
                request.responseHeaders.setRawHeaders(b"Keep-Alive", [b"timeout=5"])
                request.responseHeaders.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
                request.responseHeaders.setRawHeaders(b"Authorization", [b"secret"])
                return b"ok"

        h = Harness(Headers())
        h.get()
        [hf] = [f for f in h.frames() if isinstance(f, HeadersFrame)]
        headers = Decoder().decode(hf.data, raw=True)
        names = [n for n, _ in headers]
        self.assertEqual(names[0], b":status")
        self.assertIn((b"x-thing", b"v"), headers)
        for n in names:
            self.assertEqual(n, n.lower())
        for gone in (b"connection", b"keep-alive", b"transfer-encoding"):
            self.assertNotIn(gone, names)
        [auth] = [x for x in headers if x[0] == b"authorization"]
        self.assertIsInstance(auth, NeverIndexedHeaderTuple)


class ReceiveTests(SynchronousTestCase):
    def test_frames_not_formatted_on_receipt(self) -> None:
        """
        Received frames are not formatted for a log nobody reads (hyper-h2
        builds each frame's repr for its trace line).
        """
        def no_repr(self: Any) -> str:
            raise AssertionError("a frame was formatted")

        self.patch(Frame, "__repr__", no_repr)
        h = Harness()
        h.get()
        self.assertEqual(data_of(h.frames()), b"0123456789")


class RequestHeaderCheckTests(SynchronousTestCase):
    """
    L{request_headers} accepts, normalizes and refuses exactly what
    hyper-h2's own inbound pipeline does.
    """

    BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
            (b":authority", b"a.test")]

    CASES = {
        "plain": BASE,
        "regular fields": BASE + [(b"user-agent", b"x/1"), (b"accept", b"*/*"), (b"x", b"")],
        "cookies joined last": [BASE[0], (b"cookie", b"a=1")] + BASE[1:]
        + [(b"x", b"y"), (b"cookie", b"b=2")],
        "cookie with spaces inside": BASE + [(b"cookie", b"a=1 "), (b"cookie", b" b=2")],
        "cookie with space at the end": BASE + [(b"cookie", b"a=1 ")],
        "host only": BASE[:3] + [(b"host", b"a.test")],
        "host equal": BASE + [(b"host", b"a.test")],
        "host differs": BASE + [(b"host", b"b.test")],
        "two hosts": BASE[:3] + [(b"host", b"a"), (b"host", b"a")],
        "no authority": BASE[:3],
        "uppercase name": BASE + [(b"X-Thing", b"1")],
        "space in name": BASE + [(b"x thing", b"1")],
        "non-ascii name": BASE + [(b"x\xe9", b"1")],
        "colon in name": BASE + [(b"x:y", b"1")],
        "empty name": BASE + [(b"", b"1")],
        "nul in value": BASE + [(b"x", b"a\x00b")],
        "lf in value": BASE + [(b"x", b"a\nb")],
        "cr in value": BASE + [(b"x", b"a\rb")],
        "leading space": BASE + [(b"x", b" a")],
        "trailing tab": BASE + [(b"x", b"a\t")],
        "connection": BASE + [(b"connection", b"close")],
        "keep-alive": BASE + [(b"keep-alive", b"5")],
        "transfer-encoding": BASE + [(b"transfer-encoding", b"chunked")],
        "te trailers": BASE + [(b"te", b"trailers")],
        "te gzip": BASE + [(b"te", b"gzip")],
        "pseudo after regular": BASE[:3] + [(b"x", b"1"), BASE[3]],
        "duplicate pseudo": BASE + [(b":path", b"/x")],
        "custom pseudo": BASE + [(b":foo", b"1")],
        "status in request": BASE + [(b":status", b"200")],
        "empty path": [BASE[0], BASE[1], (b":path", b""), BASE[3]],
        "no method": BASE[1:],
        "no scheme": [BASE[0], BASE[2], BASE[3]],
        "no path": [BASE[0], BASE[1], BASE[3]],
        "connect": [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],
        "connect with path": [(b":method", b"CONNECT"), (b":authority", b"a:1"),
                              (b":path", b"/")],
        "extended connect": [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                             (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")],
        "protocol without connect": BASE + [(b":protocol", b"websocket")],
    }

    def hyper_h2(self, headers: Any, flags: Any) -> Any:
        from h2.utilities import normalize_inbound_headers, validate_headers

        return list(validate_headers(normalize_inbound_headers(headers, flags), flags))

    def test_same_as_hyper_h2(self) -> None:
        from h2.exceptions import ProtocolError
        from h2.utilities import HeaderValidationFlags
        from hpack import HeaderTuple, NeverIndexedHeaderTuple

        from mproxy.http.h2 import request_headers

        flags = HeaderValidationFlags(is_client=False, is_trailer=False,
                                      is_response_header=False, is_push_promise=False)
        for name, headers in self.CASES.items():
            headers = [HeaderTuple(n, v) for n, v in headers]
            try:
                expected = self.hyper_h2(headers, flags)
            except ProtocolError:
                expected = ProtocolError
            try:
                got = request_headers(headers, flags)
            except ProtocolError:
                got = ProtocolError
            if expected is ProtocolError:
                self.assertIs(got, ProtocolError, name)
                continue
            self.assertEqual(got, expected, name)
            self.assertEqual([type(h) for h in got], [type(h) for h in expected], name)
            self.assertTrue(any(isinstance(h, NeverIndexedHeaderTuple) for h in got)
                            or not any(h[0] == b"cookie" for h in got), name)

    def test_bad_request_header_is_connection_error(self) -> None:
        """
        A request header block that breaks a rule is a PROTOCOL_ERROR for
        the connection.
        """
        h = Harness()
        # an uppercase name (hyper-h2's client refuses to send one itself)
        bad = Encoder().encode(list(REQUEST) + [(b"X-Bad", b"1")])
        h.send(frame(0x1, 0x5, 1, bad))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])
        self.assertTrue(h.closed)


class SchedulingTests(SynchronousTestCase):
    def test_streams_take_turns(self) -> None:
        """
        Streams with data send one frame each in turn; a client's priority
        signals are accepted (no error) and do not change the order.
        """
        from hyperframe.frame import PriorityFrame

        app = App()
        h = Harness(app)
        h.get(1, path=b"/wait")
        h.get(3, path=b"/wait")
        # stream 3 depends on stream 1 (it would wait for it under RFC 7540)
        pf = PriorityFrame(3)
        pf.depends_on = 1
        pf.stream_weight = 255
        h.send(pf.serialize())
        h.frames()
        for req in app.waiting:
            req.write(b"b" * 20000)
        h.pump()
        order = [f.stream_id for f in h.frames() if isinstance(f, DataFrame)]
        self.assertEqual(order, [1, 3, 1, 3])
        self.assertFalse(h.closed)

    def test_round_robin_scheduler(self) -> None:
        import priority

        from mproxy.http.h2 import RoundRobin

        rr = RoundRobin(maximum_streams=3)
        self.assertRaises(priority.DeadlockError, next, rr)
        rr.insert_stream(1)
        rr.insert_stream(3)
        self.assertRaises(priority.DuplicateStreamError, rr.insert_stream, 1)
        self.assertEqual([next(rr) for _ in range(4)], [1, 3, 1, 3])
        rr.block(1)
        self.assertEqual([next(rr) for _ in range(2)], [3, 3])
        rr.unblock(1)
        rr.reprioritize(1, depends_on=3, weight=200)
        self.assertEqual(sorted(next(rr) for _ in range(2)), [1, 3])
        rr.remove_stream(3)
        self.assertEqual(next(rr), 1)
        for bad in (rr.block, rr.unblock, rr.remove_stream, rr.reprioritize):
            self.assertRaises(priority.MissingStreamError, bad, 3)
        rr.insert_stream(5)
        rr.insert_stream(7)
        self.assertRaises(priority.TooManyStreamsError, rr.insert_stream, 9)
        rr.block(1)
        rr.block(5)
        rr.block(7)
        self.assertRaises(priority.DeadlockError, next, rr)
