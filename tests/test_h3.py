"""
Unit tests for L{mproxy.http.h3}: the HTTP/3 listener against aioquic's own
client connection, in memory (no sockets), on a L{Clock}.
"""

from __future__ import annotations

import random
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mproxy.config import resolve_config
from mproxy.http.h3 import SEND_HIGH_WATER, H3Exchange, H3Listener, proxy_handler
from mproxy.http.interfaces import IExchange
from mproxy.http.proxy import ProxyResource
from mproxy.logging import ListLogger
from mproxy.tls.testing import make_ca, make_certificate, pem_pair

from tests.test_proxy import FakeRouter

CLIENT = ("10.0.0.7", 50000)
SERVER = ("10.0.0.1", 443)


class FakeUDP:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.stopped = False

    def write(self, data: bytes, addr: Any) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.stopped = True


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


CA = make_ca()
CERTS = {"one.test": make_certificate(["one.test"], issuer=CA),
         "two.test": make_certificate(["two.test"], issuer=CA)}


class Harness:
    """
    An L{H3Listener} and one aioquic client connection, with datagrams
    carried between them by L{pump}.
    """

    def __init__(self, handler: Any, server_name: str = "one.test",
                 select: Any = CERTS.get, idle_timeout: float = 10.0) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.logger = ListLogger()
        self.listener = H3Listener(handler, self.clock, select, logger=self.logger,
                                   idle_timeout=idle_timeout)
        self.udp = FakeUDP()
        self.listener.makeConnection(self.udp)
        self.listener.ports.append(self.udp)
        config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True,
                                   server_name=server_name)
        config.load_verify_locations(cadata=pem_pair(CA)[0])
        self.client = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.client)
        self.quic_events: list[Any] = []
        self.responses: dict[int, dict[str, Any]] = {}
        self.client.connect(SERVER, now=self.clock.seconds())

    def pump(self, rounds: int = 200) -> None:
        """
        Carry datagrams both ways (time goes on by 1 ms a round: both sides
        pace their sending) until nothing moved for a few rounds.
        """
        quiet = 0
        for _ in range(rounds):
            moved = False
            self.clock.advance(0.001)
            now = self.clock.seconds()
            at = self.client.get_timer()
            if at is not None and at <= now:
                self.client.handle_timer(now=now)
            for data, _ in self.client.datagrams_to_send(now=now):
                moved = True
                self.listener.datagramReceived(data, CLIENT)
            written, self.udp.written = self.udp.written, []
            for data, addr in written:
                if addr != CLIENT:
                    continue
                moved = True
                self.client.receive_datagram(data, SERVER, now=now)
            self._client_events()
            quiet = 0 if moved else quiet + 1
            if quiet > 3:
                return

    def _client_events(self) -> None:
        while True:
            event = self.client.next_event()
            if event is None:
                return
            self.quic_events.append(event)
            for h in self.h3.handle_event(event):
                r = self.responses.setdefault(h.stream_id, {"headers": [], "body": b"",
                                                            "ended": False})
                if isinstance(h, HeadersReceived):
                    r["headers"].append(h.headers)
                elif isinstance(h, DataReceived):
                    r["body"] += h.data
                if h.stream_ended:
                    r["ended"] = True

    def request(self, method: bytes = b"GET", path: bytes = b"/", body: bytes = b"",
                headers: list[tuple[bytes, bytes]] = (), end: bool = True) -> int:  # type: ignore[assignment]
        sid = self.client.get_next_available_stream_id()
        self.h3.send_headers(sid, [(b":method", method), (b":scheme", b"https"),
                                   (b":authority", b"one.test"), (b":path", path),
                                   *headers], end_stream=end and not body)
        if body:
            self.h3.send_data(sid, body, end_stream=end)
        self.pump()
        return sid

    def settle(self, seconds: float = 3.0) -> None:
        """
        Let C{seconds} pass in 50 ms steps, carrying datagrams (a closed
        connection tells its application after a draining period).
        """
        for _ in range(int(seconds / 0.05)):
            self.clock.advance(0.05)
            self.pump()

    def terminated(self) -> Any:
        self.settle()
        for e in self.quic_events:
            if isinstance(e, qe.ConnectionTerminated):
                return e
        return None


def serving(exchanges: list[H3Exchange], answer: bool = True) -> Any:
    def handler(ex: H3Exchange) -> None:
        exchanges.append(ex)
        if answer:
            ex.start_response(200, None, [(b"Content-Type", b"text/plain"),
                                          (b"Content-Length", b"2")], 2)
            ex.write(b"hi")
            ex.finish()

    return handler


class ExchangeTests(SynchronousTestCase):
    def test_get(self) -> None:
        """
        A GET reaches the handler as an L{IExchange} (Host from
        C{:authority}, HTTP/3.0, TLS) and its response reaches the client.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen))
        h.pump()
        sid = h.request(path=b"/a/b?x=1", headers=[(b"user-agent", b"t")])
        [ex] = seen
        verifyObject(IExchange, ex)
        self.assertEqual((ex.method, ex.uri, ex.path, ex.query, ex.clientproto, ex.is_tls,
                          ex.body_length),
                         (b"GET", b"/a/b?x=1", b"/a/b", b"x=1", b"HTTP/3.0", True, 0))
        self.assertEqual(ex.raw_headers, [(b"host", b"one.test"), (b"user-agent", b"t")])
        self.assertEqual(ex.client_strings, CLIENT[0:1] + (str(CLIENT[1]),))
        r = h.responses[sid]
        self.assertEqual(r["headers"], [[(b":status", b"200"), (b"content-type", b"text/plain"),
                                         (b"content-length", b"2")]])
        self.assertEqual((r["body"], r["ended"]), (b"hi", True))
        self.assertEqual(ex.sentLength, 2)
        self.assertEqual(h.listener.connections and len(h.listener.connections), 1)
        self.assertEqual(list(h.listener.connections)[0].exchanges, {})

    def test_certificate_per_server_name(self) -> None:
        """
        Each server name gets the certificate C{select} gives for it; no
        certificate refuses the handshake (TLS alert unrecognized_name).
        """
        names: list[Any] = []

        def select(name: Any) -> Any:
            names.append(name)
            return CERTS.get(name)

        for name in ("one.test", "two.test"):
            h = Harness(serving([]), server_name=name, select=select)
            h.pump()
            self.assertTrue(any(isinstance(e, qe.HandshakeCompleted) for e in h.quic_events))
            self.assertEqual(h.client.tls._peer_certificate.serial_number,
                             CERTS[name].leaf.serial_number)
        self.assertEqual(names, ["one.test", "two.test"])
        h = Harness(serving([]), server_name="three.test", select=select)
        h.pump()
        self.assertEqual(h.terminated().error_code, 0x100 + 112)
        self.assertEqual(h.listener.connections, set())

    def test_select_error_refuses(self) -> None:
        """
        A failing certificate lookup is logged with its traceback and
        refuses the handshake.
        """
        def select(name: Any) -> Any:
            raise RuntimeError("boom")

        h = Harness(serving([]), select=select)
        h.pump()
        self.assertIsNotNone(h.terminated())
        [error] = [r for r in h.logger.records if r["level"] == "ERROR"]
        self.assertEqual(error["msg"], "Selecting a certificate for 'one.test' failed")
        self.assertEqual(error["error"], "RuntimeError: boom")
        self.assertIn("RuntimeError", error["traceback"])

    def test_request_body_streamed(self) -> None:
        """
        A request body is queued until a consumer is set, then streamed;
        its end is reported; the length comes from Content-Length, or is
        unknown (-1).
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request(b"POST", body=b"abc", headers=[(b"content-length", b"6")], end=False)
        [ex] = seen
        self.assertEqual(ex.body_length, 6)
        got: list[Any] = []
        ex.set_body_consumer(got.append, lambda: got.append("end"), lambda *a: got.append(a))
        self.assertEqual(got, [b"abc"])
        h.h3.send_data(0, b"def", end_stream=True)
        h.pump()
        self.assertEqual(got, [b"abc", b"def", "end"])
        h.request(b"POST", body=b"x", end=True)
        self.assertEqual(seen[1].body_length, -1)

    def test_request_body_held_while_paused(self) -> None:
        """
        While the body's consumer is paused the stream gets no more credit:
        the client cannot send past its window until it resumes.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request(b"POST", body=b"", headers=[(b"content-length", b"%d" % (8 << 20))],
                  end=False)
        [ex] = seen
        got: list[bytes] = []
        ex.set_body_consumer(got.append, lambda: None, lambda *a: None)
        ex.body_producer.pauseProducing()
        chunk = b"x" * 65536
        for _ in range(128):
            h.h3.send_data(0, chunk, end_stream=False)
            h.pump()
        held = sum(map(len, got))
        self.assertLess(held, 4 << 20)
        ex.body_producer.resumeProducing()
        for _ in range(200):
            h.clock.advance(0.01)
            h.pump()
        self.assertEqual(sum(map(len, got)), 8 << 20)

    def test_response_backpressure(self) -> None:
        """
        The response's producer pauses once the client has more than
        L{SEND_HIGH_WATER} unacknowledged, and resumes when it caught up.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request()
        [ex] = seen
        p = Producer()
        ex.start_response(200, None, [], None)
        ex.registerProducer(p, True)
        while not p.events:
            ex.write(b"y" * 16384)
        self.assertEqual(p.events, ["pause"])
        self.assertGreaterEqual(ex.sentLength, SEND_HIGH_WATER)
        for _ in range(100):
            h.clock.advance(0.01)
            h.pump()
            if "resume" in p.events:
                break
        self.assertEqual(p.events, ["pause", "resume"])
        ex.finish()
        h.pump()
        self.assertTrue(h.responses[0]["ended"])
        self.assertEqual(len(h.responses[0]["body"]), ex.sentLength)

    def test_trailers_and_head(self) -> None:
        """
        Trailers end the stream in a HEADERS frame; a HEAD response sends
        no body; connection headers are dropped.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request()
        h.request(b"HEAD")
        ex, head = seen
        ex.start_response(200, None, [(b"Connection", b"close")], None)
        ex.write(b"a")
        ex.finish([(b"X-Sum", b"1")])
        head.start_response(200, None, [(b"Content-Type", b"text/plain")], None)
        head.write(b"hello")
        head.finish()
        h.pump()
        self.assertEqual(h.responses[0]["headers"], [[(b":status", b"200")], [(b"x-sum", b"1")]])
        self.assertEqual(h.responses[0]["body"], b"a")
        self.assertEqual(h.responses[4]["body"], b"")
        self.assertTrue(h.responses[4]["ended"])

    def test_client_reset(self) -> None:
        """
        A stream the client resets tells the exchange's lost handler.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request(b"POST", body=b"abc", end=False)
        h.request(b"GET")
        lost: list[int] = []
        for ex in seen:
            ex.set_lost_handler(lambda ex=ex: lost.append(ex.stream_id))
        h.client.reset_stream(0, ErrorCode.H3_REQUEST_CANCELLED)
        h.pump()
        self.assertEqual(lost, [0])
        h.client.stop_stream(4, ErrorCode.H3_REQUEST_CANCELLED)
        h.pump()
        self.assertEqual(lost, [0, 4])

    def test_not_origin_form(self) -> None:
        """
        CONNECT and a request target that is not a path get a 400 without
        reaching the handler.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen))
        h.pump()
        sid = h.client.get_next_available_stream_id()
        h.h3.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"one.test:443")],
                          end_stream=False)
        h.pump()
        sid2 = h.request(b"OPTIONS", b"*")
        self.assertEqual(seen, [])
        for s in (sid, sid2):
            self.assertEqual(h.responses[s]["headers"][0][0], (b":status", b"400"))
            self.assertEqual(h.responses[s]["body"], b"<h1>400 Bad Request</h1>")
        h.request()
        self.assertEqual(len(seen), 1)

    def test_header_limits(self) -> None:
        """
        A request target over 8 KiB is a 414, a header section over 64 KiB
        or 100 fields a 431; none reaches the handler.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen))
        h.pump()
        sids = [h.request(path=b"/" + b"a" * 9000),
                h.request(headers=[(b"x-big-%d" % i, b"v" * 30000) for i in range(3)]),
                h.request(headers=[(b"x-%d" % i, b"v") for i in range(101)])]
        self.assertEqual([h.responses[s]["headers"][0][0][1] for s in sids],
                         [b"414", b"431", b"431"])
        self.assertEqual(seen, [])

    def test_unfinished_header_section_bounded(self) -> None:
        """
        A request stream gets no credit past its first window before its
        header section is complete.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen))
        h.pump()
        sid = h.client.get_next_available_stream_id()
        # a HEADERS frame announcing 3 MiB, then its bytes
        size = 3 << 20
        h.client.send_stream_data(sid, b"\x01" + encode_uint_var(size) + b"\x00" * size)
        for _ in range(10):
            h.clock.advance(0.05)
            h.pump()
        session = list(h.listener.connections)[0]
        stream = session.quic._streams[sid]
        self.assertEqual(stream.max_stream_data_local, 1 << 20)
        self.assertLessEqual(stream.receiver.highest_offset, 1 << 20)
        self.assertEqual(seen, [])

    def test_early_response_stops_body(self) -> None:
        """
        A response finished before the request body ended asks the client
        to stop sending it (STOP_SENDING, H3_NO_ERROR).
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen))
        h.pump()
        sid = h.request(b"POST", body=b"part", end=False)
        self.assertEqual(h.responses[sid]["body"], b"hi")
        stops = [e for e in h.quic_events if isinstance(e, qe.StopSendingReceived)]
        self.assertEqual([(e.stream_id, e.error_code) for e in stops],
                         [(sid, ErrorCode.H3_NO_ERROR)])

    def test_abort_resets_stream_only(self) -> None:
        """
        Aborting an exchange resets its stream; the connection serves on.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request()
        seen[0].abort()
        h.pump()
        self.assertTrue(any(isinstance(e, qe.StreamReset) and e.stream_id == 0
                            for e in h.quic_events))
        h.request()
        self.assertEqual(len(seen), 2)
        self.assertIsNone(h.terminated())


class ShutdownTests(SynchronousTestCase):
    def test_graceful(self) -> None:
        """
        Shutdown: open streams complete, new ones are refused, the
        connection closes when the last one is done, then the port stops.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request()
        d = h.listener.shutdown(10)
        h.pump()
        self.assertNoResult(d)
        h.request()
        self.assertEqual(len(seen), 1)
        self.assertTrue(any(isinstance(e, qe.StreamReset) and e.stream_id == 4
                            and e.error_code == ErrorCode.H3_REQUEST_REJECTED
                            for e in h.quic_events))
        ex = seen[0]
        ex.start_response(200, None, [(b"Content-Length", b"2")], 2)
        ex.write(b"ok")
        ex.finish()
        h.pump()
        self.successResultOf(d)
        self.assertEqual(h.responses[0]["body"], b"ok")
        self.assertEqual(h.terminated().error_code, ErrorCode.H3_NO_ERROR)
        self.assertTrue(h.udp.stopped)

    def test_deadline(self) -> None:
        """
        Streams still open at the deadline are cut: their lost handlers run.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False))
        h.pump()
        h.request()
        lost: list[bool] = []
        seen[0].set_lost_handler(lambda: lost.append(True))
        d = h.listener.shutdown(10)
        h.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(lost, [True])
        self.assertEqual(h.listener.connections, set())

    def test_no_new_connections(self) -> None:
        """
        While shutting down a new client's Initial packets are ignored.
        """
        h = Harness(serving([]))
        self.successResultOf(h.listener.shutdown(10))
        h.pump()
        self.assertEqual(h.listener.connections, set())


class TimerTests(SynchronousTestCase):
    def test_idle_timeout(self) -> None:
        """
        A connection the client abandons is gone after the idle timeout.
        """
        h = Harness(serving([]), idle_timeout=5)
        h.pump()
        self.assertEqual(len(h.listener.connections), 1)
        for _ in range(12):
            h.clock.advance(1)
        self.assertEqual(h.listener.connections, set())
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_open_stream_is_not_idle(self) -> None:
        """
        A connection with a request in progress outlives the idle timeout
        however quiet it is (the server pings), and goes idle once done.
        """
        seen: list[H3Exchange] = []
        h = Harness(serving(seen, answer=False), idle_timeout=5)
        h.pump()
        h.request()
        for _ in range(30):
            h.clock.advance(1)
            h.pump()
        self.assertEqual(len(h.listener.connections), 1)
        ex = seen[0]
        ex.start_response(200, None, [(b"Content-Length", b"2")], 2)
        ex.write(b"ok")
        ex.finish()
        h.pump()
        self.assertEqual(h.responses[0]["body"], b"ok")
        for _ in range(12):
            h.clock.advance(1)
        self.assertEqual(h.listener.connections, set())


class FuzzTests(SynchronousTestCase):
    def test_malformed_datagrams(self) -> None:
        """
        Random and mutated datagrams (a bounded number) neither raise nor
        log errors, a real client still gets served among them, and every
        connection they opened is gone after the idle timeout.
        """
        rng = random.Random(11)
        seen: list[H3Exchange] = []
        h = Harness(serving(seen), idle_timeout=5)
        first = h.client.datagrams_to_send(now=h.clock.seconds())
        initial = first[0][0]
        h.listener.datagramReceived(initial, CLIENT)
        h.clock.advance(0.001)
        for i in range(400):
            kind = i % 4
            if kind == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 1500)))
            elif kind == 1:
                data = bytearray(initial)
                for _ in range(rng.randint(1, 20)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            elif kind == 2:
                # a long header with a fresh connection ID, garbage after it
                data = (bytes([0xC0, 0, 0, 0, 1, 8]) + rng.randbytes(8) + bytes([8])
                        + rng.randbytes(8) + rng.randbytes(rng.randint(0, 1300)))
            else:
                data = initial[:rng.randint(0, len(initial))]
            addr = ("10.0.0.%d" % rng.randint(2, 250), rng.randint(1024, 65535))
            h.listener.datagramReceived(data, addr)
        h.pump()
        h.request()
        self.assertEqual(len(seen), 1)
        self.assertEqual(h.responses[0]["body"], b"hi")
        self.assertEqual([r for r in h.logger.records if r["level"] == "ERROR"], [])
        for _ in range(30):
            h.clock.advance(1)
        self.assertEqual(h.listener.connections, set())
        self.assertEqual(h.listener.sessions, {})


class ProxyTests(SynchronousTestCase):
    def test_proxy_request_path(self) -> None:
        """
        Through the proxy resource's request path: no route is the 404
        page, logged as an HTTP/3.0 https request on the HTTPS port.
        """
        logger = ListLogger()
        clock = Clock()
        resource = ProxyResource(FakeRouter(), logger, clock=clock, https_port=8443)
        h = Harness(proxy_handler(resource))
        h.pump()
        sid = h.request(path=b"/nowhere")
        r = h.responses[sid]
        self.assertEqual(r["headers"][0][0], (b":status", b"404"))
        self.assertIn(b"404", r["body"])
        [record] = [rec for rec in logger.records if rec["msg"] == "Request"]
        self.assertEqual((record["proto"], record["scheme"], record["port"], record["status"],
                          record["host"]), ("HTTP/3.0", "https", 8443, 404, "one.test"))

    def test_alt_svc_on_tls_only(self) -> None:
        """
        With C{alt_svc} set, the proxy resource adds it to the responses of
        requests that arrived over TLS (error pages included), not to plain
        HTTP ones.
        """
        from io import BytesIO

        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        resource = ProxyResource(FakeRouter(), ListLogger(), clock=Clock())
        resource.alt_svc = [(b"Alt-Svc", b'h3=":8443"; ma=2592000')]

        def render(secure: bool) -> Any:
            channel = DummyChannel()
            if secure:
                channel.transport = DummyChannel.SSL()
            request = Request(channel)
            request.method, request.uri, request.clientproto = b"GET", b"/", b"HTTP/1.1"
            request.requestHeaders.setRawHeaders(b"host", [b"nowhere.test"])
            request.content = BytesIO(b"")
            resource.render(request)
            self.assertEqual(request.code, 404)
            return request.responseHeaders.getRawHeaders(b"alt-svc")

        self.assertEqual(render(True), [b'h3=":8443"; ma=2592000'])
        self.assertIsNone(render(False))


class UDPReactor(Clock):
    """
    A clock that records C{listenUDP} calls (C{refuse}: interfaces that
    fail with CannotListenError).
    """

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.refuse = refuse
        self.udp: list[tuple[int, Any, str, FakeUDP]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> Any:
        from twisted.internet.error import CannotListenError

        if interface in self.refuse:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        udp = FakeUDP()
        udp.getHost = lambda: type("Host", (), {"port": port or 4433})()  # type: ignore[attr-defined]
        protocol.makeConnection(udp)
        self.udp.append((port, protocol, interface, udp))
        return udp


class ServiceTests(SynchronousTestCase):
    def site(self) -> Any:
        return type("Site", (), {"resource": ProxyResource(FakeRouter(), ListLogger(),
                                                           clock=Clock()),
                                 "idle_timeout": 30.0})()

    def test_binds_on_the_https_port(self) -> None:
        """
        The service listens on UDP at the port the HTTPS listener got
        (dual-stack C{::} without C{--bind}), turns Alt-Svc on for the site,
        and on stop drains, closes the port and turns Alt-Svc off.
        """
        from mproxy.http.h3 import HTTP3Service

        reactor = UDPReactor()
        site = self.site()
        service = HTTP3Service(reactor, site, CERTS.get, ListLogger(), bind="",
                               https_port=lambda: 8443, grace=10)
        service.privilegedStartService()
        service.startService()
        [(port, protocol, interface, udp)] = reactor.udp
        self.assertEqual((port, interface, service.port, service.name),
                         (8443, "::", 8443, "http3"))
        self.assertIs(protocol, service.listener)
        self.assertEqual(site.resource.alt_svc, [(b"Alt-Svc", b'h3=":8443"; ma=2592000')])
        self.successResultOf(service.stopService())
        self.assertTrue(udp.stopped)
        self.assertIsNone(site.resource.alt_svc)

    def test_bind_address_and_failure(self) -> None:
        """
        With C{--bind} only that address is tried; a port that cannot be
        bound stops start-up with a clear error, and no Alt-Svc is sent.
        """
        from mproxy.http.h3 import HTTP3Service
        from mproxy.listeners import StartupError

        reactor = UDPReactor(refuse=("127.0.0.1",))
        site = self.site()
        service = HTTP3Service(reactor, site, CERTS.get, ListLogger(), bind="127.0.0.1",
                               https_port=lambda: 8443, grace=10)
        e = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertIn("cannot listen for HTTP/3 (UDP) on port 8443", str(e))
        self.assertIsNone(site.resource.alt_svc)

    def test_only_with_http3(self) -> None:
        """
        The server's tree has the HTTP/3 service only with C{--http3}.
        """
        from mproxy.config import ServerConfig
        from mproxy.tree import build_service

        names = []
        for on in (False, True):
            config = ServerConfig(state_dir=self.mktemp(), socket=self.mktemp(), http3=on)
            svc = build_service(UDPReactor(), config, ListLogger())
            names.append([str(listener.name) for listener in svc.listeners])
        self.assertEqual(names, [["http", "https"], ["http", "https", "http3"]])


class ConfigTests(SynchronousTestCase):
    def test_http3_option(self) -> None:
        """
        HTTP/3 is off by default; C{--http3} or C{MPROXY_HTTP3}/C{HTTP3}
        turn it on.
        """
        self.assertFalse(resolve_config({}, {}).http3)
        self.assertTrue(resolve_config({"http3": True}, {}).http3)
        self.assertTrue(resolve_config({}, {"MPROXY_HTTP3": "true"}).http3)
        self.assertTrue(resolve_config({}, {"HTTP3": "1"}).http3)
