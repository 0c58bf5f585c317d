"""
Differential tests of L{mproxy.http.h2.ServerConnection}'s own frame loop
(whole requests as light streams, their WINDOW_UPDATE and RST_STREAM)
against hyper-h2 taking every frame.

Each seeded case is a sequence of client frames (valid or not: whole
requests, requests with bodies, CONTINUATION, padding, priority,
WINDOW_UPDATE and RST_STREAM on light streams and others, SETTINGS
changes, PING, GOAWAY, frames on closed or idle streams) cut into
deliveries at random places, with responses written by the application
between them.  It runs twice: as it is, and with every frame going to
hyper-h2 (no light stream).  The frames the server sends, whether it
closes, and what each request stream saw (its fields, body, end, reset)
must be the same.
"""

from __future__ import annotations

import random
from typing import Any

from hpack import Encoder
from hyperframe.frame import Frame
from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mproxy.http import h2 as h2mod
from tests.differential import both_ways, check_seeded, patched
from tests.test_h2 import PREFACE, Harness, frame


def general_path() -> MonkeyPatcher:
    """
    Every received frame goes to hyper-h2.
    """
    return MonkeyPatcher(
        (h2mod.ServerConnection, "receive_data",
         lambda self, data: self._receive_slowly(data)),
    )


class Recorder(Resource):
    """
    Keeps every request stream, taking its body as it arrives.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []
        self.seen: dict[int, dict[str, Any]] = {}

    def render(self, request: Any) -> Any:
        sid = request.stream_id
        rec = self.seen[sid] = {
            "method": request.method, "path": request.uri, "fields": list(request.raw_headers),
            "length": request.body_length, "body": [], "end": False, "errors": [], "lost": [],
        }
        self.got.append(request)
        request.notifyFinish().addErrback(lambda f: rec["lost"].append(f.type.__name__))
        if request.body_length:
            # (as the proxy: a bodiless request gets no body consumer)
            request.set_body_consumer(rec["body"].append, lambda: rec.__setitem__("end", True),
                                      lambda *e: rec["errors"].append(e))
        return NOT_DONE_YET


# --- what the client sends -----------------------------------------------------

_REQ = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
        (b":authority", b"example.com")]
_EXTRA = [(b"user-agent", b"t/1"), (b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
          (b"x-long", b"v" * 300), (b"content-length", b"5"), (b"te", b"trailers")]
_BAD = [[(b"connection", b"close")], [(b"X-Upper", b"1")], [(b"te", b"gzip")],
        [(b":bogus", b"1")], [(b"host", b"a b\x00")], [(b"x", b"a\r\nb")]]


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


class Client:
    """
    Builds a case's frames: one HPACK encoder for the connection, stream
    ids in order unless a case picks otherwise.
    """

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.encoder = Encoder()
        self.next_id = 1
        self.opened: list[int] = []

    def block(self, bad: bool = False, path: bytes = b"/", method: bytes = b"GET") -> bytes:
        rnd = self.rnd
        headers = [(n, path if n == b":path" else method if n == b":method" else v)
                   for n, v in _REQ]
        if rnd.random() < 0.3:
            headers += rnd.sample(_EXTRA, rnd.randint(1, 3))
        if bad:
            bad_fields = rnd.choice(_BAD + [None, None])
            if bad_fields is None:
                headers = headers[1:] if rnd.random() < 0.5 else headers[::-1]
            else:
                headers = headers + bad_fields
        sensitive = rnd.random() < 0.5
        return self.encoder.encode(headers, huffman=rnd.random() < 0.5) if not sensitive else \
            self.encoder.encode([(n, v, True) if n == b"cookie" else (n, v) for n, v in headers])

    def stream_id(self) -> int:
        rnd = self.rnd
        r = rnd.random()
        if r < 0.9 or not self.opened:
            sid = self.next_id
            self.next_id += 2 * rnd.choice([1, 1, 1, 1, 2])
        elif r < 0.95:
            sid = rnd.choice(self.opened)  # reused
        else:
            sid = self.next_id + 1  # even
        self.opened.append(sid)
        return sid

    def any_stream(self) -> int:
        rnd = self.rnd
        if self.opened and rnd.random() < 0.85:
            return rnd.choice(self.opened)
        return rnd.choice([0, self.next_id, self.next_id + 2, 2])

    def frames(self) -> bytes:
        """
        One step's frames.
        """
        rnd = self.rnd
        r = rnd.random()
        if r < 0.35:
            # whole requests (light streams)
            return b"".join(frame(0x1, 0x5, self.stream_id(),
                                  self.block(bad=rnd.random() < 0.08, path=b"/%d" % i))
                            for i in range(rnd.choice([1, 1, 2, 5])))
        if r < 0.45:
            # a request with a body
            sid = self.stream_id()
            out = frame(0x1, 0x4, sid, self.block(method=b"POST"))
            for _ in range(rnd.choice([0, 1, 2])):
                out += frame(0x0, 0, sid, b"d" * rnd.choice([0, 10, 1000]))
            if rnd.random() < 0.8:
                out += frame(0x0, 0x1, sid, b"end")
            return out
        if r < 0.52:
            # header block in HEADERS and CONTINUATION frames, maybe padded
            # or with priority
            sid = self.stream_id()
            block = self.block(bad=rnd.random() < 0.1)
            cut = rnd.randrange(len(block) + 1)
            flags = 0x1 | rnd.choice([0, 0x8, 0x20])
            first = block[:cut]
            if flags & 0x8:
                first = b"\x03" + first + b"\0\0\0"
            if flags & 0x20:
                first = _u32(rnd.choice([0, 1, sid])) + b"\x10" + first
            parts = [frame(0x1, flags, sid, first)]
            rest = block[cut:]
            while True:
                n = rnd.randrange(len(rest) + 1)
                if n == len(rest):
                    parts.append(frame(0x9, 0x4, sid, rest))
                    break
                parts.append(frame(0x9, 0, sid, rest[:n]))
                rest = rest[n:]
            if rnd.random() < 0.1:
                # another frame inside the block
                parts.insert(rnd.randrange(1, len(parts) + 1), frame(0x6, 0, 0, b"12345678"))
            if rnd.random() < 0.5 and cut == len(block):
                return frame(0x1, flags | 0x4, sid, first)
            return b"".join(parts)
        if r < 0.66:
            # WINDOW_UPDATE
            sid = self.any_stream() if rnd.random() < 0.7 else 0
            inc = rnd.choice([1, 100, 65535, 1 << 20, 0, 2**31 - 1])
            if rnd.random() < 0.05:
                return frame(0x8, 0, sid, _u32(inc) + b"\0")
            return frame(0x8, 0, sid, _u32(inc))
        if r < 0.74:
            # RST_STREAM
            sid = self.any_stream()
            if rnd.random() < 0.05:
                return frame(0x3, 0, sid, b"\0\0\0")
            return frame(0x3, 0, sid, _u32(rnd.choice([0, 8, 2])))
        if r < 0.82:
            # SETTINGS
            if rnd.random() < 0.15:
                return frame(0x4, 0x1, 0, b"")  # ACK (of ours)
            settings = b""
            for _ in range(rnd.choice([1, 1, 2])):
                code, value = rnd.choice([
                    (0x4, rnd.choice([0, 1, 10, 100, 65535, 1 << 20, 2**31 - 1, 2**31])),
                    (0x5, rnd.choice([16384, 32768, 1 << 24, 100])),
                    (0x1, rnd.choice([0, 4096, 100])),
                    (0x3, rnd.choice([0, 1, 100])),
                    (0x2, rnd.choice([0, 1])),
                ])
                settings += code.to_bytes(2, "big") + _u32(value)
            return frame(0x4, 0, 0, settings)
        if r < 0.86:
            return frame(0x6, 0, 0, b"12345678")
        if r < 0.9:
            # PRIORITY
            sid = self.any_stream()
            return frame(0x2, 0, sid, _u32(rnd.choice([0, 1, sid])) + b"\x10")
        if r < 0.93:
            # DATA on some stream (a light one: closed on its side)
            return frame(0x0, rnd.choice([0, 1]), self.any_stream(), b"x" * rnd.choice([0, 5]))
        if r < 0.95:
            return frame(0x7, 0, 0, _u32(rnd.choice([0, 1, 3, 99])) + _u32(rnd.choice([0, 0, 2])))
        if r < 0.97:
            return frame(0xBB, 0, rnd.choice([0, 1]), b"unknown")
        # HEADERS on an open stream (trailers, or not allowed)
        return frame(0x1, rnd.choice([0x4, 0x5]), self.any_stream(), self.block())


def _split(data: bytes, rnd: random.Random) -> list[bytes]:
    how = rnd.random()
    if how < 0.4:
        return [data]
    if how < 0.5 and len(data) < 1500:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted({rnd.randrange(1, len(data)) for _ in range(rnd.choice([1, 2, 4]))}) if len(data) > 1 else []
    out = []
    last = 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return out


def make_case(rnd: random.Random) -> list[tuple[str, Any]]:
    """
    The steps: ("send", bytes) and ("answer", (which, size, how)).
    """
    client = Client(rnd)
    settings = b""
    if rnd.random() < 0.5:
        settings = (0x4).to_bytes(2, "big") + _u32(rnd.choice([0, 10, 1000, 65535, 1 << 20]))
    stream = PREFACE + frame(0x4, 0, 0, settings)
    steps: list[tuple[str, Any]] = []
    for _ in range(rnd.randint(1, 12)):
        stream += client.frames()
        if rnd.random() < 0.4:
            for piece in _split(stream, rnd):
                steps.append(("send", piece))
            stream = b""
            for _ in range(rnd.choice([0, 1, 2])):
                steps.append(("answer", (rnd.randrange(8), rnd.choice([0, 10, 20000, 70000]),
                                         rnd.choice(["whole", "whole", "head", "reset"]))))
    for piece in _split(stream, rnd):
        steps.append(("send", piece))
    for _ in range(rnd.choice([0, 1, 3])):
        steps.append(("answer", (rnd.randrange(8), rnd.choice([0, 10, 20000, 70000]),
                                 rnd.choice(["whole", "whole", "head", "reset"]))))
    if rnd.random() < 0.5:
        # windows opened at the end, so that blocked data may go
        steps.append(("send", frame(0x8, 0, 0, _u32(1 << 24))
                      + b"".join(frame(0x8, 0, sid, _u32(1 << 24))
                                 for sid in sorted(set(client.opened)) if sid & 1)))
    return steps


def _frames(raw: bytes) -> list[tuple[Any, ...]]:
    out = []
    while len(raw) >= 9:
        f, length = Frame.parse_frame_header(memoryview(raw[:9]))
        if len(raw) < 9 + length:
            out.append(("partial", raw))
            break
        out.append((type(f).__name__, raw[3], raw[4], f.stream_id, raw[9:9 + length]))
        raw = raw[9 + length:]
    return out


def run(steps: list[tuple[str, Any]]) -> dict[str, Any]:
    app = Recorder()
    h = Harness.__new__(Harness)
    # (Harness without its h2 client: the frames here are made by hand)
    from tests.test_h2 import Reactor
    from twisted.internet.testing import StringTransport

    from mproxy.http.server import ProxySite

    h.app = app
    h.reactor = Reactor()
    h.site = ProxySite(app, h.reactor, secure=True, idle_timeout=75.0)
    h.transport = StringTransport()
    h.channel = h2mod.H2Channel(h.site, h.reactor, 75.0)
    h.channel.makeConnection(h.transport)
    h._buf = b""
    errors = []
    for kind, arg in steps:
        if kind == "send":
            h.send(arg)
            continue
        which, size, how = arg
        live = [r for r in app.got if not r.finished and not r._disconnected]
        if not live:
            continue
        rq = live[which % len(live)]
        try:
            if how == "reset":
                rq.abort()
            else:
                body = b"b" * size
                rq.start_response(200, None, [(b"content-type", b"text/plain")], size)
                if how == "whole":
                    rq.write(body)
                    rq.finish()
                else:
                    rq.write(body[:size // 2])
        except Exception as e:
            errors.append(repr(e))
        h.pump()
    h.pump()
    return {
        "frames": _frames(h.transport.value()),
        "closed": h.transport.disconnecting,
        "streams": sorted(app.seen.items()),
        "errors": errors,
    }


def _both(steps: list[tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return run(steps), patched(general_path(), run, steps)


def _describe(seed: int, i: int, k: str, a: Any, b: Any, steps: list[tuple[str, Any]]) -> str:
    if isinstance(a, list) and isinstance(b, list):
        j = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        a, b = a[max(j - 2, 0):j + 3], b[max(j - 2, 0):j + 3]
    return "seed %d case %d: %s differs\nlight on:  %r\nlight off: %r\nsteps: %r" % (
        seed, i, k, a, b, [(s[0], s[1][:200] if s[0] == "send" else s[1]) for s in steps])


class DifferentialTests(SynchronousTestCase):
    """
    Seeded random frame sequences with the light path on and off.
    """

    def _check(self, seed: int, count: int) -> None:
        check_seeded(self, seed, count, make_case, _both, _describe)

    def test_frames_1(self) -> None:
        self._check(1, 200)

    def test_frames_2(self) -> None:
        self._check(2, 200)

    def test_frames_21(self) -> None:
        self._check(21, 200)


class FoundTests(SynchronousTestCase):
    """
    Divergences the differential cases found, each fixed.
    """

    def test_refused_whole_request_is_the_last_stream(self) -> None:
        """
        A whole request with a field HTTP/2 forbids is a connection error;
        its GOAWAY names that stream as the last one, as hyper-h2's path
        does (the stream was opened by its HEADERS frame).
        """
        block = Encoder().encode(_REQ + [(b"connection", b"close")])
        steps: list[tuple[str, Any]] = [
            ("send", PREFACE + frame(0x4, 0, 0, b"") + frame(0x1, 0x5, 1, Encoder().encode(_REQ))),
            ("send", frame(0x1, 0x5, 3, block)),
        ]
        for light_off, out in both_ways(general_path, run, steps):
            [goaway] = [f for f in out["frames"] if f[0] == "GoAwayFrame"]
            # last stream 3, PROTOCOL_ERROR
            self.assertEqual(goaway[4][:8], b"\0\0\0\x03\0\0\0\x01", light_off)
            self.assertTrue(out["closed"])

    def test_window_setting_after_a_closed_stream_grew(self) -> None:
        """
        A stream whose send window grew (WINDOW_UPDATE) and that closed,
        then a SETTINGS_INITIAL_WINDOW_SIZE that would take that window
        past the maximum: the closed stream's window no longer counts, the
        setting applies to the open streams (hyper-h2 made it a
        FLOW_CONTROL_ERROR).
        """
        block = Encoder().encode(_REQ)
        post = [(b":method", b"POST")] + _REQ[1:] + [(b"content-length", b"5")]
        big = (2**31 - 1) - 65535
        steps: list[tuple[str, Any]] = [
            ("send", PREFACE + frame(0x4, 0, 0, b"")
             + frame(0x1, 0x4, 1, Encoder().encode(post))  # a hyper-h2 stream, open
             + frame(0x1, 0x5, 3, block)
             + frame(0x8, 0, 3, _u32(100))),
            ("answer", (1, 10, "whole")),  # stream 3 answered and closed
            ("send", frame(0x4, 0, 0, (0x4).to_bytes(2, "big") + _u32(big + 65535))),
        ]
        for light_off, out in both_ways(general_path, run, steps):
            self.assertFalse(out["closed"], light_off)
            self.assertEqual([f for f in out["frames"] if f[0] == "GoAwayFrame"], [])
            self.assertEqual([sid for sid, _ in out["streams"]], [1, 3])

    def test_malformed_frame_header_before_its_payload(self) -> None:
        """
        A malformed frame header (DATA on stream 0) read with the start of
        its payload, after a whole request: a connection error at once, as
        hyper-h2 refuses such a header before the payload is in (the light
        loop waited for the whole frame, and dispatched the request).
        """
        steps: list[tuple[str, Any]] = [
            ("send", PREFACE + frame(0x4, 0, 0, b"")),
            ("send", frame(0x1, 0x5, 1, Encoder().encode(_REQ)) + frame(0x0, 0, 0, b"12345")[:11]),
        ]
        for light_off, out in both_ways(general_path, run, steps):
            [goaway] = [f for f in out["frames"] if f[0] == "GoAwayFrame"]
            self.assertEqual(goaway[4][4:8], b"\0\0\0\x01", light_off)  # PROTOCOL_ERROR
            self.assertTrue(out["closed"])
            self.assertEqual(out["streams"], [])
