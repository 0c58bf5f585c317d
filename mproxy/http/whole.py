# -*- test-case-name: tests.test_whole -*-
"""
Whole messages parsed in one pass instead of through httptools' callbacks.

L{parse_whole}: a target's small response that arrived in one read (its
whole head and its whole Content-Length body), parsed in one pass
instead of through httptools' callbacks.

    parsed = parse_whole(data)
    if parsed is not None:
        status, reason, headers, body, keep_alive_timeout = parsed

It accepts only what the incremental parser (llhttp, strict) accepts and
gives the same values: an HTTP/1.1 status line with a 2xx-5xx code other
than 204 and 304, header lines of token names and values without control
characters (HTAB allowed; leading blanks dropped, trailing ones kept as
llhttp keeps them), one Content-Length of digits whose body ends exactly
where the data ends, and no header that changes how the connection or the
body is handled (Transfer-Encoding, Upgrade, a Connection or
Proxy-Connection other than C{keep-alive}).  Anything else, valid or not,
gives C{None}: the caller hands the data to the incremental parser, which
answers (and rejects malformed responses) as it always did.

L{parse_head}: the head of such a response whose body did not all arrive
with it (the body goes on without the parser, L{mproxy.http.rawbody}).

L{parse_whole_request}: the same for a client's small request without a
body (see its docstring).

Targets and clients send the same header lines again and again, so the
checked value of each line (and status line), and of each whole response
head and request header block, is remembered in bounded caches.
"""

from __future__ import annotations

import re

#: largest data taken (the rest goes to the incremental parser)
MAX_WHOLE = 65536
#: lines remembered (the cache starts over when full: a Date line is new
#: every second)
MAX_CACHED_LINES = 512

_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

#: kinds of header line
_PLAIN = 0
_LENGTH = 1
_KEEP_ALIVE = 2
_CONNECTION_OK = 3
_NOT_HERE = 4
# (plain in a response)
_HOST = 5
_EXPECT = 6

# line -> (pair, kind, value): value is the Content-Length or the
# Keep-Alive timeout
_lines: dict[bytes, tuple[tuple[bytes, bytes], int, object]] = {}
# status line -> (status, reason)
_status_lines: dict[bytes, tuple[int, bytes]] = {}


def keep_alive_timeout(value: bytes) -> float:
    """
    The C{timeout=N} of a C{Keep-Alive} header, 0 when absent or invalid.
    """
    for part in value.split(b","):
        name, _, n = part.partition(b"=")
        if name.strip().lower() == b"timeout":
            try:
                t = float(n.strip())
            except ValueError:
                return 0.0
            return t if t > 0 else 0.0
    return 0.0


def _check_line(line: bytes) -> tuple[tuple[bytes, bytes], int, object] | None:
    m = _HEADER_LINE.fullmatch(line)
    if m is None:
        return None
    name, value = m.groups()
    lname = name.lower()
    kind = _PLAIN
    extra: object = None
    if lname == b"content-length":
        if not value.isdigit():
            return None
        kind = _LENGTH
        extra = int(value)
    elif lname == b"keep-alive":
        kind = _KEEP_ALIVE
        extra = keep_alive_timeout(value)
    elif lname == b"connection" or lname == b"proxy-connection":
        kind = _CONNECTION_OK if value.lower() == b"keep-alive" else _NOT_HERE
    elif lname == b"transfer-encoding" or lname == b"upgrade":
        kind = _NOT_HERE
    elif lname == b"host":
        kind = _HOST
    elif lname == b"expect":
        kind = _EXPECT
    entry = ((name, value), kind, extra)
    if len(_lines) >= MAX_CACHED_LINES:
        _lines.clear()
    _lines[line] = entry
    return entry


def _check_status(line: bytes) -> tuple[int, bytes] | None:
    if len(line) < 13 or line[:9] != b"HTTP/1.1 " or line[12] != 0x20:
        return None
    code = line[9:12]
    if not code.isdigit():
        return None
    status = int(code)
    if status < 200 or status > 599 or status == 204 or status == 304:
        return None
    reason = line[13:]
    if _REASON.fullmatch(reason) is None:
        return None
    entry = (status, reason)
    if len(_status_lines) >= MAX_CACHED_LINES:
        _status_lines.clear()
    _status_lines[line] = entry
    return entry


#: whole heads (responses) and header blocks (requests) remembered
MAX_CACHED_HEADS = 256
# response head -> (status, reason, headers, Content-Length, Keep-Alive timeout)
_heads: dict[bytes, tuple[int, bytes, tuple[tuple[bytes, bytes], ...], int, float | None]] = {}
# request header block -> headers
_request_blocks: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}


def _remember(cache: dict, key: bytes, entry: object) -> None:  # type: ignore[type-arg]
    if len(cache) >= MAX_CACHED_HEADS:
        cache.clear()
    cache[key] = entry


def _check_head(head: bytes) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...], int,
                                      float | None] | None:
    lines = head.split(b"\r\n")
    st = _status_lines.get(lines[0]) or _check_status(lines[0])
    if st is None:
        return None
    get = _lines.get
    headers = []
    append = headers.append
    length = -1
    ka = None
    for i in range(1, len(lines)):
        line = lines[i]
        e = get(line) or _check_line(line)
        if e is None:
            return None
        kind = e[1]
        if kind:
            if kind == _LENGTH:
                if length >= 0:
                    return None
                length = e[2]  # type: ignore[assignment]
            elif kind == _KEEP_ALIVE:
                ka = e[2]
            elif kind == _NOT_HERE:
                return None
        append(e[0])
    if length < 0:
        return None
    entry = (st[0], st[1], tuple(headers), length, ka)
    _remember(_heads, head, entry)
    return entry


def parse_whole(data: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, float | None] | None:
    """
    C{(status, reason, headers, body, keep_alive_timeout)} of a response
    that is all of C{data} (C{keep_alive_timeout} is C{None} without a
    C{Keep-Alive} header), or C{None} to leave C{data} to the incremental
    parser (see the module docstring).
    """
    if len(data) > MAX_WHOLE:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    e = _heads.get(head) or _check_head(head)
    if e is None:
        return None
    start = end + 4
    if start + e[3] != len(data):
        return None
    return e[0], e[1], list(e[2]), data[start:], e[4]


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], int,
                                      float | None] | None:
    """
    C{(status, reason, headers, content_length, keep_alive_timeout)} of a
    response head (C{head}: its status line and header lines, without the
    blank line after them) that L{parse_whole} would take, for a response
    whose body did not all arrive with it; or C{None} to leave the head to
    the incremental parser.
    """
    if len(head) > MAX_WHOLE:
        return None
    e = _heads.get(head) or _check_head(head)
    if e is None:
        return None
    return e[0], e[1], list(e[2]), e[3], e[4]


#: largest request taken (so that no size limit of the request reader can
#: be reached)
MAX_WHOLE_REQUEST = 8192
#: most header lines in a request taken
MAX_WHOLE_REQUEST_HEADERS = 100
_REQUEST_METHODS = {b"GET": b"GET", b"HEAD": b"HEAD"}
_TARGET = re.compile(rb"/[!-~]*")


def _check_request_block(block: bytes) -> tuple[tuple[bytes, bytes], ...] | None:
    lines = block.split(b"\r\n")
    if len(lines) > MAX_WHOLE_REQUEST_HEADERS:
        return None
    get = _lines.get
    headers = []
    append = headers.append
    hosts = 0
    for line in lines:
        e = get(line) or _check_line(line)
        if e is None:
            return None
        kind = e[1]
        if kind:
            if kind == _HOST:
                hosts += 1
            elif kind != _CONNECTION_OK and kind != _KEEP_ALIVE:
                return None
        append(e[0])
    if hosts != 1:
        return None
    entry = tuple(headers)
    _remember(_request_blocks, block, entry)
    return entry


def parse_whole_request(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """
    C{(method, target, headers)} of a request that is all of C{data}: a
    GET or HEAD in HTTP/1.1 with an origin-form target of visible ASCII,
    header lines as in a response, one Host, and nothing that frames a
    body, asks for an upgrade, a continue or the connection's close
    (C{Content-Length}, C{Transfer-Encoding}, C{Upgrade}, C{Expect}, a
    C{Connection} other than C{keep-alive}); else C{None}: the caller
    hands C{data} to the incremental parser.
    """
    n = len(data)
    if n > MAX_WHOLE_REQUEST or data[-4:] != b"\r\n\r\n":
        return None
    i = data.find(b"\r\n")
    if i + 4 >= n:
        return None  # no header line
    method, sp, rest = data[:i].partition(b" ")
    method = _REQUEST_METHODS.get(method)  # type: ignore[assignment]
    if method is None or rest[-9:] != b" HTTP/1.1":
        return None
    target = rest[:-9]
    if _TARGET.fullmatch(target) is None:
        return None
    block = data[i + 2:-4]
    e = _request_blocks.get(block) or _check_request_block(block)
    if e is None:
        return None
    return method, target, list(e)


__all__ = ["parse_whole", "parse_head", "parse_whole_request", "keep_alive_timeout", "MAX_WHOLE",
           "MAX_WHOLE_REQUEST"]
