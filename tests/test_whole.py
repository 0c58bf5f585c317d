"""
Tests for L{mproxy.http.whole}: a whole small response parsed in
one pass gives exactly what httptools gives, and anything it does not
take (valid or malformed) is left to httptools.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.trial.unittest import SynchronousTestCase

from mproxy.http import whole as whole_response
from mproxy.http.whole import (MAX_CACHED_HEADS, MAX_CACHED_LINES, MAX_WHOLE, MAX_WHOLE_REQUEST, parse_head,
                               parse_whole, parse_whole_request)


class _Collect:
    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.keep_alive = False
        self.parser: Any = None

    def on_status(self, s: bytes) -> None:
        self.reason += s

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers.append((n, v))

    def on_body(self, b: bytes) -> None:
        self.body += b

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


def _httptools(data: bytes) -> tuple[Any, ...] | None:
    c = _Collect()
    p = c.parser = httptools.HttpResponseParser(c)
    try:
        p.feed_data(data)
    except httptools.HttpParserError:
        return None
    return p.get_status_code(), c.reason, c.headers, c.body, c.complete, c.keep_alive


def _resp(*lines: bytes, body: bytes = b"hello") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


TAKEN = [
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"Server: nginx", b"Date: Tue, 01 Dec 2026 20:00:00 GMT",
          b"Content-Type: text/plain", b"Content-Length: 5", b"Connection: keep-alive"),
    _resp(b"HTTP/1.1 404 Not Found", b"content-length: 5", b"X-A:no-space"),
    _resp(b"HTTP/1.1 500 ", b"Content-Length: 0", body=b""),
    _resp(b"HTTP/1.1 301 Moved \tfor good \x80\xff", b"Location: /x", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: a b ", b"Y:  \t a\t", b"Z:", b"W:   ", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: caf\xc3\xa9 \x80", b"Content-Length: 05"),
    _resp(b"HTTP/1.1 200 OK", b"Keep-Alive: timeout=7, max=100", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"Connection: Keep-Alive", b"Proxy-Connection: keep-alive",
          b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"!#$%&'*+-.^_`|~09azAZ: v", b"Content-Length: 5"),
]

MALFORMED = [
    _resp(b"HTTP/1.1 abc", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X : a", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X\x01: a", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X\xff: a", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: a\x01b", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: a\x7fb", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: a\rb", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: a\nY: b", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b" Folded: x", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"X: y", b"  folded", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b": empty-name", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"no-colon", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: +5"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5x"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"hello"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5") + b"junk",
    _resp(b"HTTP/1.x 200 OK", b"Content-Length: 5"),
    _resp(b"http/1.1 200 OK", b"Content-Length: 5"),
]

# valid, but with something the one-pass parser leaves to httptools
LEFT = [
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Connection: close"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Proxy-Connection: close"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Upgrade: h2c"),
    _resp(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5 "),
    _resp(b"HTTP/1.0 200 OK", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 O\x01K", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 204 No Content", body=b""),
    _resp(b"HTTP/1.1 304 Not Modified", b"Content-Length: 5", body=b""),
    _resp(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", body=b""),
    _resp(b"HTTP/1.1 100 Continue", body=b"") + _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: 5", body=b"hel"),
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
    _resp(b"HTTP/1.1 200 OK"),
    _resp(b"HTTP/1.1 200 OK", b"Content-Length: %d" % MAX_WHOLE, body=b"x" * MAX_WHOLE),
]


class ParseWholeTests(SynchronousTestCase):
    def setUp(self) -> None:
        whole_response._lines.clear()
        whole_response._status_lines.clear()
        whole_response._heads.clear()

    def test_same_as_httptools(self) -> None:
        """
        What the one-pass parser takes, httptools parses to the same
        status, reason, headers and body, as one complete keep-alive
        response; the second time (from the line cache) too.
        """
        for data in TAKEN:
            for _ in range(2):
                got = parse_whole(data)
                self.assertIsNotNone(got, data)
                assert got is not None
                status, reason, headers, body, _ka = got
                self.assertEqual(_httptools(data), (status, reason, headers, body, True, True),
                                 data)
                # the list given is the caller's: the cached head is not changed
                headers.append((b"X-Added", b"1"))

    def test_malformed_left_to_httptools(self) -> None:
        """
        Every malformed response is left to httptools, which rejects it.
        """
        for data in MALFORMED:
            self.assertIsNone(_httptools(data), data)
            self.assertIsNone(parse_whole(data), data)
            # and still after its valid lines were cached
            self.assertIsNone(parse_whole(data), data)

    def test_others_left_to_httptools(self) -> None:
        """
        Valid responses whose framing or connection handling is not the
        plain Content-Length keep-alive case are left to httptools.
        """
        for data in LEFT:
            self.assertIsNone(parse_whole(data), data)

    def test_keep_alive_timeout(self) -> None:
        """
        A C{Keep-Alive} header's timeout is given; without one, C{None}.
        """
        got = parse_whole(TAKEN[7])
        assert got is not None
        self.assertEqual(got[4], 7.0)
        got = parse_whole(TAKEN[0])
        assert got is not None
        self.assertIsNone(got[4])

    def test_cache_bounded(self) -> None:
        """
        The line cache starts over when full: it never holds more than
        its bound, and lines parse the same after it started over.
        """
        for i in range(MAX_CACHED_LINES * 2 + 3):
            data = _resp(b"HTTP/1.1 200 OK", b"Date: %d" % i, b"Content-Length: 5")
            got = parse_whole(data)
            assert got is not None
            self.assertEqual(got[2], [(b"Date", b"%d" % i), (b"Content-Length", b"5")])
            self.assertLessEqual(len(whole_response._lines), MAX_CACHED_LINES)
            self.assertLessEqual(len(whole_response._heads), MAX_CACHED_HEADS)


def _head(data: bytes) -> bytes:
    return data[:data.find(b"\r\n\r\n")]


class ParseHeadTests(SynchronousTestCase):
    """
    L{parse_head}: the head alone of a response L{parse_whole} takes, its
    body still to come.
    """

    def setUp(self) -> None:
        whole_response._lines.clear()
        whole_response._status_lines.clear()
        whole_response._heads.clear()

    def test_same_as_httptools(self) -> None:
        for data in TAKEN:
            for _ in range(2):
                got = parse_head(_head(data))
                self.assertIsNotNone(got, data)
                assert got is not None
                status, reason, headers, length, ka = got
                w = parse_whole(data)
                assert w is not None
                self.assertEqual((status, reason, headers, length, ka),
                                 (w[0], w[1], w[2], len(w[3]), w[4]))
                alone = _httptools(_head(data) + b"\r\n\r\n")
                assert alone is not None
                self.assertEqual(alone[:3], (status, reason, headers))
                # the list given is the caller's: the cached head is not changed
                headers.append((b"X-Added", b"1"))

    def test_others_left_to_httptools(self) -> None:
        """
        Malformed heads, and valid ones that are not the plain
        Content-Length keep-alive case, are left to httptools.
        """
        for data in MALFORMED + LEFT:
            h = _head(data)
            if _httptools(h + b"\r\n\r\n") is None:
                self.assertIsNone(parse_head(h), data)
        for data in LEFT[:11] + [_resp(b"HTTP/1.1 200 OK")]:
            self.assertIsNone(parse_head(_head(data)), data)
        big = _resp(b"HTTP/1.1 200 OK", b"X: " + b"x" * MAX_WHOLE, b"Content-Length: 5")
        self.assertIsNone(parse_head(_head(big)))


class _RequestCollect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.parser: Any = None
        self.keep_alive = False
        self.upgrade = False

    def on_url(self, u: bytes) -> None:
        self.url += u

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers.append((n, v))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.upgrade = self.parser.should_upgrade()

    def on_message_complete(self) -> None:
        self.complete = True


def _httptools_request(data: bytes) -> tuple[Any, ...] | None:
    c = _RequestCollect()
    p = c.parser = httptools.HttpRequestParser(c)
    try:
        p.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return (p.get_method(), c.url, c.headers, p.get_http_version(), c.complete, c.keep_alive,
            c.upgrade)


def _req(*lines: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


REQUESTS_TAKEN = [
    _req(b"GET / HTTP/1.1", b"Host: example.com"),
    _req(b"HEAD /a?b=1&c=%20#frag HTTP/1.1", b"host:x", b"User-Agent: t  ",
         b"Accept: */*", b"Connection: keep-alive", b"Keep-Alive: 5"),
    _req(b"GET /!$&'()*+,;=:@-._~[]{}|^`\"<>\\ HTTP/1.1", b"Host: h", b"X: \x80\xff"),
]

REQUESTS_MALFORMED = [
    _req(b"GET / HTTP/1.1", b"Host : h"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"X: a\x01"),
    _req(b"GET / HTTP/1.1", b"Host: h", b" folded"),
    _req(b"GET /a\x7f HTTP/1.1", b"Host: h"),
    _req(b"GET /a\x80 HTTP/1.1", b"Host: h"),
    _req(b"GET /a b HTTP/1.1", b"Host: h"),
    _req(b"get / HTTP/1.1", b"Host: h"),
    _req(b"GET / HTTP/1.1 ", b"Host: h"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"X: a\nY: b"),
]

# valid (or refused later by the reader's own rules), but left to httptools
REQUESTS_LEFT = [
    _req(b"GET  / HTTP/1.1", b"Host: h"),
    _req(b"GET / HTTP/1.1", b"Host: a", b"Host: b"),
    _req(b"GET / HTTP/1.1"),
    _req(b"GET / HTTP/1.0", b"Host: h"),
    _req(b"POST / HTTP/1.1", b"Host: h", b"Content-Length: 0"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: 0"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
    _req(b"GET / HTTP/1.1", b"Host: h", b"Connection: close"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"Connection: Upgrade", b"Upgrade: websocket"),
    _req(b"GET / HTTP/1.1", b"Host: h", b"Expect: 100-continue"),
    _req(b"GET * HTTP/1.1", b"Host: h"),
    _req(b"GET http://h/ HTTP/1.1", b"Host: h"),
    _req(b"GET / HTTP/1.1", b"Host: h") + b"GET / HTTP/1.1\r\n",
    _req(b"GET / HTTP/1.1", b"Host: h")[:-2],
    _req(b"GET /" + b"a" * MAX_WHOLE_REQUEST + b" HTTP/1.1", b"Host: h"),
    _req(b"GET / HTTP/1.1", b"Host: h", *[b"X-%d: v" % i for i in range(100)]),
]


class ParseWholeRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        whole_response._lines.clear()
        whole_response._request_blocks.clear()

    def test_same_as_httptools(self) -> None:
        """
        What the one-pass parser takes, httptools parses to the same
        method, target and headers, as one complete HTTP/1.1 keep-alive
        request that asks for no upgrade.
        """
        for data in REQUESTS_TAKEN:
            for _ in range(2):
                got = parse_whole_request(data)
                self.assertIsNotNone(got, data)
                assert got is not None
                method, target, headers = got
                self.assertEqual(_httptools_request(data),
                                 (method, target, headers, "1.1", True, True, False), data)

    def test_malformed_left_to_httptools(self) -> None:
        """
        Every malformed request is left to httptools, which rejects it.
        """
        for data in REQUESTS_MALFORMED:
            self.assertIsNone(_httptools_request(data), data)
            self.assertIsNone(parse_whole_request(data), data)
            self.assertIsNone(parse_whole_request(data), data)

    def test_others_left_to_httptools(self) -> None:
        """
        Requests with a body, an upgrade, an expectation, a close, another
        version or target form, not one Host, more than one message or
        beyond the size limits are left to httptools.
        """
        for data in REQUESTS_LEFT:
            self.assertIsNone(parse_whole_request(data), data)

    def test_request_cache_bounded(self) -> None:
        """
        The header block cache starts over when full; blocks parse the
        same after it started over, and the list given is the caller's.
        """
        for i in range(MAX_CACHED_HEADS * 2 + 3):
            data = _req(b"GET /%d HTTP/1.1" % i, b"Host: h", b"X: %d" % i)
            got = parse_whole_request(data)
            assert got is not None
            self.assertEqual(got, (b"GET", b"/%d" % i, [(b"Host", b"h"), (b"X", b"%d" % i)]))
            got[2].append((b"Y", b"z"))
            self.assertEqual(parse_whole_request(data),
                             (b"GET", b"/%d" % i, [(b"Host", b"h"), (b"X", b"%d" % i)]))
            self.assertLessEqual(len(whole_response._request_blocks), MAX_CACHED_HEADS)
