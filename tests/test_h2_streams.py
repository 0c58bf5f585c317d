"""
The streams of L{mproxy.http.h2.H2Channel} as the exchanges the proxy
drives (L{mproxy.http.h2exchange.H2Request}): request bodies streamed
with per-stream flow control, response heads, resets, and the send
window pausing the response's producer.
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import HeadersFrame, RstStreamFrame, WindowUpdateFrame
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mproxy.http import h2 as h2mod
from mproxy.http.h2exchange import H2Request
from mproxy.http.interfaces import ITunnelExchange
from tests.doubles import Producer
from tests.test_h2 import REQUEST, Harness, data_of


class Exchanges(Resource):
    """
    Keeps every exchange it is given, unanswered.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def render(self, request: Any) -> Any:
        self.got.append(request)
        return NOT_DONE_YET


class Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = False
        self.errors: list[Any] = []

    def attach(self, rq: Any) -> None:
        rq.set_body_consumer(self.data.append, self.end, lambda *e: self.errors.append(e))

    def end(self) -> None:
        self.ended = True


def post(h: Harness, stream_id: int = 1, length: int | None = None,
         extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(n, b"POST" if n == b":method" else v) for n, v in REQUEST]
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    h.client.send_headers(stream_id, headers + (extra or []))
    h.flush()


def frames_to_client(h: Harness) -> list[Any]:
    """
    The server's frames since the last look, also given to the client.
    """
    wire = h.transport.value()
    fs = h.frames()
    h.client.receive_data(wire)
    return fs


def window_updates(frames: list[Any], stream_id: int) -> int:
    return sum(f.window_increment for f in frames
               if isinstance(f, WindowUpdateFrame) and f.stream_id == stream_id)


class ExchangeTests(SynchronousTestCase):
    def test_exchange_of_a_get(self) -> None:
        """
        A stream reaches the resource as an L{H2Request}: the proxy's
        exchange, with C{:authority} as the C{host} field and no body.
        """
        app = Exchanges()
        h = Harness(app)
        h.client.send_headers(1, [(n, b"/p?q=1" if n == b":path" else v) for n, v in REQUEST]
                              + [(b"user-agent", b"t/1")], end_stream=True)
        h.flush()
        [rq] = app.got
        self.assertIsInstance(rq, H2Request)
        self.assertTrue(ITunnelExchange.providedBy(rq))
        self.assertEqual((rq.method, rq.uri, rq.path, rq.query, rq.clientproto),
                         (b"GET", b"/p?q=1", b"/p", b"q=1", b"HTTP/2.0"))
        self.assertEqual(rq.raw_headers, [(b"host", b"example.com"), (b"user-agent", b"t/1")])
        self.assertEqual((rq.body_length, rq.upgrade), (0, False))

    def test_response_without_body_is_one_frame(self) -> None:
        """
        A response finished without body bytes is one HEADERS frame that
        ends the stream, and the stream is forgotten.
        """
        app = Exchanges()
        h = Harness(app)
        h.get()
        [rq] = app.got
        rq.start_response(204, None, [(b"X-A", b"1")], 0)
        rq.finish()
        h.pump()
        fs = [f for f in h.frames() if f.stream_id == 1]
        self.assertEqual([type(f) for f in fs], [HeadersFrame])
        self.assertIn("END_STREAM", fs[0].flags)
        self.assertTrue(h.channel.is_idle())

    def test_head_response_sends_no_body(self) -> None:
        app = Exchanges()
        h = Harness(app)
        h.client.send_headers(1, [(n, b"HEAD" if n == b":method" else v) for n, v in REQUEST],
                              end_stream=True)
        h.flush()
        [rq] = app.got
        rq.start_response(200, None, [(b"Content-Length", b"5")], 5)
        rq.write(b"hello")
        rq.finish()
        h.pump()
        fs = h.frames()
        self.assertEqual(data_of(fs), b"")
        self.assertTrue(h.channel.is_idle())

    def test_abort_resets_only_the_stream(self) -> None:
        app = Exchanges()
        h = Harness(app)
        h.get(1)
        h.get(3)
        first, second = app.got
        first.start_response(200, None, [], None)
        first.write(b"part")
        first.abort()
        h.pump()
        fs = h.frames()
        [rst] = [f for f in fs if isinstance(f, RstStreamFrame)]
        self.assertEqual(rst.stream_id, 1)
        self.assertFalse(h.closed)
        second.start_response(200, None, [], 2)
        second.write(b"ok")
        second.finish()
        h.pump()
        self.assertEqual(data_of(h.frames(), 3), b"ok")

    def test_client_reset_calls_lost_handler(self) -> None:
        app = Exchanges()
        h = Harness(app)
        h.get()
        [rq] = app.got
        lost: list[bool] = []
        rq.set_lost_handler(lambda: lost.append(True))
        h.client.reset_stream(1, ErrorCodes.CANCEL)
        h.flush()
        self.assertEqual(lost, [True])
        self.assertTrue(h.channel.is_idle())
        # writing after the reset is harmless
        rq.start_response(200, None, [], None)
        rq.write(b"late")
        rq.finish()
        h.pump()
        self.assertEqual(data_of(h.frames()), b"")

    def test_send_window_pauses_producer(self) -> None:
        """
        The response's producer is paused while the stream's send window
        (less what is queued) is used up, and resumed by a WINDOW_UPDATE.
        """
        app = Exchanges()
        h = Harness(app, settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
        h.get()
        [rq] = app.got
        p = Producer()
        rq.registerProducer(p, True)
        rq.start_response(200, None, [], None)
        rq.write(b"x" * 12)
        self.assertEqual(p.calls, ["pause"])
        h.pump()
        self.assertEqual(len(data_of(h.frames())), 10)
        h.client.increment_flow_control_window(100, stream_id=1)
        h.flush()
        self.assertEqual(p.calls, ["pause", "resume"])
        self.assertEqual(len(data_of(h.frames())), 2)


class ProxyTests(SynchronousTestCase):
    def test_request_logged(self) -> None:
        """
        Through the proxy resource: an unrouted HTTP/2 request gets the 404
        page and its Request log line, with the HTTP/2 protocol and the
        client's address.
        """
        import io
        import json

        from twisted.internet.testing import MemoryReactorClock

        from mproxy.http.proxy import build_http_factory
        from mproxy.logging import JSONLogger
        from mproxy.router import Router

        out = io.StringIO()
        site = build_http_factory(MemoryReactorClock(), Router(), JSONLogger(out), secure=True)
        h = Harness(site.resource)
        h.get(path=b"/nowhere?x=1")
        h.pump()
        heads = [f for f in h.frames() if isinstance(f, HeadersFrame)]
        from hpack import Decoder

        self.assertEqual(Decoder().decode(heads[0].data, raw=True)[0], (b":status", b"404"))
        [line] = [json.loads(x) for x in out.getvalue().splitlines()
                  if json.loads(x)["msg"] == "Request"]
        peer = h.transport.getPeer()
        self.assertEqual(
            (line["status"], line["proto"], line["path"], line["query"], line["method"],
             line["client_addr"], line["client_port"], line["host"]),
            (404, "HTTP/2.0", "/nowhere", "x=1", "GET", peer.host, str(peer.port),
             "example.com"))


class RequestBodyTests(SynchronousTestCase):
    def test_declared_length_dispatched_at_headers_and_streamed(self) -> None:
        """
        A body with a Content-Length: the stream is dispatched at its
        headers; each piece reaches the consumer as it arrives and only
        then is its window given back.
        """
        app = Exchanges()
        h = Harness(app)
        post(h, length=40000)
        [rq] = app.got
        self.assertEqual((rq.body_length, rq.body_done), (40000, False))
        h.frames()
        h.client.send_data(1, b"a" * 10000)
        h.flush()
        # not consumed yet: no window given back
        self.assertEqual(window_updates(h.frames(), 1), 0)
        c = Consumer()
        c.attach(rq)
        h.pump()
        self.assertEqual(b"".join(c.data), b"a" * 10000)
        h.client.send_data(1, b"b" * 15000)
        h.client.send_data(1, b"c" * 15000, end_stream=True)
        h.flush()
        self.assertEqual(b"".join(c.data), b"a" * 10000 + b"b" * 15000 + b"c" * 15000)
        self.assertTrue(c.ended)
        self.assertGreater(window_updates(h.frames(), 0), 0)

    def test_paused_consumer_holds_the_window(self) -> None:
        """
        While the body's consumer is paused nothing is delivered or given
        back (the client's window closes); resuming delivers what was held.
        """
        app = Exchanges()
        h = Harness(app)
        post(h, length=60000)
        [rq] = app.got
        c = Consumer()
        c.attach(rq)
        rq.body_producer.pauseProducing()
        h.frames()
        for _ in range(3):
            h.client.send_data(1, b"z" * 16000)
        h.flush()
        self.assertEqual(c.data, [])
        self.assertEqual(window_updates(h.frames(), 1), 0)
        rq.body_producer.resumeProducing()
        h.pump()
        self.assertEqual(len(b"".join(c.data)), 48000)
        self.assertGreater(window_updates(h.frames(), 1), 0)

    def test_small_body_without_length_arrives_whole(self) -> None:
        """
        Without a Content-Length a small body is collected: the stream is
        dispatched at its end, with the body's length.
        """
        app = Exchanges()
        h = Harness(app)
        post(h)
        self.assertEqual(app.got, [])
        h.client.send_data(1, b"q" * 900, end_stream=True)
        h.flush()
        [rq] = app.got
        self.assertEqual((rq.body_length, rq.body_done), (900, True))
        c = Consumer()
        c.attach(rq)
        self.assertEqual((b"".join(c.data), c.ended), (b"q" * 900, True))

    def test_large_body_without_length_is_streamed(self) -> None:
        """
        Past PREBUFFER bytes without an end, the stream is dispatched with
        an unknown length and the rest of the body streams.
        """
        self.patch(h2mod, "PREBUFFER", 1000)
        app = Exchanges()
        h = Harness(app)
        post(h)
        h.client.send_data(1, b"1" * 800)
        h.flush()
        self.assertEqual(app.got, [])
        h.client.send_data(1, b"2" * 800)
        h.flush()
        [rq] = app.got
        self.assertEqual((rq.body_length, rq.body_done), (-1, False))
        c = Consumer()
        c.attach(rq)
        h.client.send_data(1, b"3" * 10, end_stream=True)
        h.flush()
        self.assertEqual(b"".join(c.data), b"1" * 800 + b"2" * 800 + b"3" * 10)
        self.assertTrue(c.ended)

    def test_held_body_does_not_hold_other_streams(self) -> None:
        """
        A body held for a paused consumer closes only its own stream's
        window: the connection's is given back at receipt, so the other
        streams' bodies keep flowing.
        """
        app = Exchanges()
        h = Harness(app)
        post(h, 1, length=100000)
        post(h, 3, length=100000)
        held, other = app.got
        held.body_producer.pauseProducing()
        c = Consumer()
        c.attach(other)
        frames_to_client(h)
        for _ in range(3):
            h.client.send_data(1, b"h" * 16000)
        h.flush()
        fs = frames_to_client(h)
        self.assertEqual(window_updates(fs, 1), 0)
        self.assertEqual(window_updates(fs, 0), 48000)
        for _ in range(3):
            h.client.send_data(3, b"o" * 16000)
        h.flush()
        self.assertEqual(len(b"".join(c.data)), 48000)
        fs = frames_to_client(h)
        self.assertEqual(window_updates(fs, 3), 48000)
        self.assertEqual(window_updates(fs, 0), 48000)

    def test_body_after_the_response_is_dropped(self) -> None:
        """
        Body data arriving once the response is finished is dropped, its
        window given back.
        """
        app = Exchanges()
        h = Harness(app)
        post(h, length=100000)
        [rq] = app.got
        rq.start_response(404, None, [(b"Content-Length", b"0")], 0)
        rq.finish()
        h.pump()
        h.frames()
        for _ in range(3):
            h.client.send_data(1, b"w" * 16000)
        h.flush()
        self.assertEqual(window_updates(h.frames(), 0), 48000)
        self.assertFalse(h.closed)

    def test_expect_continue_when_the_body_is_read(self) -> None:
        app = Exchanges()
        h = Harness(app)
        post(h, length=5, extra=[(b"expect", b"100-continue")])
        [rq] = app.got
        self.assertEqual([f for f in h.frames() if isinstance(f, HeadersFrame)], [])
        rq.send_continue()
        h.pump()
        [hf] = [f for f in h.frames() if isinstance(f, HeadersFrame)]
        from hpack import Decoder

        self.assertEqual(Decoder().decode(hf.data, raw=True), [(b":status", b"100")])

    def test_expect_continue_without_length_dispatched_at_once(self) -> None:
        """
        A client waiting for 100 Continue sends no body until it gets one:
        such a stream is not held back to collect its body.
        """
        app = Exchanges()
        h = Harness(app)
        post(h, extra=[(b"expect", b"100-continue")])
        [rq] = app.got
        self.assertEqual((rq.body_length, rq.body_done), (-1, False))
        c = Consumer()
        c.attach(rq)
        rq.send_continue()
        h.pump()
        self.assertEqual(len([f for f in h.frames() if isinstance(f, HeadersFrame)]), 1)
        h.client.send_data(1, b"body", end_stream=True)
        h.flush()
        self.assertEqual((b"".join(c.data), c.ended), (b"body", True))
