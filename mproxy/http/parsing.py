# -*- test-case-name: tests.test_http_server -*-
"""
L{RequestReader}: turns the bytes of one HTTP/1.1 connection into
L{mproxy.http.request.FastRequest}s, with C{httptools} (llhttp).

It owns the parse state (URL, headers and their sizes, the request whose
body is being read) and the rules for what a request may look like:
garbage, request smuggling attempts (Content-Length together with
Transfer-Encoding, duplicate or bad Content-Length, a Transfer-Encoding
not ending in C{chunked}, duplicate Host) and bad framing are a 400,
header sections over L{MAX_HEADER_BYTES} or L{MAX_HEADER_COUNT} a 431, a
request target over L{MAX_URL_LENGTH} a 414, HTTP/2+ a 505.  Only a
WebSocket handshake (GET, HTTP/1.1, no body) is an upgrade; any other
upgrade offer (h2c ...) is dropped and the request read as a normal one.

The connection (L{mproxy.http.server.FastHTTPChannel}) is told about each
step through a few calls: C{header_started()}, C{request_parsed(req)},
C{body_arrived(left)} (C{left}: the bytes of a Content-Length body still
to come, -1 where the parser reads the body), C{protocol_error(status,
message)} and C{upgrade_started(rest)}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from mproxy.http.rawbody import RawBody, head_end
from mproxy.http.whole import parse_whole_request

if TYPE_CHECKING:
    from mproxy.http.request import FastRequest
    from mproxy.http.server import FastHTTPChannel

MAX_URL_LENGTH = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADER_COUNT = 100


class ParseError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _offers_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            if any(t.strip().lower() == b"websocket" for t in value.split(b",")):
                return True
    return False


def _origin_form(url: bytes) -> bytes:
    """
    The path and query of a request target not starting with C{/}
    (C{*}, or the absolute form a proxy-aware client sends).
    """
    if url == b"*":
        return url
    lower = url[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        i = url.find(b"/", url.find(b"//") + 2)
        return url[i:] if i >= 0 else b"/"
    raise ParseError(400, "bad request target")


def _check_headers(req: FastRequest, version: bytes) -> None:
    """
    The framing headers of a new request: its body length (0 none, n, -1
    chunked), C{Expect: 100-continue}; smuggling attempts are refused.
    """
    te = cl = False
    hosts = 0
    for name, value in req.raw_headers:
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            if cl:
                raise ParseError(400, "duplicate Content-Length")
            cl = True
            try:
                req.body_length = int(value)
            except ValueError:
                raise ParseError(400, "bad Content-Length")
        elif n == 17 and name.lower() == b"transfer-encoding":
            if te or value.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                # only "chunked" (last) frames a request body reliably
                raise ParseError(400, "unsupported Transfer-Encoding")
            te = True
        elif n == 6 and name.lower() == b"expect":
            if value.lower() == b"100-continue":
                req.expect_continue = True
        elif n == 4 and name.lower() == b"host":
            hosts += 1
            if hosts > 1:
                raise ParseError(400, "duplicate Host")
    if not hosts and version == b"HTTP/1.1":
        raise ParseError(400, "missing Host")
    if te:
        if cl:
            raise ParseError(400, "Content-Length with Transfer-Encoding")
        req.body_length = -1
    if req.body_length:
        req.body_done = False


def _head_part(data: bytes, n: int, body: int) -> int:
    """
    At most how many of the first C{n} bytes of C{data} (a piece given to
    the parser, in which a head began and did not end) are that head's:
    not the C{body} bytes of the body the parser delivered in it, nor what
    comes before its last blank line (which ends an earlier head or a
    chunked body; in the unfinished head only empty lines before the
    request line can be one).
    """
    i = data.rfind(b"\r\n\r\n", 0, n)
    return min(n - i - 4 if i >= 0 else n, n - body if body > 0 else n)


class RequestReader:
    """
    See the module docstring.

    @ivar current: the request whose head or body is being read.
    @ivar in_headers: a request's header section is being read.

    The rest of a Content-Length body bypasses the parser (which copies
    every piece it delivers): its pieces reach the request as they arrived
    (the part that came in the read of its head as a memoryview of that
    read, L{mproxy.http.rawbody}), and the parser is replaced by a fresh
    one for the requests after it.
    """

    #: body bytes of the current request the parser delivered
    _body_seen = 0

    def __init__(self, channel: FastHTTPChannel) -> None:
        self.channel = channel
        self.parser = httptools.HttpRequestParser(self)
        self.current: FastRequest | None = None
        self.in_headers = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._raw_header_bytes = 0
        self._dropped_upgrade: FastRequest | None = None
        self._raw = RawBody(self._raw_piece, self._raw_ended, self._raw_failed)

    def feed(self, data: bytes) -> None:
        """
        Parse what arrived; errors go to the channel.
        """
        raw = self._raw
        if raw.left or (self.current is not None and self._start_raw()):
            data = raw.take(data)
            if not data:
                return
        if self.current is None:
            if not self.in_headers:
                parsed = parse_whole_request(data)
                if parsed is not None:
                    self._whole(*parsed)
                    return
            end = head_end(data)
            if end:
                # the head alone through the parser, its body's part of the
                # read as it is (no copy)
                if not self._parse(data, end):
                    return
                if self.current is not None and not self.in_headers and self._start_raw():
                    data = raw.take(memoryview(data)[end:])
                    if data:
                        self.feed(data)
                    return
                data = data[end:]
                if self.current is None:
                    self.feed(data)
                    return
        self._parse(data)

    def _parse(self, data: bytes, end: int = 0) -> bool:
        """
        Give C{data} to the parser (with C{end}: only its first C{end}
        bytes); C{False} when nothing more is to be parsed (an error, or
        an upgrade, which takes the rest of C{data}).
        """
        channel = self.channel
        piece: bytes | memoryview = memoryview(data)[:end] if end else data
        while True:
            seen = self._body_seen
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as e:
                rest = data[e.args[0]:]
                req = self._dropped_upgrade
                if req is None:
                    self.current = None
                    channel.upgrade_started(rest)
                    return False
                # go on parsing what follows as HTTP (the body, further
                # requests)
                self._dropped_upgrade = None
                self._restart_parser(req)
                data = piece = rest
                end = 0
                continue
            except ParseError as e:
                channel.protocol_error(e.status, str(e))
            except httptools.HttpParserCallbackError as e:
                ctx = e.__context__
                if isinstance(ctx, ParseError):
                    channel.protocol_error(ctx.status, str(ctx))
                else:
                    channel.protocol_error(400, str(e))
            except httptools.HttpParserError as e:
                channel.protocol_error(400, str(e))
            else:
                if self.in_headers:
                    n = self._raw_header_bytes
                    if n < 0:
                        # the head began in this piece: the bodies and
                        # heads before it in the piece do not count
                        n = _head_part(data, len(piece), self._body_seen - seen)
                    else:
                        n += len(piece)
                    self._raw_header_bytes = n
                    if n > MAX_HEADER_BYTES:
                        channel.protocol_error(431, "header section too large")
                        return False
                return end > 0
            return False

    def _start_raw(self) -> bool:
        """
        The current request's head was parsed, its Content-Length body is
        not complete: the rest bypasses the parser from now on; C{False} if
        it cannot (a chunked body).
        """
        req = self.current
        assert req is not None
        if req.body_length <= 0 or req.body_done:
            return False
        left = req.body_length - self._body_seen
        if left <= 0:
            return False
        # request body consumers (the upstream exchange, the request
        # buffer) take memoryview pieces
        self._raw.start(left, views=True)
        return True

    @property
    def body_left(self) -> int:
        """
        The bytes of the current request's Content-Length body still to
        come once its rest bypasses the parser (0: none, or not known).
        """
        return self._raw.left

    def body_spliced(self) -> None:
        """
        The rest of the current request's body went on without being read
        here (by splice, L{mproxy.http.splice}): it is complete, a fresh
        parser reads what follows it.
        """
        self._raw.left = 0
        self._raw_ended()

    def _raw_piece(self, data: bytes) -> None:
        req = self.current
        assert req is not None
        self.channel.body_arrived(self._raw.left)
        req.body_received(data)

    def _raw_ended(self) -> None:
        # a fresh parser for what follows the body
        self.parser = httptools.HttpRequestParser(self)
        self.on_message_complete()

    def _raw_failed(self, e: Exception) -> None:
        # as the parser reports a failing callback
        self.channel.protocol_error(400, repr(e))

    def _whole(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """
        A whole bodiless request parsed at once (L{parse_whole_request}):
        the channel is told what the parser's callbacks would have told
        it, in the same order.
        """
        channel = self.channel
        try:
            channel.header_started()
            req = channel.requestFactory(channel, method, url, b"HTTP/1.1", headers)
            self._body_seen = 0
            # HTTP/1.1 without Connection: close, and (one Host, no framing
            # or Expect header) nothing for _check_headers to find
            req.keep_alive = True
            self.current = req
            channel.request_parsed(req)
            # the message is complete (no body)
            self.current = None
        except Exception as e:
            # as the parser reports a failing callback
            channel.protocol_error(400, repr(e))

    def _restart_parser(self, req: FastRequest) -> None:
        """
        After a dropped upgrade offer: the parser (which stopped as for an
        upgrade, skipping the body) is replaced by one primed with a head
        carrying only the request's framing, so that it reads the request's
        body and then the requests after it.
        """
        if not req.body_length:
            self.parser = httptools.HttpRequestParser(self)
            return
        primer = _PrimedCallbacks(self)
        self.parser = httptools.HttpRequestParser(primer)
        framing = (b"Transfer-Encoding: chunked\r\n" if req.body_length < 0
                   else b"Content-Length: %d\r\n" % req.body_length)
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
        primer.priming = False
        self.current = req

    # --- httptools callbacks (the hot path: kept flat) ------------------------

    def on_message_begin(self) -> None:
        self.in_headers = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._raw_header_bytes = -1  # (begun in the piece being parsed)
        self.channel.header_started()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_LENGTH:
            raise ParseError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        h = self._headers
        h.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if len(h) > MAX_HEADER_COUNT or self._header_bytes > MAX_HEADER_BYTES:
            raise ParseError(431, "too many or too large headers")

    def on_headers_complete(self) -> None:
        p = self.parser
        self.in_headers = False
        v = p.get_http_version()
        if v == "1.1":
            version = b"HTTP/1.1"
        elif v == "1.0":
            version = b"HTTP/1.0"
        else:
            raise ParseError(505 if v[0] >= "2" else 400, "unsupported HTTP version")
        url = self._url
        if not url.startswith(b"/"):
            url = _origin_form(url)
        channel = self.channel
        req = channel.requestFactory(channel, p.get_method(), url, version, self._headers)
        self._headers = []
        self._body_seen = 0
        req.keep_alive = p.should_keep_alive()
        _check_headers(req, version)
        self.current = req
        if p.should_upgrade():
            # Only a WebSocket handshake (GET, HTTP/1.1, no body) opens a
            # tunnel.  Any other offer (h2c ...) is dropped and the request
            # served as a normal one: a tunnel in another protocol would
            # carry requests past routing, forwarding headers and logs.
            if (version == b"HTTP/1.1" and req.method == b"GET" and not req.body_length
                    and _offers_websocket(req.raw_headers)):
                req.upgrade = True
            else:
                self._dropped_upgrade = req
                self.current = None  # its body is read by the next parser
        channel.request_parsed(req)

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        req = self.current
        if req is not None:
            self.channel.body_arrived(-1)
            req.body_received(data)

    def on_message_complete(self) -> None:
        req = self.current
        self.current = None
        if req is not None and not req.body_done:
            req.body_complete()


class _PrimedCallbacks:
    """
    Parser callbacks for a parser that resumes a request whose upgrade
    offer was dropped: the head it is primed with is not a request (its
    callbacks are ignored); the body and everything after it go to the
    reader.
    """

    priming = True

    def __init__(self, reader: RequestReader) -> None:
        self.reader = reader

    def on_message_begin(self) -> None:
        if not self.priming:
            self.reader.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.reader.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.reader.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.priming:
            self.reader.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.reader.on_body(data)

    def on_message_complete(self) -> None:
        self.reader.on_message_complete()
