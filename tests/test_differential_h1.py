"""
Differential tests of the HTTP/1.1 fast paths against the general ones.

The request reader (L{mproxy.http.parsing}) takes a whole bodiless
request in one pass (L{mproxy.http.whole.parse_whole_request}), splits a
read holding a head and the start of its body (L{mproxy.http.rawbody.head_end})
and lets the rest of a Content-Length body bypass httptools
(L{mproxy.http.rawbody.RawBody}); the upstream connection
(L{mproxy.http.upstream}) does the same for responses
(L{mproxy.http.whole.parse_whole}, C{parse_head}, C{_parsed_at_once}).
Each seeded case here (requests and responses, valid and malformed, split
at random places, byte by byte or all at once, with or without an early
EOF) goes through the whole proxy twice: as it is, and with every one of
those fast paths off (httptools sees every byte).  What the target and the
client receive, which connections close, and what is logged must be the
same.
"""

from __future__ import annotations

import random
import re
from typing import Any

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http import parsing, upstream
from tests.differential import check_seeded, patched
from tests.test_proxy import Harness

HOST = b"Host: example.com\r\n"


def general_paths() -> MonkeyPatcher:
    """
    Every HTTP/1.1 fast path off: the parsers see every byte.
    """
    return MonkeyPatcher(
        (parsing, "parse_whole_request", lambda data: None),
        (parsing, "head_end", lambda data: 0),
        (parsing.RequestReader, "_start_raw", lambda self: False),
        (upstream, "parse_whole", lambda data: None),
        (upstream, "head_end", lambda data: 0),
        (upstream._Connection, "_start_raw", lambda self: False),
    )


_VOLATILE = re.compile(rb"(X-Request-ID: |X-Request-Start: t=)[^\r\n]*")


def _normal(data: bytes) -> bytes:
    return _VOLATILE.sub(rb"\1-", data)


class Case:
    """
    One case: what the client sends (in deliveries), what the target
    answers to each request it gets (each answer in deliveries), and
    whether the client goes away at the end.
    """

    def __init__(self, client: list[bytes], answers: list[list[bytes]], eof: bool,
                 answer_eof: bool) -> None:
        self.client = client
        self.answers = answers
        self.eof = eof
        self.answer_eof = answer_eof

    def __repr__(self) -> str:
        def show(pieces: list[bytes]) -> str:
            return "%r in pieces of %s" % (_short(b"".join(pieces)), [len(p) for p in pieces][:40])
        return "Case(client=%s,\n answers=[%s],\n eof=%r, answer_eof=%r)" % (
            show(self.client), ",\n   ".join(show(a) for a in self.answers), self.eof,
            self.answer_eof)


def run(case: Case) -> dict[str, Any]:
    """
    The observable outcome of C{case} through the proxy.
    """
    h = Harness()
    conns: list[tuple[Any, StringTransport]] = []

    def settle() -> None:
        h.reactor.advance(0)
        while h.connected < len(h.reactor.tcpClients):
            conns.append(h.upstream())
        h.reactor.advance(0)

    for piece in case.client:
        h.send(piece)
        settle()
    answers = list(case.answers)
    for _ in range(10):
        busy = [c for c in conns if c[0].exchange is not None and not c[1].disconnecting]
        if not busy or not answers:
            break
        proto, t = busy[0]
        for piece in answers.pop(0):
            proto.dataReceived(piece)
            settle()
        if case.answer_eof and not answers:
            proto.connectionLost(Failure(error.ConnectionDone()))
            settle()
    if case.eof:
        h.client.connectionLost(Failure(error.ConnectionDone()))
        settle()
    closed = h.ct.disconnecting or h.client._closing
    logged = []
    for r in h.logger.records:
        r = dict(r)
        r.pop("request_id", None)
        r.pop("duration", None)
        logged.append(r)
    return {
        "upstream": [(_normal(t.value()), t.disconnecting) for _, t in conns],
        "client": h.output(),
        "client_closed": closed,
        # (once closing, or after a request that asked for the close,
        # whatever follows is never served either way)
        "client_paused": [] if closed or not all(r.keep_alive for r in h.client._requests)
        else sorted(h.client._paused),
        "log": logged,
    }


# --- what is sent --------------------------------------------------------------

_EXTRA = [
    b"Accept: */*\r\n", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
    b"User-Agent: t/1\r\n", b"X-Empty:\r\n", b"X-Trailing: v \r\n", b"X-Tab:\tv\t\r\n",
    b"X-Fold: a\r\n b\r\n", b"X-Bin: \x80\xff\r\n", b"Bad Name: x\r\n", b"X-Nul: a\x00b\r\n",
    b"X-CR: a\rb\r\n", b"Keep-Alive: timeout=5\r\n", b"Expect: 100-continue\r\n",
    b"Upgrade: h2c\r\nConnection: Upgrade\r\n", b"Proxy-Connection: keep-alive\r\n",
    b"content-length: 0\r\n", b"Cookie: a=b\r\n", b" X-Lead: x\r\n",
]

_LENGTHS = [0, 1, 5, 1000, 16383, 16384, 16400, 40000, 70000]


def _chunked(body: bytes, rnd: random.Random) -> bytes:
    out = b""
    i = 0
    while i < len(body):
        n = rnd.choice([1, 7, 100, 5000, 20000])
        out += b"%x\r\n" % len(body[i:i + n]) + body[i:i + n] + b"\r\n"
        i += n
    return out + b"0\r\n\r\n"


def _body(n: int, rnd: random.Random) -> bytes:
    return bytes([rnd.randrange(97, 123)]) * n


def request(rnd: random.Random) -> bytes:
    """
    One request, valid or not.
    """
    kind = rnd.random()
    extra = b"".join(rnd.sample(_EXTRA, rnd.choice([0, 0, 0, 0, 0, 1, 2])))
    version = rnd.choice([b"HTTP/1.1"] * 16 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"])
    target = rnd.choice([b"/x"] * 4 + [b"/a/b?q=1", b"http://example.com/abs", b"*", b"x",
                                       b"/\x7f", b"/" + b"u" * 9000])
    if kind < 0.4:
        method = rnd.choice([b"GET", b"GET", b"GET", b"HEAD", b"HEAD", b"DELETE", b"get"])
        host = rnd.choice([HOST] * 16 + [b"", HOST + HOST, b"Host: example.com \r\n",
                                         b"Host:example.com\r\n"])
        return method + b" " + target.replace(b"/" + b"u" * 9000, b"/x") + b" " + version + b"\r\n" + host + extra + b"\r\n"
    if kind < 0.85:
        n = rnd.choice(_LENGTHS)
        body = _body(n, rnd)
        framing = rnd.random()
        if framing < 0.6:
            head = b"Content-Length: %d\r\n" % n
        elif framing < 0.75:
            return (b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n" + extra
                    + b"\r\n" + _chunked(body, rnd))
        else:
            head = rnd.choice([
                b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n),
                b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n + 1),
                b"Content-Length: %d, %d\r\n" % (n, n),
                b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % n,
                b"Transfer-Encoding: gzip\r\n",
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                b"Content-Length: +%d\r\n" % n, b"Content-Length: -%d\r\n" % n,
                b"Content-Length: 0x%x\r\n" % n, b"Content-Length: %d \r\n" % n,
                b"Content-Length:  %d\r\n" % n, b"Content-Length: 00%d\r\n" % n,
                b"Content-Length : %d\r\n" % n, b"Content-Length: 99999999999999999999\r\n",
                b"Content-Length: %d\r\n" % (n + 10), b"Content-Length: abc\r\n",
                b"CONTENT-LENGTH: %d\r\n" % n, b"Content-Length: %d\r\n X\r\n" % n,
            ])
        return b"POST /up HTTP/1.1\r\n" + HOST + head + extra + b"\r\n" + body
    if kind < 0.92:
        # large heads
        many = rnd.choice([99, 100, 101, 150])
        size = rnd.choice([10, 700])
        return (b"GET /big HTTP/1.1\r\n" + HOST
                + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * size) for i in range(many)) + b"\r\n")
    return rnd.choice([
        b"GARBAGE\r\n\r\n", b"\r\n\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n",
        b"GET / HTTP/1.1\n" + HOST.replace(b"\r\n", b"\n") + b"\n",
        b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 20000\r\n\r\n"
        + b"b" * 20000,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ])


_STATUS = [b"200 OK", b"201 Created", b"404 Not Found", b"500 Internal Server Error",
           b"204 No Content", b"304 Not Modified", b"199 Odd", b"200 ", b"200"]
_RESP_EXTRA = [b"Content-Type: text/plain\r\n", b"Connection: close\r\n", b"Connection: keep-alive\r\n",
               b"Keep-Alive: timeout=3\r\n", b"Keep-Alive: timeout=x\r\n", b"Set-Cookie: a=1\r\n",
               b"X-Fold: a\r\n b\r\n", b"Bad Name: x\r\n", b"X-Empty:\r\n", b"X-Trail: v \r\n",
               b"Proxy-Connection: close\r\n", b"X-Bin: \x80\r\n", b"Date: Wed, 02 Dec 2026 01:00:00 GMT\r\n"]


def response(rnd: random.Random) -> bytes:
    """
    One target response, valid or not.
    """
    version = rnd.choice([b"HTTP/1.1"] * 16 + [b"HTTP/1.0", b"HTTP/2"])
    status = rnd.choice(_STATUS[:4] * 8 + _STATUS[4:])
    extra = b"".join(rnd.sample(_RESP_EXTRA, rnd.choice([0, 0, 0, 1, 2])))
    n = rnd.choice(_LENGTHS + [100000])
    body = _body(n, rnd)
    framing = rnd.random()
    if framing < 0.6:
        head = b"Content-Length: %d\r\n" % n
    elif framing < 0.75:
        return version + b" " + status + b"\r\nTransfer-Encoding: chunked\r\n" + extra + b"\r\n" + _chunked(body, rnd)
    elif framing < 0.8:
        head = b""  # to the connection's end
    else:
        head = rnd.choice([
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n),
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n + 1),
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % n,
            b"Content-Length: %d\r\n" % (n + 5), b"Content-Length: %d\r\n" % max(n - 1, 0),
            b"Content-Length: -1\r\n", b"Content-Length: x\r\n", b"Content-Length: %d \r\n" % n,
            b"Content-Length: 0%d\r\n" % n, b"content-length: %d\r\n" % n,
        ])
    pre = b""
    if rnd.random() < 0.08:
        pre = b"HTTP/1.1 100 Continue\r\n\r\n"
    tail = b""
    if rnd.random() < 0.08:
        tail = rnd.choice([b"junk", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    return pre + version + b" " + status + b"\r\n" + head + extra + b"\r\n" + body + tail


def split(data: bytes, rnd: random.Random, marks: list[int]) -> list[bytes]:
    """
    C{data} in deliveries: all at once, byte by byte (small data),
    at random places, or at the given marks (a head's end, a body's end)
    and around them.
    """
    how = rnd.random()
    if how < 0.4 or not data:
        return [data]
    if how < 0.5 and len(data) < 3000:
        return [data[i:i + 1] for i in range(len(data))]
    cuts: set[int] = set()
    if how < 0.75:
        for m in marks:
            for d in (-1, 0, 1):
                if 0 < m + d < len(data) and rnd.random() < 0.5:
                    cuts.add(m + d)
    n = rnd.choice([1, 2, 3, 5, 10])
    for _ in range(n):
        cuts.add(rnd.randrange(1, len(data)) if len(data) > 1 else 1)
    out = []
    last = 0
    for c in sorted(cuts):
        if last < c < len(data):
            out.append(data[last:c])
            last = c
    out.append(data[last:])
    return out


def _marks(messages: list[bytes]) -> list[int]:
    marks = []
    at = 0
    for m in messages:
        e = m.find(b"\r\n\r\n")
        if e >= 0:
            marks.append(at + e + 4)
        at += len(m)
        marks.append(at)
    return marks


def make_case(rnd: random.Random) -> Case:
    reqs = [request(rnd) for _ in range(rnd.choice([1, 1, 1, 1, 2, 3]))]
    data = b"".join(reqs)
    eof = rnd.random() < 0.15
    if eof and len(data) > 1 and rnd.random() < 0.6:
        data = data[:rnd.randrange(1, len(data))]
    answers = []
    for _ in reqs:
        r = response(rnd)
        answers.append(split(r, rnd, _marks([r])))
    return Case(split(data, rnd, _marks(reqs)), answers, eof, rnd.random() < 0.1)


def _both(case: Case) -> tuple[dict[str, Any], dict[str, Any]]:
    return run(case), patched(general_paths(), run, case)


def _describe(seed: int, i: int, k: str, fast: Any, general: Any, case: Case) -> str:
    return "seed %d case %d: %s differs\nfast:    %r\ngeneral: %r\n%r" % (
        seed, i, k, _short(fast), _short(general), case)


class DifferentialTests(SynchronousTestCase):
    """
    Seeded random cases through the fast and the general paths.
    """

    def _check(self, seed: int, count: int) -> None:
        check_seeded(self, seed, count, make_case, _both, _describe)

    def test_requests_and_responses_1(self) -> None:
        self._check(1, 250)

    def test_requests_and_responses_2(self) -> None:
        self._check(2, 250)

    def test_requests_and_responses_3(self) -> None:
        self._check(3, 250)


def _short(v: Any) -> Any:
    if isinstance(v, bytes) and len(v) > 600:
        return v[:300] + b"...(%d)..." % len(v) + v[-300:]
    if isinstance(v, list):
        return [_short(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_short(x) for x in v)
    return v


def _answer_first(h: Harness) -> StringTransport:
    """
    The first request forwarded answered (an empty 200); its connection's
    transport.
    """
    h.reactor.advance(0)
    proto, t = h.upstream()
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.reactor.advance(0)
    return t


class FoundTests(SynchronousTestCase):
    """
    Divergences the differential cases found, each fixed.
    """

    def _next_forwarded(self, h: Harness) -> None:
        """
        Once the first request is answered, the next one is forwarded, not
        refused as a head too large.
        """
        t = _answer_first(h)
        self.assertIn(b"GET /next HTTP/1.1\r\n", t.value())
        self.assertNotIn(b"431", h.output())

    def test_head_after_a_chunked_body_in_a_large_read(self) -> None:
        """
        A read of more than 64 KiB holding the end of a chunked body and
        the start of the next request's head: only that head's bytes count
        against the header section limit (not the whole read: a 431 for a
        valid pipelined request).
        """
        h = Harness()
        h.send(b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
        h.send(b"11170\r\n" + b"a" * 70000 + b"\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHo")
        h.send(b"st: example.com\r\n\r\n")
        self._next_forwarded(h)

    def test_head_after_a_parsed_body_in_a_large_read(self) -> None:
        """
        The same after a Content-Length body the parser read (a request
        whose upgrade offer was dropped, then its body).
        """
        h = Harness()
        h.send(b"POST /up HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade\r\n"
               b"Content-Length: 70000\r\n\r\n" + b"a" * 70000 + b"GET /next HTTP/1.1\r\nHo")
        h.send(b"st: example.com\r\n\r\n")
        self._next_forwarded(h)

    def test_large_head_in_one_read_after_a_body(self) -> None:
        """
        A head over 64 KiB that is still unfinished, after a body in the
        same read: 431 as before.
        """
        h = Harness()
        h.send(b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
        h.send(b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nX-Big: " + b"a" * 70000)
        _answer_first(h)
        self.assertIn(b"HTTP/1.1 431 ", h.output())
