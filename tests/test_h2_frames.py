"""
L{mproxy.http.h2frames}: HPACK blocks and frames written without
hyper-h2's objects, checked by hpack's decoder and hyperframe's parser;
and the responses an L{mproxy.http.h2.H2Channel} sends with them.
"""

from __future__ import annotations

from typing import Any

import h2.events
from h2.settings import SettingCodes
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, Frame, HeadersFrame
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http import h2frames
from mproxy.http.h2frames import (
    data_frame_head,
    encode_block,
    encode_field,
    encode_response,
    headers_frame,
    response_block,
)
from tests.test_h2 import Harness
from tests.test_h2_streams import Exchanges


def parse(data: bytes) -> Frame:
    f, length = Frame.parse_frame_header(memoryview(data[:9]))
    f.parse_body(memoryview(data[9:9 + length]))
    return f


class EncodeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        headers = [
            (b":status", b"200"),                   # static, exact
            (b":status", b"418"),                   # static name
            (b"content-type", b"text/html"),        # static name
            (b"x-request-id", b"abc"),              # literal name
            (b"x-long", b"v" * 300),                # multi-byte length
            (b"x-empty", b""),
            (b"x" * 200, b"long name"),
        ]
        block = encode_block(headers)
        self.assertEqual(Decoder().decode(block, raw=True), headers)
        self.assertEqual(block[:1], b"\x88")

    def test_never_indexed(self) -> None:
        block = encode_block([NeverIndexedHeaderTuple(b"authorization", b"secret"),
                              NeverIndexedHeaderTuple(b"x-secret", b"1")])
        decoded = Decoder().decode(block, raw=True)
        self.assertEqual(decoded, [(b"authorization", b"secret"), (b"x-secret", b"1")])
        for field in decoded:
            self.assertIsInstance(field, NeverIndexedHeaderTuple)

    def test_dynamic_table_untouched(self) -> None:
        """
        The blocks add nothing to the decoder's dynamic table, so they can
        be mixed with blocks from hpack's encoder on one connection.
        """
        encoder, decoder = Encoder(), Decoder()
        first = encoder.encode([(b"x-a", b"1")])
        self.assertEqual(decoder.decode(first, raw=True), [(b"x-a", b"1")])
        ours = encode_block([(b"x-b", b"2"), (b"x-a", b"1")])
        self.assertEqual(decoder.decode(ours, raw=True), [(b"x-b", b"2"), (b"x-a", b"1")])
        self.assertEqual(len(decoder.header_table.dynamic_entries), 1)
        again = encoder.encode([(b"x-a", b"1")])
        self.assertEqual(len(again), 1)  # still indexed where hpack put it
        self.assertEqual(decoder.decode(again, raw=True), [(b"x-a", b"1")])

    def test_cache_is_bounded(self) -> None:
        self.patch(h2frames, "FIELD_CACHE", 10)
        for i in range(50):
            encode_field(b"x-n", b"%d" % i)
        self.assertLessEqual(len(h2frames._plain), 10)
        self.assertEqual(Decoder().decode(encode_field(b"x-n", b"7"), raw=True), [(b"x-n", b"7")])

    def test_response_normalized(self) -> None:
        """
        L{encode_response} encodes what L{response_block} makes of a head:
        names lowercased, values stripped, connection-specific fields
        dropped, credentials never indexed; the same again from its cache.
        """
        headers = [(b"Content-Type", b"text/plain"), (b"Connection", b"close"),
                   (b"X-Pad", b" v\t"), (b"Authorization", b"secret"),
                   [b"X-List", b"1"], (b"Transfer-Encoding", b"chunked")]
        expected = response_block(404, headers)
        self.assertEqual(expected, [(b":status", b"404"), (b"content-type", b"text/plain"),
                                    (b"x-pad", b"v"), (b"authorization", b"secret"),
                                    (b"x-list", b"1")])
        for _ in range(2):
            decoded = Decoder().decode(encode_response(404, headers), raw=True)
            self.assertEqual(decoded, expected)
            self.assertIsInstance(decoded[3], NeverIndexedHeaderTuple)

    def test_frames(self) -> None:
        f = parse(headers_frame(5, b"\x88", True))
        self.assertIsInstance(f, HeadersFrame)
        self.assertEqual((f.stream_id, f.data), (5, b"\x88"))
        self.assertEqual(f.flags, {"END_HEADERS", "END_STREAM"})
        f = parse(data_frame_head(7, 3, False) + b"abc")
        self.assertIsInstance(f, DataFrame)
        self.assertEqual((f.stream_id, f.data, f.flags), (7, b"abc", set()))
        self.assertEqual(parse(data_frame_head(7, 0, True)).flags, {"END_STREAM"})


class ChannelTests(SynchronousTestCase):
    def responses(self, h: Harness) -> list[Any]:
        return [e for e in h.client.receive_data(h.transport.value())
                if isinstance(e, (h2.events.ResponseReceived, h2.events.DataReceived,
                                  h2.events.StreamEnded))]

    def test_client_reads_responses(self) -> None:
        """
        hyper-h2's client reads the heads and bodies the channel writes,
        its flow-control accounting agrees, and a table size the client
        lowers is announced at the start of the next block.
        """
        app = Exchanges()
        h = Harness(app)
        h.get(1)
        h.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 256})
        h.flush()
        h.get(3)
        h.transport.clear()
        first, second = app.got
        for rq, body in ((first, b"one"), (second, b"two!")):
            rq.start_response(200, None, [(b"Content-Type", b"text/plain"),
                                          (b"Content-Length", b"%d" % len(body))], len(body))
            rq.write(body)
            rq.finish()
        h.pump()
        wire = h.transport.value()
        blocks = [f.data for f in h.frames() if isinstance(f, HeadersFrame)]
        # a dynamic table size update (001xxxxx) first, then never again
        self.assertEqual([b[0] & 0xE0 == 0x20 for b in blocks], [True, False])
        h.transport.write(wire)
        events = self.responses(h)
        heads = {e.stream_id: e.headers for e in events
                 if isinstance(e, h2.events.ResponseReceived)}
        self.assertEqual(heads[1], [(b":status", b"200"), (b"content-type", b"text/plain"),
                                    (b"content-length", b"3")])
        bodies = {e.stream_id: e.data for e in events if isinstance(e, h2.events.DataReceived)}
        self.assertEqual(bodies, {1: b"one", 3: b"two!"})
        self.assertEqual(sorted(e.stream_id for e in events
                                if isinstance(e, h2.events.StreamEnded)), [1, 3])
        self.assertEqual(h.client.inbound_flow_control_window,
                         h.channel.conn.outbound_flow_control_window)
        self.assertFalse(h.closed)

    def test_head_larger_than_a_frame(self) -> None:
        """
        A head too large for one HEADERS frame goes out with CONTINUATION
        frames (hyper-h2's way), and the client reads it.
        """
        app = Exchanges()
        h = Harness(app)
        h.get()
        [rq] = app.got
        rq.start_response(200, None, [(b"X-Big", b"b" * 20000), (b"Content-Length", b"2")], 2)
        rq.write(b"ok")
        rq.finish()
        h.pump()
        events = self.responses(h)
        [head] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertIn((b"x-big", b"b" * 20000), head.headers)
        self.assertEqual([e.data for e in events if isinstance(e, h2.events.DataReceived)],
                         [b"ok"])


class DecodeTests(SynchronousTestCase):
    def test_same_as_hpack(self) -> None:
        """
        L{decode_block} gives what hpack's decoder gives, for a client's
        blocks in turn (literals that fill the dynamic table, then blocks
        of indexed fields only), and leaves the table as hpack leaves it.
        """
        from mproxy.http.h2 import decode_block

        fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a"),
                  (b":authority", b"x.test"), (b"user-agent", b"t/1")]
        encoder = Encoder()
        blocks = [encoder.encode(fields), encoder.encode(fields),
                  encoder.encode(fields[:3] + [(b":path", b"/b")] + fields[3:]),
                  encoder.encode(fields)]
        self.assertTrue(all(b >= 0x80 for b in blocks[1]))
        ours, theirs = Decoder(), Decoder()
        for block in blocks:
            got = decode_block(ours, block)
            expected = theirs.decode(block, raw=True)
            self.assertEqual([tuple(f) for f in got], [tuple(f) for f in expected])
        self.assertEqual(list(ours.header_table.dynamic_entries),
                         list(theirs.header_table.dynamic_entries))

    def test_bad_indexed_blocks(self) -> None:
        """
        An index past both tables, index 0, or a header list over the
        limit in a block of indexed fields is the error hpack reports.
        """
        import h2.exceptions

        from mproxy.http.h2 import decode_block

        for block in (b"\x82\x86\xc6", b"\x82\x80"):
            self.assertRaises(h2.exceptions.ProtocolError, decode_block, Decoder(), block)
        small = Decoder(max_header_list_size=50)
        self.assertRaises(h2.exceptions.DenialOfServiceError, decode_block, small,
                          b"\x82\x86\x84\x87")

    def test_indexed_block_past_the_table_is_compression_error(self) -> None:
        from h2.errors import ErrorCodes

        from tests.test_h2 import frame, goaways

        h = Harness()
        h.send(frame(0x1, 0x5, 1, b"\x82\x86\x84\xc6"))
        self.assertEqual(goaways(h.frames()), [ErrorCodes.COMPRESSION_ERROR])
        self.assertTrue(h.closed)
