# -*- test-case-name: tests.test_whole_response -*-
"""
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

Targets send the same header lines again and again, so the checked value
of each line (and status line) is remembered in a bounded cache.
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
    lines = data[:end].split(b"\r\n")
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
    start = end + 4
    if length < 0 or start + length != len(data):
        return None
    return st[0], st[1], headers, data[start:], ka  # type: ignore[return-value]


__all__ = ["parse_whole", "keep_alive_timeout", "MAX_WHOLE"]
