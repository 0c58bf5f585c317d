"""
HTTP/2 protocol errors against the HTTPS port of a real C{mproxy run}
(TLS, ALPN h2): one test per class of error a conformance suite probes.
Each crafted input (valid parts from the C{hpack} library, invalid parts
as raw bytes) must end in a GOAWAY with the right error code and a closed
connection within a few seconds, never a connection left open; and the
server logs no error for what a client did wrong.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from typing import Any

from hpack import Encoder
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame, SettingsFrame
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess, listen_upstream
from mproxy.tls.testing import make_ca, make_certificate, pem_pair

HOST = "h2.test"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: generous: a closed connection is noticed at once, this only bounds a hang
CLOSE_WITHIN = 5.0

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
COMPRESSION_ERROR = 0x9

DATA, HEADERS, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream_id.to_bytes(4, "big") + payload)


def setting(ident: int, value: int) -> bytes:
    return ident.to_bytes(2, "big") + value.to_bytes(4, "big")


def request_block(encoder: Encoder | None = None, path: str = "/") -> bytes:
    return (encoder or Encoder()).encode([
        (":method", "GET"), (":scheme", "https"), (":path", path), (":authority", HOST)])


class Probe:
    """
    A blocking HTTP/2-over-TLS client that sends whatever bytes it is
    given and reads frames until the server closes.
    """

    def __init__(self, port: int, cafile: str) -> None:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.buf = b""
        self.frames: list[Frame] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, settings: bytes = b"") -> None:
        """
        Client preface and SETTINGS; waits for the server's SETTINGS and
        acknowledges it.
        """
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        while not any(isinstance(f, SettingsFrame) and "ACK" not in f.flags
                      for f in self.frames):
            if not self.read(CLOSE_WITHIN):
                raise AssertionError("no SETTINGS from the server")
        self.send(frame(SETTINGS, ACK, 0, b""))

    def read(self, timeout: float) -> bool:
        """
        Read once (up to C{timeout} seconds); False on timeout or close.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buf += data
        while len(self.buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            f.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            self.frames.append(f)
        return True

    def until_closed(self, within: float = CLOSE_WITHIN) -> list[Frame]:
        """
        Everything the server sends until it closes; stops waiting after
        C{within} seconds (then C{closed} stays false).
        """
        deadline = time.monotonic() + within
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.read(left)
        self.sock.close()
        return self.frames

    def wait_for(self, kind: type, within: float = CLOSE_WITHIN) -> Frame | None:
        deadline = time.monotonic() + within
        seen = len(self.frames)
        while True:
            for f in self.frames[seen:]:
                if isinstance(f, kind):
                    return f
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if self.closed or left <= 0 or not self.read(left):
                for f in self.frames[seen:]:
                    if isinstance(f, kind):
                        return f
                return None


def connection_error(port: int, cafile: str, data: bytes, handshake: bool = True,
                     settings: bytes = b"") -> tuple[list[int], bool]:
    """
    Send C{data} (after the handshake unless told otherwise); returns the
    GOAWAY error codes received and whether the connection was closed.
    """
    p = Probe(port, cafile)
    if handshake:
        p.handshake(settings)
    p.send(data)
    frames = p.until_closed()
    return [f.error_code for f in frames if isinstance(f, GoAwayFrame)], p.closed


class H2ConformanceTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        chain, key = pem_pair(make_certificate([HOST], issuer=ca))
        self.cafile = os.path.join(work, "ca.pem")
        paths = {}
        for name, data in (("ca.pem", pem_pair(ca)[0]), ("cert.pem", chain), ("key.pem", key)):
            paths[name] = os.path.join(work, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        self.app, listening = listen_upstream(reactor, "conformance-app")
        self.addCleanup(listening.stopListening)
        self.proxy = MproxyProcess(reactor, os.path.join(work, "proxy"))
        yield self.proxy.start()
        self.addCleanup(self.proxy.stop, signal.SIGKILL)
        r = yield self.proxy.command(
            "deploy", f"127.0.0.1:{listening.getHost().port}", "--host", HOST, "--tls",
            "--tls-certificate-path", paths["cert.pem"],
            "--tls-private-key-path", paths["key.pem"], "--health-check-interval", "100ms")
        self.assertEqual(r.status, 0, r.err)

    def tearDown(self) -> None:
        errors = [r for r in self.proxy.records if r.get("level") in ("ERROR", "CRITICAL")]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def assertConnectionErrors(self, code: int, cases: dict[str, Any]) -> Any:
        """
        Each case (bytes, or keyword arguments of L{connection_error}) on a
        connection of its own ends in a GOAWAY with C{code} and a close.
        """
        for name, case in cases.items():
            kw = case if isinstance(case, dict) else {"data": case}
            codes, closed = yield deferToThread(
                connection_error, self.proxy.https_port, self.cafile, **kw)
            self.assertEqual((name, codes, closed), (name, [code], True))

    def test_invalid_preface(self) -> Any:
        """
        An invalid connection preface: GOAWAY(PROTOCOL_ERROR), closed.
        """
        return self.assertConnectionErrors(PROTOCOL_ERROR, {
            "not a preface": {"data": b"INVALID CONNECTION PREFACE\r\n\r\n",
                              "handshake": False},
            "HTTP/1.1 over h2": {"data": b"GET / HTTP/1.1\r\nHost: h2.test\r\n\r\n",
                                 "handshake": False},
        })

    def test_header_block_decoding_errors(self) -> Any:
        """
        Every kind of undecodable header block is a COMPRESSION_ERROR for
        the whole connection.
        """
        def headers(block: bytes) -> bytes:
            return frame(HEADERS, END_STREAM | END_HEADERS, 1, block)

        return self.assertConnectionErrors(COMPRESSION_ERROR, {
            "truncated literal": headers(b"\x40"),
            "index past both tables": headers(request_block() + b"\xc6"),
            "literal with a name index past both tables": headers(
                request_block() + b"\x7f\x01\x01a"),
            "index 0": headers(request_block() + b"\x80"),
            "Huffman padding longer than 7 bits": headers(
                request_block() + b"\x00\x85\xf2\xb2\x4a\x84\xff\x84\x49\x50\x9f\xff"),
            "Huffman padded with zeros": headers(
                request_block() + b"\x00\x85\xf2\xb2\x4a\x84\xff\x83\x49\x50\x90"),
            "Huffman EOS symbol": headers(
                request_block() + b"\x00\x85\xf2\xb2\x4a\x84\xff\x87\x49\x51\xff\xff\xff\xfa\x7f"),
            "table size update at the end": headers(request_block() + b"\x21"),
            "table size update above SETTINGS_HEADER_TABLE_SIZE": headers(
                b"\x3f\xe2\x1f" + request_block()),
        })

    def test_frame_size_errors(self) -> Any:
        """
        Frames of a length their type does not allow: FRAME_SIZE_ERROR.
        """
        return self.assertConnectionErrors(FRAME_SIZE_ERROR, {
            "SETTINGS ACK with a payload": frame(SETTINGS, ACK, 0, setting(0x4, 65535)),
            "SETTINGS not a multiple of 6": frame(SETTINGS, 0, 0, b"\x00\x03\x00"),
            "PING of 7 bytes": frame(PING, 0, 0, b"1234567"),
            "WINDOW_UPDATE of 3 bytes": frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"),
            "frame above SETTINGS_MAX_FRAME_SIZE": frame(
                HEADERS, END_STREAM | END_HEADERS, 1, request_block() + b"\x00" * 16384),
        })

    def test_protocol_errors(self) -> Any:
        """
        Frames on the wrong stream or in the wrong place: PROTOCOL_ERROR.
        """
        return self.assertConnectionErrors(PROTOCOL_ERROR, {
            "PING on a stream": frame(PING, 0, 3, b"12345678"),
            "SETTINGS on a stream": frame(SETTINGS, 0, 1, b""),
            "DATA on stream 0": frame(DATA, END_STREAM, 0, b"x"),
            "HEADERS with an even stream id": frame(
                HEADERS, END_STREAM | END_HEADERS, 2, request_block()),
            "another frame inside a header block": (
                frame(HEADERS, END_STREAM, 1, request_block())
                + frame(DATA, 0, 1, b"x")),
            "CONTINUATION without HEADERS": frame(CONTINUATION, END_HEADERS, 1, request_block()),
            "WINDOW_UPDATE of 0 on the connection": frame(WINDOW_UPDATE, 0, 0, b"\x00" * 4),
            "SETTINGS_ENABLE_PUSH of 2": frame(SETTINGS, 0, 0, setting(0x2, 2)),
        })

    def test_flow_control_errors(self) -> Any:
        """
        A window pushed past 2^31-1: FLOW_CONTROL_ERROR.
        """
        return self.assertConnectionErrors(FLOW_CONTROL_ERROR, {
            "connection window overflow": frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")),
            "SETTINGS_INITIAL_WINDOW_SIZE of 2^31": frame(SETTINGS, 0, 0, setting(0x4, 2**31)),
        })

    @inlineCallbacks
    def test_client_goaway(self) -> Any:
        """
        A client's GOAWAY (known or unknown error code) followed by a PING:
        the PING is acknowledged or the connection closes, in either case
        without a GOAWAY of ours, and the connection is closed promptly.
        """
        for code in (NO_ERROR, 0xFF):
            def run() -> tuple[list[Frame], bool]:
                p = Probe(self.proxy.https_port, self.cafile)
                p.handshake()
                p.send(frame(GOAWAY, 0, 0, b"\x00\x00\x00\x00" + code.to_bytes(4, "big"))
                       + frame(PING, 0, 0, b"h2spec\x00\x00"))
                return p.until_closed(), p.closed

            frames, closed = yield deferToThread(run)
            self.assertTrue(closed, code)
            self.assertEqual([f for f in frames if isinstance(f, GoAwayFrame)], [], code)
            pings = [f for f in frames if isinstance(f, PingFrame)]
            self.assertTrue(all("ACK" in f.flags and f.opaque_data == b"h2spec\x00\x00"
                                for f in pings), pings)

    @inlineCallbacks
    def test_negative_window(self) -> Any:
        """
        A smaller SETTINGS_INITIAL_WINDOW_SIZE after part of a response was
        sent makes the stream's window negative; sending resumes with
        exactly what a later WINDOW_UPDATE allows, the rest after more,
        and nothing goes wrong on the server.
        """
        def run() -> list[bytes]:
            p = Probe(self.proxy.https_port, self.cafile)
            p.handshake(setting(0x4, 3))
            p.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, request_block()))
            got = []
            f = p.wait_for(DataFrame)
            got.append(f.data if f else b"<none>")
            p.send(frame(SETTINGS, 0, 0, setting(0x4, 2)))
            p.send(frame(WINDOW_UPDATE, 0, 1, (2).to_bytes(4, "big")))
            f = p.wait_for(DataFrame)
            got.append(f.data if f else b"<none>")
            p.send(frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")))
            rest = b""
            while True:
                f = p.wait_for(DataFrame)
                if f is None:
                    break
                rest += f.data
                if "END_STREAM" in f.flags:
                    break
            got.append(rest)
            p.sock.close()
            return got

        got = yield deferToThread(run)
        self.assertEqual(got, [b"con", b"f", b"ormance-app"])

    @inlineCallbacks
    def test_shutdown_lets_open_stream_finish(self) -> Any:
        """
        SIGTERM while an HTTP/2 response is in progress: GOAWAY(NO_ERROR)
        naming that stream, the response completes, then the connection
        closes.
        """
        port = self.proxy.https_port

        def run() -> tuple[list[Frame], bool]:
            p = Probe(port, self.cafile)
            p.handshake()
            p.send(frame(HEADERS, END_STREAM | END_HEADERS, 1,
                         request_block(path="/slow?ms=1500")))
            deadline = time.monotonic() + CLOSE_WITHIN
            while not self.app.requests and time.monotonic() < deadline:
                time.sleep(0.01)  # until the request is at the target
            reactor.callFromThread(self.proxy.send_signal, signal.SIGTERM)
            return p.until_closed(10), p.closed

        frames, closed = yield deferToThread(run)
        goaways = [(f.error_code, f.last_stream_id) for f in frames
                   if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaways, [(NO_ERROR, 1)])
        body = b"".join(f.data for f in frames if isinstance(f, DataFrame))
        self.assertEqual(body, b"conformance-app")
        self.assertTrue(closed)
        exited: Deferred[int] = Deferred()
        self.proxy.protocol.ended.addBoth(lambda r: (exited.callback(r), r)[1])
        code = yield exited
        self.assertEqual(code, 0)
