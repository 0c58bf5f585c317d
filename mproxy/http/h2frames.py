# -*- test-case-name: tests.test_h2_frames -*-
"""
The response side of the HTTP/2 frame layer, written directly instead of
through hyper-h2's frame objects and HPACK encoder (whose per-frame and
per-field Python work was most of a small response's sending cost).

    encode_block(headers) -> bytes        # an HPACK header block
    encode_response(code, headers) -> bytes   # a response head, normalized
    response_block(code, headers) -> list     # the same as a header list
    headers_frame(stream_id, block, end) -> bytes
    data_frame_head(stream_id, length, end) -> bytes   # the DATA frame's 9 bytes

HPACK, the way nginx encodes responses: a field whose name and value are
in the static table is one indexed byte (C{:status: 200}); any other is a
literal I{without indexing} (C{never indexed} for credentials), its name by
static-table index where there is one, strings without Huffman coding.  So
an encoded field never depends on the dynamic table: it is cached
(L{FIELD_CACHE} fields), and a block is the concatenation of its fields'
bytes.  Blocks encoded this way leave the connection's dynamic table as it
was, so they mix freely with blocks from hpack's own encoder (trailers,
fallbacks); a pending table size change is emitted by the caller first.
"""

from __future__ import annotations

from typing import Any

from hpack import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

__all__ = ["encode_block", "encode_field", "encode_response", "response_block",
           "headers_frame", "data_frame_head"]

#: fields that are connection-specific in HTTP/1.1 and forbidden in HTTP/2
CONNECTION_HEADERS = frozenset(
    [b"connection", b"upgrade", b"transfer-encoding", b"keep-alive", b"proxy-connection"])
#: fields HPACK must never index (credentials)
SECRET_HEADERS = frozenset([b"authorization", b"proxy-authorization"])

#: encoded fields kept (names and values repeat from response to response)
FIELD_CACHE = 4096

_STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_EXACT.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)

_HEADERS = 0x1
_DATA = 0x0
_END_STREAM = 0x1
_END_HEADERS = 0x4

_plain: dict[tuple[bytes, bytes], bytes] = {}
_secret: dict[tuple[bytes, bytes], bytes] = {}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """
    An HPACK integer with a C{prefix_bits}-bit prefix, C{first} holding the
    first byte's other bits.
    """
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(s: bytes) -> bytes:
    return _integer(len(s), 7, 0) + s


def encode_field(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """
    One field's HPACK representation (see the module docstring).
    """
    key = (name, value)
    cache = _secret if never_indexed else _plain
    out = cache.get(key)
    if out is not None:
        return out
    if not never_indexed and key in _STATIC_EXACT:
        out = _integer(_STATIC_EXACT[key], 7, 0x80)
    else:
        flag = 0x10 if never_indexed else 0x00
        index = _STATIC_NAME.get(name)
        if index is not None:
            out = _integer(index, 4, flag) + _string(value)
        else:
            out = bytes((flag,)) + _string(name) + _string(value)
    if len(cache) >= FIELD_CACHE:
        cache.clear()
    cache[key] = out
    return out


def encode_block(headers: list[Any]) -> bytes:
    """
    A header block of (name, value) fields; a L{NeverIndexedHeaderTuple} is
    sent never-indexed.
    """
    plain = _plain
    parts = []
    for field in headers:
        if type(field) is tuple:
            out = plain.get(field)
            if out is None:
                out = encode_field(field[0], field[1])
        else:
            out = encode_field(field[0], field[1],
                               isinstance(field, NeverIndexedHeaderTuple))
        parts.append(out)
    return b"".join(parts)


def headers_frame(stream_id: int, block: bytes, end_stream: bool) -> bytes:
    """
    A HEADERS frame carrying all of C{block} (END_HEADERS), ending the
    stream with C{end_stream}.
    """
    flags = _END_HEADERS | _END_STREAM if end_stream else _END_HEADERS
    return (len(block).to_bytes(3, "big") + bytes((_HEADERS, flags))
            + stream_id.to_bytes(4, "big") + block)


def data_frame_head(stream_id: int, length: int, end_stream: bool) -> bytes:
    """
    The 9-byte header of a DATA frame of C{length} bytes (no padding).
    """
    return (length.to_bytes(3, "big") + bytes((_DATA, _END_STREAM if end_stream else 0))
            + stream_id.to_bytes(4, "big"))


def _normalized(name: bytes, value: bytes) -> Any:
    """
    A response field as HTTP/2 sends it (name lowercased, value stripped;
    never indexed if a credential or a short cookie), or C{None} if it is
    connection-specific.
    """
    n = name.lower().strip()
    if n in CONNECTION_HEADERS:
        return None
    if value and (value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09)):
        value = value.strip()
    if n in SECRET_HEADERS or (n == b"cookie" and len(value) < 20):
        return NeverIndexedHeaderTuple(n, value)
    return (n, value)


def response_block(code: int, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """
    A response head as an HPACK header list: C{:status} first, then the
    fields as L{_normalized} makes them.
    """
    block: list[Any] = [(b":status", b"%d" % code)]
    for name, value in headers:
        field = _normalized(name, value)
        if field is not None:
            block.append(field)
    return block


#: a response field as given (name, value) -> its normalized encoding
_response_fields: dict[Any, bytes] = {}
_status_fields: dict[int, bytes] = {}


def encode_response(code: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    The HPACK block of L{response_block}C{(code, headers)}, each field's
    normalization and encoding looked up at once.
    """
    status = _status_fields.get(code)
    if status is None:
        status = _status_fields[code] = encode_field(b":status", b"%d" % code)
    parts = [status]
    cache = _response_fields
    for field in headers:
        try:
            out = cache.get(field)
        except TypeError:
            # not a tuple
            field = tuple(field)
            out = cache.get(field)
        if out is None:
            norm = _normalized(field[0], field[1])
            if norm is None:
                out = b""
            else:
                out = encode_field(norm[0], norm[1], type(norm) is not tuple)
            if len(cache) >= FIELD_CACHE:
                cache.clear()
            cache[field] = out
        parts.append(out)
    return b"".join(parts)
