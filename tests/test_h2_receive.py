"""
The receiving side of L{mproxy.http.h2.ServerConnection}: whole requests
(one HEADERS frame ending its stream) taken by its own frame loop as light
streams, WINDOW_UPDATE and RST_STREAM for them, the remembered header
blocks, and every other frame handed to hyper-h2 in order, with the same
connection and stream errors.
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http.h2 import (
    _REQUEST_FLAGS,
    H2Channel,
    request_fields,
    request_headers,
)
from mproxy.http.server import ProxySite
from tests.test_h2 import (
    IDLE,
    PREFACE,
    REQUEST,
    Harness,
    Reactor,
    RequestHeaderCheckTests,
    data_of,
    frame,
    goaways,
)
from tests.test_h2_streams import Consumer, Exchanges, Producer

PING = frame(0x6, 0, 0, b"12345678")


def string(s: bytes) -> bytes:
    assert len(s) < 127
    return bytes((len(s),)) + s


def whole(stream_id: int, block: bytes) -> bytes:
    """
    A HEADERS frame with END_HEADERS and END_STREAM.
    """
    return frame(0x1, 0x5, stream_id, block)


def block_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    return Encoder().encode(headers)


def answer(rq: Any, body: bytes = b"ok") -> None:
    rq.start_response(200, None, [(b"content-type", b"text/plain")], len(body))
    rq.write(body)
    rq.finish()


def resets(frames: list[Any]) -> list[tuple[int, int]]:
    return [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]


def pinged(frames: list[Any]) -> bool:
    return any(isinstance(f, PingFrame) and "ACK" in f.flags for f in frames)


class RequestFieldsTests(SynchronousTestCase):
    """
    L{request_fields} refuses what L{request_headers} refuses, and gives
    what the channel made of L{request_headers}' list: the method, the
    path, the regular fields (cookies joined, last) with C{host} first from
    C{:authority} when there is no C{Host}.
    """

    def expected(self, headers: list[Any]) -> Any:
        fields = request_headers(headers, _REQUEST_FLAGS)
        method = path = authority = b""
        raw = []
        host = False
        for name, value in fields:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name[:1] != b":":
                host = host or name == b"host"
                raw.append((name, value))
        if not host:
            raw.insert(0, (b"host", authority))
        return method, path, raw

    def test_same_as_request_headers(self) -> None:
        for name, headers in RequestHeaderCheckTests.CASES.items():
            headers = [HeaderTuple(n, v) for n, v in headers]
            try:
                expected = self.expected(headers)
            except ProtocolError:
                self.assertRaises(ProtocolError, request_fields, headers)
                continue
            got = request_fields(headers)
            self.assertEqual(got, expected, name)
            # plain tuples, whatever hpack gave
            self.assertEqual({type(f) for f in got[2]}, {tuple}, name)

    def test_table_tuples_kept(self) -> None:
        """
        Fields that are plain tuples (the HPACK table's own) are passed on
        as they are.
        """
        field = (b"user-agent", b"x")
        method, path, raw = request_fields(
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
             (b"host", b"a"), field])
        self.assertIs(raw[1], field)
        self.assertEqual((method, path), (b"GET", b"/"))

    def test_never_indexed_cookie_is_a_field(self) -> None:
        method, path, raw = request_fields(
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
             (b":authority", b"a"), NeverIndexedHeaderTuple(b"cookie", b"a=1")])
        self.assertEqual(raw, [(b"host", b"a"), (b"cookie", b"a=1")])


class WholeRequestTests(SynchronousTestCase):
    def test_light_stream(self) -> None:
        """
        A whole request reaches the resource without a hyper-h2 stream; its
        response is a HEADERS and a DATA frame ending the stream, which is
        then remembered as closed by its end.
        """
        app = Exchanges()
        h = Harness(app)
        h.send(whole(1, block_of(REQUEST + [(b"cookie", b"a=1"), (b"cookie", b"b=2")])))
        [rq] = app.got
        conn = h.channel.conn
        self.assertIn(1, conn._light)
        self.assertNotIn(1, conn.streams)
        self.assertEqual((rq.method, rq.uri), (b"GET", b"/"))
        self.assertEqual(rq.raw_headers, [(b"host", b"example.com"), (b"cookie", b"a=1; b=2")])
        self.assertEqual(conn.open_inbound_streams, 1)
        answer(rq)
        h.pump()
        fs = h.frames()
        [head] = [f for f in fs if isinstance(f, HeadersFrame)]
        [data] = [f for f in fs if isinstance(f, DataFrame)]
        self.assertNotIn("END_STREAM", head.flags)
        self.assertIn("END_STREAM", data.flags)
        self.assertEqual(data.data, b"ok")
        self.assertEqual(Decoder().decode(head.data, raw=True)[0], (b":status", b"200"))
        self.assertNotIn(1, conn._light)
        self.assertEqual(conn._stream_closed_by(1), StreamClosedBy.SEND_END_STREAM)
        self.assertEqual(conn.open_inbound_streams, 0)
        self.assertTrue(h.channel.is_idle())
        # its window and the connection's were spent
        self.assertEqual(conn.outbound_flow_control_window, 65535 - 2)

    def test_first_request_opens_connection(self) -> None:
        app = Exchanges()
        h = Harness(app)
        conn = h.channel.conn
        self.assertEqual(conn.state_machine.state.name, "IDLE")
        h.send(whole(1, block_of(REQUEST)))
        self.assertEqual(conn.state_machine.state.name, "SERVER_OPEN")
        self.assertEqual(conn.highest_inbound_stream_id, 1)

    def test_preface_and_request_in_one_read(self) -> None:
        """
        The client's first read: the preface, its SETTINGS and a request.
        """
        app = Exchanges()
        h = Harness.__new__(Harness)
        h.app = app
        h.reactor = Reactor()
        h.site = ProxySite(app, h.reactor, secure=True)
        h.transport = StringTransport()
        h.channel = H2Channel(h.site, h.reactor, IDLE)
        h.channel.makeConnection(h.transport)
        h._buf = b""
        h.send(PREFACE[:5])
        h.send(PREFACE[5:] + frame(0x4, 0, 0, b"") + whole(1, block_of(REQUEST)))
        [rq] = app.got
        self.assertIn(1, h.channel.conn._light)
        self.assertTrue(any(isinstance(f, SettingsFrame) and "ACK" in f.flags
                            for f in h.frames()))

    def test_bad_preface_before_request(self) -> None:
        app = Exchanges()
        h = Harness.__new__(Harness)
        h.reactor = Reactor()
        h.transport = StringTransport()
        h.channel = H2Channel(ProxySite(app, h.reactor, secure=True), h.reactor, IDLE)
        h.channel.makeConnection(h.transport)
        h._buf = b""
        h.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + whole(1, block_of(REQUEST)))
        self.assertEqual(app.got, [])
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_frames_split_across_reads(self) -> None:
        """
        Frames arrive byte by byte: each is taken once it is complete.
        """
        app = Exchanges()
        h = Harness(app)
        wire = whole(1, block_of(REQUEST)) + PING + whole(3, block_of(REQUEST))
        for i in range(len(wire)):
            h.send(wire[i:i + 1])
        self.assertEqual([rq.stream_id for rq in app.got], [1, 3])
        self.assertTrue(pinged(h.frames()))

    def test_other_frames_between(self) -> None:
        """
        Frames for hyper-h2 between whole requests in one read are taken in
        order: a request with a body, a PING, a padded request.
        """
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        post = [(n, b"POST" if n == b":method" else v) for n, v in REQUEST]
        first = whole(1, enc.encode(REQUEST)) + frame(0x1, 0x4, 3, enc.encode(post))
        padded = b"\x03" + enc.encode(REQUEST) + b"\x00\x00\x00"
        h.send(first + PING + frame(0x1, 0xD, 5, padded) + whole(7, enc.encode(REQUEST))
               + frame(0x0, 0x1, 3, b"body"))
        # (the body without a declared length is collected first)
        self.assertEqual([rq.stream_id for rq in app.got], [1, 5, 7, 3])
        body = Consumer()
        body.attach(app.got[3])
        self.assertEqual((body.data, body.ended), ([b"body"], True))
        conn = h.channel.conn
        self.assertEqual(sorted(conn._light), [1, 7])
        self.assertEqual(sorted(conn.streams), [3, 5])
        self.assertTrue(pinged(h.frames()))
        for rq in app.got:
            answer(rq, b"%d" % rq.stream_id)
        h.pump()
        fs = h.frames()
        for sid in (1, 3, 5, 7):
            self.assertEqual(data_of(fs, sid), b"%d" % sid)

    def test_priority_flag_goes_to_hyper_h2(self) -> None:
        app = Exchanges()
        h = Harness(app)
        h.send(frame(0x1, 0x25, 1, b"\x00\x00\x00\x00\x0f" + block_of(REQUEST)))
        [rq] = app.got
        self.assertIn(1, h.channel.conn.streams)
        answer(rq)
        h.pump()
        self.assertEqual(data_of(h.frames()), b"ok")

    def test_continuation(self) -> None:
        """
        A header block continued in CONTINUATION frames goes to hyper-h2,
        and the frames after it are taken as usual.
        """
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        b = enc.encode(REQUEST + [(b"x-long", b"v" * 50)])
        h.send(frame(0x1, 0x1, 1, b[:10]) + frame(0x9, 0x0, 1, b[10:20])
               + frame(0x9, 0x4, 1, b[20:]) + whole(3, enc.encode(REQUEST)))
        self.assertEqual([rq.stream_id for rq in app.got], [1, 3])
        self.assertEqual(app.got[0].raw_headers[-1], (b"x-long", b"v" * 50))
        self.assertIn(3, h.channel.conn._light)

    def test_continuation_split_across_reads(self) -> None:
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        b = enc.encode(REQUEST)
        h.send(frame(0x1, 0x1, 1, b[:5]))
        h.send(frame(0x9, 0x4, 1, b[5:]) + whole(3, enc.encode(REQUEST)))
        self.assertEqual([rq.stream_id for rq in app.got], [1, 3])

    def test_frame_inside_header_block(self) -> None:
        h = Harness(Exchanges())
        b = block_of(REQUEST)
        h.send(frame(0x1, 0x1, 1, b[:5]) + whole(3, block_of(REQUEST)))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])
        self.assertTrue(h.closed)

    def test_oversized_frame(self) -> None:
        h = Harness(Exchanges())
        h.send(whole(1, block_of(REQUEST)))
        h.send(whole(3, b"\x82" * 16385))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.FRAME_SIZE_ERROR])

    def test_invalid_padding(self) -> None:
        h = Harness(Exchanges())
        h.send(whole(1, block_of(REQUEST)))
        h.send(frame(0x1, 0xD, 3, b"\x40" + block_of(REQUEST)))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_even_stream_id(self) -> None:
        h = Harness(Exchanges())
        h.send(whole(2, block_of(REQUEST)))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_stream_id_reused(self) -> None:
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        h.send(whole(5, enc.encode(REQUEST)))
        h.send(whole(3, enc.encode(REQUEST)))
        self.assertEqual(len(app.got), 1)
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_bad_field_is_connection_error(self) -> None:
        h = Harness(Exchanges())
        h.send(whole(1, block_of(REQUEST + [(b"connection", b"close")])))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_response_head_instead_of_request(self) -> None:
        h = Harness(Exchanges())
        h.send(whole(1, block_of([(b":status", b"200")])))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_too_many_streams(self) -> None:
        """
        Light streams count against SETTINGS_MAX_CONCURRENT_STREAMS.
        """
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        limit = h.channel.conn.local_settings.max_concurrent_streams
        h.send(b"".join(whole(2 * i + 1, enc.encode(REQUEST)) for i in range(limit)))
        self.assertEqual(len(app.got), limit)
        self.assertEqual(goaways(h.frames()), [])
        answer(app.got[0])
        h.pump()
        # one finished: one more fits
        h.send(whole(2 * limit + 1, enc.encode(REQUEST)))
        self.assertEqual(len(app.got), limit + 1)
        h.send(whole(2 * limit + 3, enc.encode(REQUEST)))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])
        self.assertEqual(len(app.got), limit + 1)

    def test_refused_after_our_goaway(self) -> None:
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        h.send(whole(1, enc.encode(REQUEST)))
        h.channel.close_when_idle()
        h.send(whole(3, enc.encode(REQUEST)))
        self.assertEqual(len(app.got), 1)
        self.assertEqual(resets(h.frames()), [(3, ErrorCodes.REFUSED_STREAM)])
        self.assertEqual(h.channel.conn._stream_closed_by(3), StreamClosedBy.SEND_RST_STREAM)
        answer(app.got[0])
        h.pump()
        self.assertEqual(data_of(h.frames()), b"ok")
        self.assertTrue(h.closed)


class HeaderBlockMemoryTests(SynchronousTestCase):
    """
    A whole request's header block of indexed fields is remembered, and
    used again only while the decoder's table stays as it was.
    """

    AUTH = b"\x41" + string(b"a.test")    # :authority, incremental indexing

    def test_repeated_block_remembered(self) -> None:
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        h.send(whole(1, enc.encode(REQUEST)))
        again = enc.encode(REQUEST)
        h.send(whole(3, again) + whole(5, again))
        conn = h.channel.conn
        self.assertIn(again, conn._wholes)
        self.assertEqual(app.got[1].raw_headers, app.got[2].raw_headers)
        # each request has a list of its own
        self.assertIsNot(app.got[1].raw_headers, app.got[2].raw_headers)
        self.assertEqual(app.got[2].raw_headers, [(b"host", b"example.com")])

    def test_table_changed(self) -> None:
        """
        The same indexed block after the table changed means other fields.
        """
        app = Exchanges()
        h = Harness(app)
        start = b"\x82\x87\x84"
        # table: [x-a 1, :authority a.test]
        h.send(whole(1, start + self.AUTH + b"\x40" + string(b"x-a") + string(b"1")))
        indexed = start + b"\xbf\xbe"
        h.send(whole(3, indexed) + whole(5, indexed))
        # table: [x-a 2, :authority a.test, x-a 1, :authority a.test]
        h.send(whole(7, start + self.AUTH + b"\x40" + string(b"x-a") + string(b"2")))
        h.send(whole(9, indexed))
        got = [dict(rq.raw_headers)[b"x-a"] for rq in app.got]
        self.assertEqual(got, [b"1", b"1", b"1", b"2", b"2"])

    def test_indexing_block_decoded_every_time(self) -> None:
        """
        A block that adds to the table adds every time it is sent.
        """
        app = Exchanges()
        h = Harness(app)
        adding = b"\x82\x87\x84" + self.AUTH + b"\x40" + string(b"x-a") + string(b"1")
        h.send(whole(1, adding) + whole(3, adding))
        # the fourth entry exists only if both blocks added theirs
        h.send(whole(5, b"\x82\x87\x84\xc1\xbe"))
        self.assertEqual(goaways(h.frames()), [])
        self.assertEqual(len(app.got), 3)
        self.assertEqual(app.got[2].raw_headers, [(b"host", b"a.test"), (b"x-a", b"1")])

    def test_header_list_size_still_checked(self) -> None:
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        h.send(whole(1, enc.encode(REQUEST)))
        again = enc.encode(REQUEST)
        h.send(whole(3, again))
        h.channel.conn.decoder.max_header_list_size = 10
        h.send(whole(5, again))
        self.assertEqual(len(app.got), 2)
        self.assertEqual(goaways(h.frames()), [ErrorCodes.ENHANCE_YOUR_CALM])


class LightStreamFrameTests(SynchronousTestCase):
    """
    What the client may send on a light stream (half-closed on its side),
    and what it may not.
    """

    def harness(self, settings: dict[int, int] | None = None) -> tuple[Harness, Any]:
        app = Exchanges()
        h = Harness(app, settings=settings)
        h.send(whole(1, block_of(REQUEST)))
        [rq] = app.got
        h.frames()
        return h, rq

    def test_window_update_resumes_producer(self) -> None:
        h, rq = self.harness({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        p = Producer()
        rq.registerProducer(p, True)
        rq.start_response(200, None, [], None)
        rq.write(b"x" * 12)
        self.assertEqual(p.calls, ["pause"])
        h.pump()
        self.assertEqual(len(data_of(h.frames())), 10)
        self.assertIn(1, h.channel.conn._light)
        h.send(frame(0x8, 0, 1, (100).to_bytes(4, "big")))
        self.assertEqual(p.calls, ["pause", "resume"])
        self.assertEqual(len(data_of(h.frames())), 2)
        self.assertEqual(h.channel.conn.local_flow_control_window(1), 98)
        self.assertIn(1, h.channel.conn._light)

    def test_window_update_overflow_resets_stream(self) -> None:
        h, rq = self.harness()
        lost = []
        rq.notifyFinish().addErrback(lambda f: lost.append(f))
        h.send(frame(0x8, 0, 1, (2**31 - 1).to_bytes(4, "big")) + PING)
        fs = h.frames()
        self.assertEqual(resets(fs), [(1, ErrorCodes.FLOW_CONTROL_ERROR)])
        self.assertTrue(pinged(fs))
        self.assertEqual(len(lost), 1)
        self.assertFalse(h.closed)

    def test_connection_window_overflow(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x8, 0, 0, (2**31 - 1).to_bytes(4, "big")))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.FLOW_CONTROL_ERROR])

    def test_connection_window_update(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x8, 0, 0, (1000).to_bytes(4, "big")))
        self.assertEqual(h.channel.conn.outbound_flow_control_window, 65535 + 1000)

    def test_zero_increment(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x8, 0, 1, b"\x00\x00\x00\x00"))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.PROTOCOL_ERROR])

    def test_window_update_wrong_length(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x8, 0, 1, b"\x00\x00\x00\x01\x00"))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.FRAME_SIZE_ERROR])

    def test_rst_stream_wrong_length(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x3, 0, 1, b"\x00\x00\x08"))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.FRAME_SIZE_ERROR])

    def test_client_reset(self) -> None:
        """
        RST_STREAM ends the exchange; later frames for the stream get what
        hyper-h2 answers for a stream closed by a reset.
        """
        h, rq = self.harness()
        lost = []
        rq.notifyFinish().addErrback(lambda f: lost.append(f))
        h.send(frame(0x3, 0, 1, (ErrorCodes.CANCEL).to_bytes(4, "big")))
        self.assertEqual(len(lost), 1)
        self.assertTrue(h.channel.is_idle())
        conn = h.channel.conn
        self.assertEqual(conn._stream_closed_by(1), StreamClosedBy.RECV_RST_STREAM)
        # ignored
        h.send(frame(0x8, 0, 1, (5).to_bytes(4, "big")))
        self.assertEqual(h.frames(), [])
        h.send(frame(0x0, 0, 1, b"late"))
        self.assertEqual(resets(h.frames()), [(1, ErrorCodes.STREAM_CLOSED)])
        self.assertFalse(h.closed)

    def test_data_on_light_stream(self) -> None:
        """
        DATA after END_STREAM: the stream error STREAM_CLOSED.
        """
        h, rq = self.harness()
        h.send(frame(0x0, 0, 1, b"more") + PING)
        fs = h.frames()
        self.assertEqual(resets(fs), [(1, ErrorCodes.STREAM_CLOSED)])
        self.assertTrue(pinged(fs))
        self.assertFalse(h.closed)

    def test_headers_on_light_stream(self) -> None:
        """
        A second HEADERS after END_STREAM is a stream error, and its block
        still updates the decoder's table.
        """
        app = Exchanges()
        h = Harness(app)
        h.send(whole(1, b"\x82\x87\x84\x41" + string(b"a.test")))
        h.send(frame(0x1, 0x5, 1, b"\x40" + string(b"x-a") + string(b"1")))
        self.assertEqual(resets(h.frames()), [(1, ErrorCodes.STREAM_CLOSED)])
        h.send(whole(3, b"\x82\x87\x84\xbf\xbe"))
        self.assertEqual(app.got[-1].raw_headers, [(b"host", b"a.test"), (b"x-a", b"1")])

    def test_priority_promotes(self) -> None:
        """
        A PRIORITY frame makes the light stream one of hyper-h2's, in the
        same state: its response goes on, with its window.
        """
        h, rq = self.harness({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        rq.start_response(200, None, [], None)
        rq.write(b"x" * 4)
        h.pump()
        self.assertEqual(len(data_of(h.frames())), 4)
        h.send(frame(0x2, 0, 1, b"\x00\x00\x00\x00\x10"))
        conn = h.channel.conn
        self.assertNotIn(1, conn._light)
        self.assertIn(1, conn.streams)
        self.assertEqual(conn.local_flow_control_window(1), 6)
        rq.write(b"y" * 6)
        rq.finish()
        h.pump()
        fs = h.frames()
        self.assertEqual(data_of(fs), b"y" * 6)
        self.assertIn("END_STREAM", [f for f in fs if isinstance(f, DataFrame)][-1].flags)
        self.assertEqual(goaways(fs), [])
        self.assertTrue(h.channel.is_idle())

    def test_self_dependency(self) -> None:
        h, rq = self.harness()
        h.send(frame(0x2, 0, 1, b"\x00\x00\x00\x01\x10"))
        self.assertEqual(resets(h.frames()) + goaways(h.frames()), [])

    def test_initial_window_size_changes(self) -> None:
        h, rq = self.harness()
        conn = h.channel.conn
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
        h.flush()
        self.assertEqual(conn.local_flow_control_window(1), 100)
        # and a new stream starts with it
        h.send(whole(3, block_of(REQUEST)))
        self.assertEqual(conn.local_flow_control_window(3), 100)
        h.send(frame(0x8, 0, 1, (2**31 - 1 - 100).to_bytes(4, "big")))
        self.assertIn(1, conn._light)
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 101})
        h.flush()
        self.assertEqual(goaways(h.frames()), [ErrorCodes.FLOW_CONTROL_ERROR])

    def test_server_reset(self) -> None:
        h, rq = self.harness()
        rq.abort()
        h.pump()
        self.assertEqual(resets(h.frames()), [(1, ErrorCodes.INTERNAL_ERROR)])
        conn = h.channel.conn
        self.assertEqual(conn._stream_closed_by(1), StreamClosedBy.SEND_RST_STREAM)
        self.assertTrue(h.channel.is_idle())

    def test_closed_streams_remembered_bounded(self) -> None:
        from mproxy.http import h2 as h2mod

        self.patch(h2mod, "MAX_CLOSED_LIGHT", 4)
        app = Exchanges()
        h = Harness(app)
        enc = Encoder()
        for i in range(6):
            h.send(whole(2 * i + 1, enc.encode(REQUEST)))
            answer(app.got[-1])
            h.pump()
        conn = h.channel.conn
        self.assertLessEqual(len(conn._closed_light), 4)
        self.assertIsNone(conn._stream_closed_by(1))
        self.assertEqual(conn._stream_closed_by(11), StreamClosedBy.SEND_END_STREAM)

    def test_head_only_response(self) -> None:
        h, rq = self.harness()
        rq.start_response(204, None, [], 0)
        rq.finish()
        h.pump()
        [head] = h.frames()
        self.assertIsInstance(head, HeadersFrame)
        self.assertIn("END_STREAM", head.flags)
        self.assertEqual(h.channel.conn._stream_closed_by(1), StreamClosedBy.SEND_END_STREAM)

    def test_rapid_reset(self) -> None:
        """
        Resets of light streams count against the Rapid Reset budget.
        """
        app = Exchanges()
        h = Harness(app)
        h.channel._resetTokenBurst = h.channel._resetTokens = 5
        enc = Encoder()
        out = b""
        for i in range(10):
            sid = 2 * i + 1
            out += whole(sid, enc.encode(REQUEST)) + frame(0x3, 0, sid, b"\x00\x00\x00\x08")
        h.send(out)
        self.assertEqual(goaways(h.frames()), [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(h.closed)
