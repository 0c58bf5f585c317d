# -*- test-case-name: tests.test_h2 -*-
"""
mproxy's HTTP/2 server connection, L{H2Channel}: hyper-h2's state machine
(L{ServerConnection}) as the frame layer, and each request stream an
L{mproxy.http.h2exchange.H2Request}, the exchange the proxy drives
directly, as it drives L{mproxy.http.request.FastRequest} on HTTP/1.1 (no
Twisted C{H2Connection}, no C{twisted.web} request per stream).  Response
HEADERS and DATA frames are written by L{mproxy.http.h2frames}.

What it does beyond hyper-h2, and why:

    - A connection error always ends in a GOAWAY carrying the right code,
      then a close (a TLS transport does not close while a producer is
      registered, and the connection is the transport's producer).  Data
      arriving after the close decision is ignored (no second GOAWAY, no
      answers).
    - HPACK decoding errors are COMPRESSION_ERROR (hyper-h2 says
      PROTOCOL_ERROR); a SETTINGS ACK with a payload is FRAME_SIZE_ERROR;
      an invalid connection preface gets a GOAWAY (hyper-h2 raises before
      queueing one).
    - A stream's send window may go negative (a smaller
      SETTINGS_INITIAL_WINDOW_SIZE): sending then waits for WINDOW_UPDATE
      or a larger setting, instead of failing in the send loop or spinning
      on a zero window.
    - A GOAWAY from the client is not a reason to drop the responses it is
      waiting for: with NO_ERROR the connection closes once its streams
      are done (at once if there are none); with an error code at once.
    - Graceful shutdown (L{H2Channel.close_when_idle}): GOAWAY naming the
      last stream we accept, the open streams complete (hyper-h2's own
      GOAWAY would refuse to send their data), newer streams are refused
      with REFUSED_STREAM, and the connection closes when none is left.
    - The idle timeout only applies to a connection without streams, as
      for HTTP/1.1 (a long poll or a quiet event stream is not idle).
    - Request bodies stream, with flow control per stream: DATA is
      acknowledged (WINDOW_UPDATE) only once the body's consumer took it,
      so a paused upload stops the client.  A stream without a declared
      length is dispatched once its body ended (then with its length) or
      passed L{PREBUFFER} bytes; one with a Content-Length at its headers.
    - Sending is batched: data written to streams during one reactor
      iteration is sent at the start of the next one, as many frames as
      the windows allow (up to L{SEND_BUDGET} bytes before yielding to
      other connections), a stream's last data frame carries END_STREAM, a
      response without a body is one HEADERS frame ending the stream, and
      everything goes to the transport in one write.  A finished response
      is sent at once, with its head.  While a stream's send window is
      used up, its producer (the relay, hence the target) is paused.
    - Streams with data to send take turns, one frame each (round robin).
      Clients' priority signals (PRIORITY frames, HEADERS priority) are
      accepted and ignored, as the current HTTP/2 specification allows.
    - Request header blocks are checked and normalized in one pass each
      (L{request_headers}: the same rules as hyper-h2's chains of
      generators, a violation is a PROTOCOL_ERROR), and a HEADERS frame
      opening a new stream is received in a straight line.  Response
      heads are lowercased, stripped of connection-specific fields,
      credentials never indexed.  Trailers go through hyper-h2's checks.
    - Rapid Reset (a flood of RST_STREAM) ends the connection with
      ENHANCE_YOUR_CALM; control frames piling up for a client that does
      not read abort it.

    channel = H2Channel(site, reactor, idle_timeout=75)
    channel.makeConnection(tls_transport)   # sends SETTINGS, registers itself
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
import h2.utilities
import priority
from h2.connection import ConnectionInputs
from h2.errors import ErrorCodes
from h2.stream import StreamInputs
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame, RstStreamFrame, WindowUpdateFrame
from hpack import Decoder, NeverIndexedHeaderTuple
from hpack.table import HeaderTable
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mproxy.http.h2exchange import H2Request
from mproxy.http.h2frames import data_frame_head, encode_response, headers_frame, response_block
from mproxy.http.request import PeerStrings
from mproxy.nextturn import next_iteration_for

__all__ = ["H2Channel", "ServerConnection", "CompressionError"]

#: seconds a closing connection may take to flush before it is aborted
ABORT_TIMEOUT = 5.0
#: bytes of DATA one connection sends per reactor iteration before letting
#: the others run
SEND_BUDGET = 262144
#: request body bytes of a stream without a declared length collected
#: before it is dispatched: a body that ends within them reaches the proxy
#: whole, with its length; a longer one is streamed (length unknown)
PREBUFFER = 65536

#: queued after a stream's last data: its last DATA frame ends the stream
_END_STREAM = object()

#: fields that are connection-specific in HTTP/1.1 and forbidden in HTTP/2
_CONNECTION_HEADERS = frozenset(
    [b"connection", b"upgrade", b"transfer-encoding", b"keep-alive", b"proxy-connection"])

_SETTINGS = 0x4
_ACK = 0x1


#: a byte a field name must not contain (controls, space, uppercase, non-ASCII)
_BAD_NAME_BYTE = re.compile(rb"[\x00-\x20A-Z\x7f-\xff]")
_PSEUDO_FIELDS = frozenset([b":method", b":scheme", b":path", b":authority", b":protocol",
                            b":status"])


#: a byte a field value must not contain, and the ones it must not start
#: or end with
_BAD_VALUE_BYTE = re.compile(rb"[\x00\r\n]")
_BLANKS = (0x20, 0x09)
#: the pseudo-header fields of an ordinary request
_USUAL_PSEUDO = frozenset([b":method", b":scheme", b":path", b":authority"])
#: field names already found valid (names repeat from request to request)
_GOOD_NAMES: set[bytes] = set()
MAX_GOOD_NAMES = 1024


def _check_value(value: bytes) -> None:
    if value:
        if b"\x00" in value or b"\n" in value or b"\r" in value:
            raise h2.exceptions.ProtocolError(
                "Illegal character in header value: %r" % (value,))
        if value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09):
            raise h2.exceptions.ProtocolError(
                "Received header value surrounded by whitespace %r" % (value,))


def request_headers(headers: Any, flags: Any) -> list[Any]:
    """
    A request's decoded header block, checked as hyper-h2 checks it
    (names non-empty, lowercase, without controls, spaces or a colon past
    the first byte; values without NUL/CR/LF or surrounding whitespace; no
    connection-specific field, TE only "trailers"; pseudo-header fields
    known, once each, first, and the ones the method needs; a non-empty
    C{:path}; C{:authority} or one C{Host}, equal if both) and normalized
    (C{cookie} fields joined into one, last, never indexed).

    @raise h2.exceptions.ProtocolError: for any violation.
    """
    out = []
    cookies = []
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    ProtocolError = h2.exceptions.ProtocolError
    for header in headers:
        name = header[0]
        value = header[1]
        if name not in _GOOD_NAMES:
            if not name:
                raise ProtocolError("Received header name with zero length.")
            if _BAD_NAME_BYTE.search(name) is not None or name.find(b":", 1) != -1:
                raise ProtocolError("Illegal character in header name: %r" % (name,))
            if len(_GOOD_NAMES) < MAX_GOOD_NAMES:
                _GOOD_NAMES.add(name)
        if name == b"cookie":
            # joined (and checked) below, after the other fields
            cookies.append(value)
            continue
        if value and (value[0] in _BLANKS or value[-1] in _BLANKS
                      or _BAD_VALUE_BYTE.search(value) is not None):
            _check_value(value)
        if name[0] == 0x3A:
            if name in pseudo:
                raise ProtocolError("Received duplicate pseudo-header field %r" % (name,))
            pseudo.add(name)
            if regular:
                raise ProtocolError("Received pseudo-header field out of sequence: %r"
                                    % (name,))
            if name not in _PSEUDO_FIELDS:
                raise ProtocolError("Received custom pseudo-header field %r" % (name,))
            if name == b":method":
                method = value
            elif name == b":path":
                if not value:
                    raise ProtocolError("An empty :path header is forbidden")
            elif name == b":authority":
                authority = value
        else:
            regular = True
            if name in _CONNECTION_HEADERS:
                raise ProtocolError("Connection-specific header field present: %r." % (name,))
            if name == b"te":
                if value.lower() != b"trailers":
                    raise ProtocolError("Invalid value for TE header: %r" % (value,))
            elif name == b"host":
                if host is not None:
                    raise ProtocolError("Request header block has multiple Host headers.")
                host = value
        out.append(header)
    if cookies:
        value = b"; ".join(cookies)
        _check_value(value)
        out.append(NeverIndexedHeaderTuple(b"cookie", value))
    if pseudo != _USUAL_PSEUDO or method == b"CONNECT":
        h2.utilities._check_pseudo_header_field_acceptability(pseudo, method, flags)
    if authority is None and host is None:
        raise ProtocolError("Request header block does not have an :authority or Host header.")
    if authority is not None and host is not None and authority != host:
        raise ProtocolError("Request header block has mismatched :authority and Host headers")
    return out


def request_fields(headers: Any) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """
    A whole request's decoded header block (its stream ended with it),
    checked by the rules of L{request_headers}, as the proxy takes it:
    C{(method, path, fields)}, the fields without the pseudo-header ones,
    C{cookie} fields joined into one (last), and a C{host} field first
    from C{:authority} if there is none.  One pass for both.

    @raise h2.exceptions.ProtocolError: for any violation.
    """
    raw: list[tuple[bytes, bytes]] = []
    cookies = None
    pseudo: set[bytes] = set()
    regular = False
    method = path = authority = host = None
    ProtocolError = h2.exceptions.ProtocolError
    for header in headers:
        name = header[0]
        value = header[1]
        if name not in _GOOD_NAMES:
            if not name:
                raise ProtocolError("Received header name with zero length.")
            if _BAD_NAME_BYTE.search(name) is not None or name.find(b":", 1) != -1:
                raise ProtocolError("Illegal character in header name: %r" % (name,))
            if len(_GOOD_NAMES) < MAX_GOOD_NAMES:
                _GOOD_NAMES.add(name)
        if name == b"cookie":
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
            continue
        if value and (value[0] in _BLANKS or value[-1] in _BLANKS
                      or _BAD_VALUE_BYTE.search(value) is not None):
            _check_value(value)
        if name[0] == 0x3A:
            if name in pseudo:
                raise ProtocolError("Received duplicate pseudo-header field %r" % (name,))
            pseudo.add(name)
            if regular:
                raise ProtocolError("Received pseudo-header field out of sequence: %r"
                                    % (name,))
            if name == b":method":
                method = value
            elif name == b":path":
                if not value:
                    raise ProtocolError("An empty :path header is forbidden")
                path = value
            elif name == b":authority":
                authority = value
            elif name not in _PSEUDO_FIELDS:
                raise ProtocolError("Received custom pseudo-header field %r" % (name,))
            continue
        regular = True
        if name in _CONNECTION_HEADERS:
            raise ProtocolError("Connection-specific header field present: %r." % (name,))
        if name == b"te":
            if value.lower() != b"trailers":
                raise ProtocolError("Invalid value for TE header: %r" % (value,))
        elif name == b"host":
            if host is not None:
                raise ProtocolError("Request header block has multiple Host headers.")
            host = value
        raw.append(header if type(header) is tuple else (name, value))
    if cookies is not None:
        value = b"; ".join(cookies)
        _check_value(value)
        raw.append((b"cookie", value))
    if pseudo != _USUAL_PSEUDO or method == b"CONNECT":
        h2.utilities._check_pseudo_header_field_acceptability(pseudo, method, _REQUEST_FLAGS)
    if host is None:
        if authority is None:
            raise ProtocolError(
                "Request header block does not have an :authority or Host header.")
        raw.insert(0, (b"host", authority))
    elif authority is not None and authority != host:
        raise ProtocolError("Request header block has mismatched :authority and Host headers")
    return method or b"", path or b"", raw


_SERVER_OPEN = h2.connection.ConnectionState.SERVER_OPEN
_IDLE = h2.connection.ConnectionState.IDLE
#: the validation flags of a request's header block
_REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)


class _ServerStream(h2.stream.H2Stream):
    """
    hyper-h2's stream, with a request's header block checked by
    L{request_headers} (one pass) instead of hyper-h2's generator chain.
    """

    def _process_received_headers(self, headers: Any, header_validation_flags: Any,
                                  header_encoding: Any) -> list[Any]:
        flags = header_validation_flags
        if (flags.is_trailer or flags.is_response_header or header_encoding
                or not self.config.validate_inbound_headers
                or not self.config.normalize_inbound_headers):
            return super()._process_received_headers(headers, flags, header_encoding)
        return request_headers(headers, flags)


class RoundRobin:
    """
    The send scheduler: the streams that have data and window (unblocked)
    take turns, one frame each.  It has the interface of
    L{priority.PriorityTree} that the channel uses, and its errors;
    weights and dependencies are accepted and ignored.
    """

    def __init__(self, maximum_streams: int = 1000) -> None:
        self.maximum_streams = maximum_streams
        self._known: set[int] = set()
        #: unblocked streams, in turn order (a dict as an ordered set)
        self._ready: dict[int, None] = {}

    def insert_stream(self, stream_id: int, depends_on: Any = None, weight: int = 16,
                      exclusive: bool = False) -> None:
        if stream_id in self._known:
            raise priority.DuplicateStreamError("Stream %d already in tree" % stream_id)
        if len(self._known) >= self.maximum_streams:
            raise priority.TooManyStreamsError(
                "Refusing to insert %d streams into priority tree at once"
                % (self.maximum_streams + 1))
        self._known.add(stream_id)
        self._ready[stream_id] = None

    def insert_blocked(self, stream_id: int) -> None:
        """
        L{insert_stream} (a stream already known is not an error), then
        L{block}: a stream that has nothing to send yet.
        """
        known = self._known
        if stream_id in known:
            self._ready.pop(stream_id, None)
            return
        if len(known) >= self.maximum_streams:
            raise priority.TooManyStreamsError(
                "Refusing to insert %d streams into priority tree at once"
                % (self.maximum_streams + 1))
        known.add(stream_id)

    def reprioritize(self, stream_id: int, depends_on: Any = None, weight: int = 16,
                     exclusive: bool = False) -> None:
        if stream_id not in self._known:
            raise priority.MissingStreamError("Stream %d not in tree" % stream_id)

    def remove_stream(self, stream_id: int) -> None:
        if stream_id not in self._known:
            raise priority.MissingStreamError("Stream %d not in tree" % stream_id)
        self._known.discard(stream_id)
        self._ready.pop(stream_id, None)

    def block(self, stream_id: int) -> None:
        if stream_id not in self._known:
            raise priority.MissingStreamError("Stream %d not in tree" % stream_id)
        self._ready.pop(stream_id, None)

    def unblock(self, stream_id: int) -> None:
        if stream_id not in self._known:
            raise priority.MissingStreamError("Stream %d not in tree" % stream_id)
        self._ready[stream_id] = None

    def __iter__(self) -> "RoundRobin":
        return self

    def __next__(self) -> int:
        ready = self._ready
        if not ready:
            raise priority.DeadlockError("No unblocked streams to schedule.")
        stream_id = next(iter(ready))
        # to the back of the line
        del ready[stream_id]
        ready[stream_id] = None
        return stream_id


_STATIC_TABLE = HeaderTable.STATIC_TABLE
_STATIC_ENTRIES = len(_STATIC_TABLE)


def decode_block(decoder: Any, data: bytes) -> Any:
    """
    hyper-h2's decoding of a header block (an HPACK error is a
    L{h2.exceptions.ProtocolError}), with the block a client repeats (every
    field one indexed byte, as when it sends the same fields again) looked
    up in the table directly (its fields are the table's own tuples); such
    a block changes nothing in the decoder, and any block the lookup does
    not fully accept is decoded by hpack.
    """
    if data and min(data) > 0x80 and 0xFF not in data:
        dynamic = decoder.header_table.dynamic_entries
        fields = []
        size = 0
        for b in data:
            i = (b & 0x7F) - 1
            if i < _STATIC_ENTRIES:
                field = _STATIC_TABLE[i]
            else:
                i -= _STATIC_ENTRIES
                if i >= len(dynamic):
                    break
                field = dynamic[i]
            fields.append(field)
            size += 32 + len(field[0]) + len(field[1])
        else:
            if (size <= decoder.max_header_list_size
                    and decoder.header_table_size <= decoder.max_allowed_table_size):
                return fields
    return h2.connection._decode_headers(decoder, data)


class CompressionError(h2.exceptions.ProtocolError):
    """
    A header block could not be decoded: a connection error of type
    COMPRESSION_ERROR.
    """

    error_code = ErrorCodes.COMPRESSION_ERROR


class _FrameBuffer(FrameBuffer):
    """
    hyper-h2's frame buffer, with a SETTINGS ACK that carries a payload
    reported as FRAME_SIZE_ERROR (hyperframe calls it invalid data).
    """

    def __next__(self) -> Any:
        data = self._data
        if (len(data) >= 9 and data[3] == _SETTINGS and data[4] & _ACK
                and (data[0] << 16 | data[1] << 8 | data[2])):
            raise h2.exceptions.FrameDataMissingError(
                "SETTINGS frame with ACK flag and a payload")
        return super().__next__()


_HALF_CLOSED_REMOTE = h2.stream.StreamState.HALF_CLOSED_REMOTE
_CLOSED_BY = h2.stream.StreamClosedBy
_MAX_WINDOW = 2**31 - 1
_guard_increment = h2.utilities.guard_increment_window


def _compression_error(e: h2.exceptions.ProtocolError) -> h2.exceptions.ProtocolError:
    """
    The error to raise for C{e}, raised while decoding a header block:
    hyper-h2 turns every decoding failure into a plain ProtocolError, which
    is a L{CompressionError} (an oversized header list becomes a
    DenialOfServiceError instead, and stays one).
    """
    if type(e) is h2.exceptions.ProtocolError and isinstance(
            e.__cause__, (HPACKError, IndexError, TypeError)):
        error = CompressionError(str(e))
        error.__cause__ = e.__cause__
        return error
    return e


#: closed light streams remembered (as hyper-h2 remembers its closed streams)
MAX_CLOSED_LIGHT = 2**16
#: whole request header blocks remembered per connection, and the largest
MAX_KNOWN_BLOCKS = 32
MAX_KNOWN_BLOCK = 1024


class _CountingDecoder(Decoder):
    """
    hpack's decoder, counting the blocks it decoded (L{generation}): while
    the count stands still, its dynamic table has not changed, and a block
    of indexed fields means what it meant before.
    """

    generation = 0

    def decode(self, data: Any, raw: bool = False) -> Any:
        self.generation += 1
        return super().decode(data, raw)


class _Light:
    """
    A light stream: a request stream whose HEADERS frame ended it (so
    half-closed (remote): the client may only send WINDOW_UPDATE,
    PRIORITY and RST_STREAM on it), kept as its send window and whether
    its response head was sent, instead of as hyper-h2's stream object
    and state machine.  Sending its head, its data and END_STREAM, a reset
    either way, and WINDOW_UPDATE are handled by L{ServerConnection}
    itself; for anything else it becomes one of hyper-h2's streams in the
    same state (L{ServerConnection._promote}).  Once closed it is
    remembered as hyper-h2 remembers a closed stream (how it was closed).
    """

    __slots__ = ("window", "head_sent")

    def __init__(self, window: int) -> None:
        self.window = window
        self.head_sent = False


class WholeRequest:
    """
    The event of a request received whole in one HEADERS frame (which
    ended its stream): its method, path and fields as
    L{request_fields} gives them.
    """

    __slots__ = ("stream_id", "method", "path", "fields")

    def __init__(self, stream_id: int, method: bytes, path: bytes,
                 fields: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.method = method
        self.path = path
        self.fields = fields


class ServerConnection(h2.connection.H2Connection):
    """
    hyper-h2's connection state machine for our server side.

    @ivar goaway_code: the error code of the GOAWAY queued for a connection
        error, or L{None}.
    """

    goaway_code: int | None = None

    def __init__(self) -> None:
        # outbound headers are normalized by H2Channel.writeHeaders
        super().__init__(config=h2.config.H2Configuration(
            client_side=False, header_encoding=None,
            normalize_outbound_headers=False, validate_outbound_headers=False))
        self.incoming_buffer = _FrameBuffer(server=True)
        self.decoder.__class__ = _CountingDecoder
        #: the light streams, by id
        self._light: dict[int, _Light] = {}
        #: how closed light streams were closed, by id
        self._closed_light: dict[int, Any] = {}
        #: the client's SETTINGS_INITIAL_WINDOW_SIZE: a new stream's send window
        self._initial_window: int = self.remote_settings.initial_window_size
        #: whole requests' header blocks that left the decoder unchanged
        #: (indexed fields only) -> (the decoder's generation, the header
        #: list's size, what request_fields made of them)
        self._wholes: dict[bytes, tuple[int, int, Any]] = {}

    def receive_data(self, data: Any) -> list[Any]:
        """
        The frames in C{data}: the common ones (see L{_receive_fast}) taken
        here, every other one by hyper-h2, in order.  A connection error
        queues its GOAWAY and raises.
        """
        buf = self.incoming_buffer
        events: list[Any] = []
        if buf._preamble_len:
            # the preface (checked by hyper-h2), then maybe frames
            n = buf._preamble_len
            events = self._receive_slowly(data[:n])
            data = data[n:]
            if not data:
                return events
        state = self.state_machine.state
        if buf._headers_buffer or (state is not _SERVER_OPEN and state is not _IDLE):
            return events + self._receive_slowly(data)
        if buf._data:
            buf._data += data
            data = bytes(buf._data)
            del buf._data[:]
        elif type(data) is not bytes:
            data = bytes(data)
        try:
            self._receive_fast(data, events)
        except h2.exceptions.ProtocolError as e:
            if self.goaway_code is None:
                self._terminate_connection(e.error_code)
            raise
        return events

    def _receive_slowly(self, data: Any) -> list[h2.events.Event]:
        """
        hyper-h2's C{receive_data}.
        """
        try:
            return super().receive_data(data)
        except h2.exceptions.ProtocolError as e:
            if self.goaway_code is None:
                # raised before hyper-h2 queued a GOAWAY (a bad preface)
                self._terminate_connection(e.error_code)
            raise

    def _receive_fast(self, data: bytes, events: list[Any]) -> None:
        """
        Receive the frames of C{data}, appending their events to
        C{events}.  Taken here: a HEADERS frame that opens a new stream
        and ends it (a whole request: END_HEADERS and END_STREAM, without
        padding or priority), which then becomes a light stream (see
        L{_Light}); WINDOW_UPDATE for the connection or a light stream;
        RST_STREAM for a light stream.  Any other frame, or one of these
        that is not valid, goes to hyper-h2 (a light stream it concerns
        becomes one of hyper-h2's first), and so do the frames of a header
        block continued in CONTINUATION frames, and everything after a frame
        that ends the connection.  An incomplete frame at the end waits for
        more data.
        """
        n = len(data)
        i = 0
        light = self._light
        max_size = self.max_inbound_frame_size
        #: a header block is being continued (CONTINUATION): hyper-h2's
        in_block = False
        while n - i >= 9:
            length = data[i] << 16 | data[i + 1] << 8 | data[i + 2]
            if length > max_size:
                # hyper-h2 refuses it (FRAME_SIZE_ERROR)
                events.extend(self._receive_slowly(data[i:]))
                return
            end = i + 9 + length
            if end > n:
                break
            kind = data[i + 3]
            flags = data[i + 4]
            stream_id = (data[i + 5] << 24 | data[i + 6] << 16 | data[i + 7] << 8
                         | data[i + 8]) & 0x7FFFFFFF
            if not in_block:
                if (kind == 0x1 and flags & 0x2D == 0x05 and stream_id & 1
                        and stream_id > self.highest_inbound_stream_id):
                    events.append(self._receive_whole_request(stream_id, data[i + 9:end]))
                    i = end
                    continue
                if kind == 0x8 and length == 4 and (not stream_id or stream_id in light):
                    increment = (data[i + 9] << 24 | data[i + 10] << 16 | data[i + 11] << 8
                                 | data[i + 12]) & 0x7FFFFFFF
                    if increment:
                        if not stream_id:
                            self.outbound_flow_control_window = _guard_increment(
                                self.outbound_flow_control_window, increment)
                            events.append(h2.events.WindowUpdated(stream_id=0, delta=increment))
                            i = end
                            continue
                        stream = light[stream_id]
                        if stream.window + increment <= _MAX_WINDOW:
                            stream.window += increment
                            events.append(h2.events.WindowUpdated(stream_id=stream_id,
                                                                  delta=increment))
                            i = end
                            continue
                elif kind == 0x3 and length == 4 and stream_id in light:
                    del light[stream_id]
                    self._light_closed(stream_id, _CLOSED_BY.RECV_RST_STREAM)
                    code = (data[i + 9] << 24 | data[i + 10] << 16 | data[i + 11] << 8
                            | data[i + 12])
                    events.append(h2.events.StreamReset(
                        stream_id=stream_id, error_code=h2.errors._error_code_from_int(code),
                        remote_reset=True))
                    i = end
                    continue
            if stream_id in light:
                self._promote(stream_id)
            events.extend(self._receive_slowly(data[i:end]))
            i = end
            state = self.state_machine.state
            if state is not _SERVER_OPEN and state is not _IDLE:
                if i < n:
                    events.extend(self._receive_slowly(data[i:]))
                return
            in_block = bool(self.incoming_buffer._headers_buffer)
            max_size = self.max_inbound_frame_size
        if n - i >= 9:
            # an incomplete frame: hyper-h2 keeps it, refusing a malformed
            # frame header now as it always does (before its payload)
            events.extend(self._receive_slowly(data[i:]))
        elif i < n:
            self.incoming_buffer._data += data[i:]

    def _receive_whole_request(self, stream_id: int, block: bytes) -> "WholeRequest":
        """
        A HEADERS frame opened stream C{stream_id} and ended it: the checks
        and state changes of hyper-h2 for it (decoded, checked, the stream
        half-closed (remote)), the stream kept as a L{_Light}.
        """
        max_open = self.local_settings.max_concurrent_streams
        value = self.open_inbound_streams
        if value + 1 > max_open:
            raise h2.exceptions.TooManyStreamsError(
                f"Max inbound streams is {max_open}, {value} open")
        decoder = self.decoder
        known = self._wholes.get(block)
        if (known is not None and known[0] == decoder.generation
                and known[1] <= decoder.max_header_list_size
                and decoder.header_table_size <= decoder.max_allowed_table_size):
            # the same block as an earlier request's, the table unchanged
            # since: the same fields, found valid
            method, path, fields = known[2]
            fields = fields[:]
        else:
            generation = decoder.generation
            try:
                headers = decode_block(decoder, block)
            except h2.exceptions.ProtocolError as e:
                raise _compression_error(e)
            if headers and headers[0][0] == b":status":
                # not a request: hyper-h2's own checks refuse it
                stream = self._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
                stream.receive_headers(headers, True, None)
            # open from here on, as in hyper-h2: a field refused below is a
            # connection error whose GOAWAY names this stream as the last
            if self.state_machine.state is _IDLE:
                self.state_machine.state = _SERVER_OPEN
            self.highest_inbound_stream_id = stream_id
            method, path, fields = request_fields(headers)
            if decoder.generation == generation and len(block) <= MAX_KNOWN_BLOCK:
                # (a block that hpack decoded may have changed the table:
                # decoded again, it would change it again)
                wholes = self._wholes
                if len(wholes) >= MAX_KNOWN_BLOCKS:
                    wholes.clear()
                size = 0
                for field in headers:
                    size += 32 + len(field[0]) + len(field[1])
                wholes[block] = (decoder.generation, size, (method, path, fields[:]))
        if self.state_machine.state is _IDLE:
            # the first stream opens the connection
            self.state_machine.state = _SERVER_OPEN
        self.highest_inbound_stream_id = stream_id
        self._light[stream_id] = _Light(self._initial_window)
        return WholeRequest(stream_id, method, path, fields)

    @property
    def open_inbound_streams(self) -> int:
        return self._open_streams(1) + len(self._light)

    def _light_closed(self, stream_id: int, how: Any) -> None:
        """
        Remember how light stream C{stream_id} was closed, as hyper-h2
        remembers its closed streams (the latest L{MAX_CLOSED_LIGHT}), in a
        plain dict.
        """
        closed = self._closed_light
        if len(closed) >= MAX_CLOSED_LIGHT:
            # forget the older half
            closed = self._closed_light = dict(
                list(closed.items())[MAX_CLOSED_LIGHT // 2:])
        closed[stream_id] = how

    def _stream_closed_by(self, stream_id: int) -> Any:
        how = self._closed_light.get(stream_id)
        if how is not None:
            return how
        return super()._stream_closed_by(stream_id)

    def _promote(self, stream_id: int) -> Any:
        """
        Make light stream C{stream_id} one of hyper-h2's, in the same state
        (half-closed (remote), its head sent or not, its send window).
        """
        light = self._light.pop(stream_id)
        stream = _ServerStream(stream_id, config=self.config,
                               inbound_window_size=self.local_settings.initial_window_size,
                               outbound_window_size=light.window)
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        machine = stream.state_machine
        machine.state = _HALF_CLOSED_REMOTE
        machine.client = False
        machine.headers_received = True
        if light.head_sent:
            machine.headers_sent = True
        self.streams[stream_id] = stream
        return stream

    def _get_stream_by_id(self, stream_id: int | None) -> Any:
        if stream_id in self._light:
            return self._promote(stream_id)
        return super()._get_stream_by_id(stream_id)

    def _get_or_create_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        if stream_id in self._light:
            return self._promote(stream_id)
        return super()._get_or_create_stream(stream_id, allowed_ids)

    def _flow_control_change_from_settings(self, old_value: int | None,
                                           new_value: int) -> None:
        self._initial_window = new_value
        delta = new_value - (old_value or 0)
        guard = h2.utilities.guard_increment_window
        for stream in self.streams.values():
            # (hyper-h2 changes closed streams' windows too: one that grew
            # before it closed made a valid setting a FLOW_CONTROL_ERROR)
            if not stream.closed:
                stream.outbound_flow_control_window = guard(
                    stream.outbound_flow_control_window, delta)
        for light in self._light.values():
            light.window = guard(light.window, delta)

    def local_flow_control_window(self, stream_id: int) -> int:
        light = self._light.get(stream_id)
        if light is None:
            return super().local_flow_control_window(stream_id)
        window = self.outbound_flow_control_window
        return light.window if light.window < window else window

    def end_stream(self, stream_id: int) -> None:
        light = self._light.get(stream_id)
        if (light is not None and light.head_sent
                and self.state_machine.state is _SERVER_OPEN):
            self.send_data_frame(stream_id, b"", True)
            return
        super().end_stream(stream_id)

    def reset_stream(self, stream_id: int, error_code: Any = 0) -> None:
        if stream_id in self._light and self.state_machine.state is _SERVER_OPEN:
            del self._light[stream_id]
            self._light_closed(stream_id, _CLOSED_BY.SEND_RST_STREAM)
            self._data_to_send += (b"\x00\x00\x04\x03\x00" + stream_id.to_bytes(4, "big")
                                   + int(error_code).to_bytes(4, "big"))
            return
        super().reset_stream(stream_id, error_code)

    def _terminate_connection(self, error_code: Any) -> None:
        self.goaway_code = error_code
        super()._terminate_connection(error_code)

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _ServerStream
        return stream

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        """
        hyper-h2's, with the common case (the HEADERS opening a new request
        stream, without priority information) taken in a straight line: the
        same checks and state transitions, without its per-block dispatch
        on what kind of header block it might be.
        """
        stream_id = frame.stream_id
        flags = frame.flags
        if (stream_id in self.streams or stream_id <= self.highest_inbound_stream_id
                or not stream_id & 1 or "PRIORITY" in flags):
            return super()._receive_headers_frame(frame)
        max_open = self.local_settings.max_concurrent_streams
        value = self.open_inbound_streams
        if value + 1 > max_open:
            raise h2.exceptions.TooManyStreamsError(
                f"Max inbound streams is {max_open}, {value} open")
        headers = decode_block(self.decoder, frame.data)
        # (in SERVER_OPEN the connection's transition changes nothing)
        events = ([] if self.state_machine.state is _SERVER_OPEN
                  else self.state_machine.process_input(ConnectionInputs.RECV_HEADERS))
        stream = self._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
        end = "END_STREAM" in flags
        if headers and headers[0][0] == b":status":
            # not a request: hyper-h2's own checks refuse it
            frames, stream_events = stream.receive_headers(headers, end, None)
            return frames, events + stream_events
        machine = stream.state_machine
        stream_events = machine.process_input(StreamInputs.RECV_HEADERS)
        if end:
            ended = machine.process_input(StreamInputs.RECV_END_STREAM)
            stream_events[0].stream_ended = ended[0]
            stream_events += ended
        stream._initialize_content_length(headers)
        stream_events[0].headers = request_headers(headers, _REQUEST_FLAGS)
        return [], events + stream_events

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        try:
            return self._receive_frame_quietly(frame)
        except h2.exceptions.ProtocolError as e:
            error = _compression_error(e)
            if error is e:
                raise
            raise error from e.__cause__

    def _receive_frame_quietly(self, frame: Any) -> list[h2.events.Event]:
        """
        hyper-h2's C{_receive_frame} without its trace line, whose
        argument (the frame's repr) it builds even when nothing logs.
        """
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # closed by RST_STREAM: a stream error, answered with RST_STREAM;
            # otherwise a connection error
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                return e._events
            raise
        except h2.exceptions.StreamIDTooLowError as e:
            # a closed (and forgotten) stream, or one closed implicitly by a
            # newer stream: RST_STREAM if it was reset, a connection error if
            # it had ended (STREAM_CLOSED) or was closed implicitly
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                return []
            if self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            raise
        self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        # hyper-h2 closes its state machine here, after which nothing may be
        # sent, not even the responses the client still waits for
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_response_head(self, stream_id: int, code: int,
                           headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """
        Queue a (final) response head: hyper-h2's C{send_headers}, with the
        block normalized and encoded by L{mproxy.http.h2frames} and the
        HEADERS frame written directly (one that needs CONTINUATION goes
        the usual way).

        @raise h2.exceptions.StreamClosedError: the stream is closed.
        """
        block = encode_response(code, headers)
        if len(block) > self.max_outbound_frame_size - 8:
            self.send_headers(stream_id, response_block(code, headers), end_stream=end_stream)
            return
        table = self.encoder.header_table
        light = self._light.get(stream_id)
        if (light is not None and not light.head_sent
                and self.state_machine.state is _SERVER_OPEN):
            light.head_sent = True
            if end_stream:
                del self._light[stream_id]
                self._light_closed(stream_id, _CLOSED_BY.SEND_END_STREAM)
            if table.resized:
                block = self.encoder._encode_table_size_change() + block
                table.resized = False
            self._data_to_send += headers_frame(stream_id, block, end_stream)
            return
        stream = self._get_stream_by_id(stream_id)
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        table = self.encoder.header_table
        if table.resized:
            # the client changed SETTINGS_HEADER_TABLE_SIZE: the next block
            # starts with the size update
            block = self.encoder._encode_table_size_change() + block
            table.resized = False
        self._data_to_send += headers_frame(stream_id, block, end_stream)

    def send_data_frame(self, stream_id: int, data: Any, end_stream: bool) -> None:
        """
        hyper-h2's C{send_data} for data the caller has checked against the
        windows and the frame size, written without a frame object.
        """
        light = self._light.get(stream_id)
        if (light is not None and light.head_sent
                and self.state_machine.state is _SERVER_OPEN):
            n = len(data)
            out = self._data_to_send
            out += data_frame_head(stream_id, n, end_stream)
            out += data
            light.window -= n
            self.outbound_flow_control_window -= n
            if end_stream:
                del self._light[stream_id]
                self._light_closed(stream_id, _CLOSED_BY.SEND_END_STREAM)
            return
        stream = self._get_stream_by_id(stream_id)
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        n = len(data)
        out = self._data_to_send
        out += data_frame_head(stream_id, n, end_stream)
        out += data
        stream.outbound_flow_control_window -= n
        self.outbound_flow_control_window -= n

    def acknowledge_connection_data(self, size: int) -> None:
        """
        The connection-level half of C{acknowledge_received_data}: a
        stream's held (unconsumed) body then only closes its own window,
        never the other streams'.
        """
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            f = WindowUpdateFrame(0)
            f.window_increment = increment
            self._prepare_for_sending([f])

    def acknowledge_stream_data(self, size: int, stream_id: int) -> None:
        """
        The stream-level half of C{acknowledge_received_data}.
        """
        try:
            stream = self._get_stream_by_id(stream_id)
        except h2.exceptions.StreamClosedError:
            return
        if stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(size))

    def send_goaway(self, last_stream_id: int) -> None:
        """
        Queue a GOAWAY(NO_ERROR) announcing that streams after
        C{last_stream_id} will not be processed, keeping the connection
        usable for the streams up to it.
        """
        f = GoAwayFrame(0)
        f.last_stream_id = last_stream_id
        f.error_code = ErrorCodes.NO_ERROR
        self._prepare_for_sending([f])


class H2Channel(PeerStrings, Protocol, TimeoutMixin):
    """
    One HTTP/2 client connection of a L{ProxySite}: hyper-h2's state
    machine (L{ServerConnection}) as the frame layer, each stream an
    L{H2Request} given to the site's resource as soon as its header block
    (and a small body, see L{PREBUFFER}) has arrived.

    @ivar streams: the open streams (by id) that have a request.
    @ivar conn: the L{ServerConnection}.
    """

    abortTimeout = ABORT_TIMEOUT
    _abortingCall: Any = None
    #: peer-initiated resets allowed in a burst, and replenished per second
    #: (HTTP/2 Rapid Reset)
    _resetTokenBurst = 1000
    _resetTokenRate = 33
    #: control frame bytes buffered for a transport that does not drain
    #: before the connection is aborted
    _maxBufferedControlFrameBytes = 1024 * 17

    peer: Any = None
    local: Any = None
    is_tls = False

    def __init__(self, site: Any, reactor: Any, idle_timeout: float | None = None) -> None:
        self.conn = ServerConnection()
        self.priority = RoundRobin()
        self.site = site
        self.factory = site
        self.timeOut = idle_timeout
        self._reactor = reactor
        self.callLater = reactor.callLater
        self.streams: dict[int, H2Request] = {}
        #: streams whose header block arrived but which are not dispatched
        #: yet (their small body is being collected)
        self._pending: dict[int, H2Request] = {}
        self._outboundStreamQueues: dict[int, deque[Any]] = {}
        self._consumerBlocked: Deferred[None] | None = None
        self._sender = next_iteration_for(reactor, "_send_scheduled")
        self._stillProducing = True
        self._bufferedControlFrames: deque[bytes] = deque()
        self._bufferedControlFrameBytes = 0
        self._resetTokens: float = self._resetTokenBurst
        self._resetTokenTimestamp = reactor.seconds()
        self._closed = False
        self._draining = False
        self._last_accepted: int | None = None
        self._peer_going_away = False
        #: streams whose response head ended them, forgotten once it is sent
        self._done: list[int] = []

    # --- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        t = self.transport
        self.peer = t.getPeer()
        self.local = t.getHost()
        self.is_tls = ISSLTransport.providedBy(t)
        if ITCPTransport.providedBy(t):
            t.setTcpNoDelay(True)
        self.setTimeout(self.timeOut)
        self.conn.initiate_connection()
        t.write(self.conn.data_to_send())
        try:
            t.registerProducer(self, True)
        except RuntimeError:
            pass

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._close(Failure(), abort_after=True)
            return
        self.resetTimeout()
        for event in events:
            self._dispatch(event)
            if self._closed:
                return
        self._tryToWriteControlData()
        if self._peer_going_away:
            self._close_if_done()

    def _dispatch(self, event: Any) -> None:
        kind = type(event)
        if kind is WholeRequest:
            stream_id = event.stream_id
            if self._last_accepted is not None and stream_id > self._last_accepted:
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
                return
            req = H2Request(self, stream_id, event.method, event.path, event.fields)
            self.streams[stream_id] = req
            self._outboundStreamQueues[stream_id] = deque()
            self.priority.insert_blocked(stream_id)
            self._render(req)
        elif kind is h2.events.RequestReceived:
            stream_id = event.stream_id
            if self._last_accepted is not None and stream_id > self._last_accepted:
                # opened after our GOAWAY: the client may retry it elsewhere
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
                return
            self._request_received(event)
        elif kind is h2.events.DataReceived:
            stream_id = event.stream_id
            req = self.streams.get(stream_id)
            if req is None:
                # a stream we refused or have already answered: its bytes
                # still count against the connection's window
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif stream_id in self._pending:
                self._collect(req, event)
            else:
                # the connection's window at once, the stream's once the
                # body's consumer took the data
                self.conn.acknowledge_connection_data(event.flow_controlled_length)
                req.body_received(event.data, event.flow_controlled_length)
        elif kind is h2.events.StreamEnded:
            req = self.streams.get(event.stream_id)
            if req is not None:
                if self._pending.pop(event.stream_id, None) is not None:
                    req.body_length = req._held_bytes
                    req.body_done = True
                    self._render(req)
                else:
                    req.body_complete()
        elif kind is h2.events.StreamReset:
            if event.stream_id in self.streams:
                self._requestAborted(event)
        elif kind is h2.events.WindowUpdated:
            self._handleWindowUpdate(event)
        elif kind is h2.events.RemoteSettingsChanged:
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._windows_changed()
        elif kind is h2.events.ConnectionTerminated:
            if event.error_code != ErrorCodes.NO_ERROR:
                self._close(Failure(ConnectionLost(
                    "client sent GOAWAY with %s" % (event.error_code,))))
            else:
                self._peer_going_away = True
        elif kind is h2.events.PriorityUpdated:
            # accepted and ignored (see RoundRobin)
            pass

    def _terminate(self, reason: Failure) -> None:
        # the GOAWAY (too many resets) is queued by the caller
        self._close(reason, abort_after=True)

    def _close(self, reason: Failure, abort_after: bool = False) -> None:
        """
        Send what is queued (a GOAWAY first of all), stop producing, close
        the transport and fail the open streams.  With C{abort_after}, a
        peer that does not read is cut off after L{abortTimeout}.
        """
        if self._closed:
            return
        self._closed = True
        self._stillProducing = False
        t = self.transport
        pending = b"".join(self._bufferedControlFrames) + self.conn.data_to_send()
        self._bufferedControlFrames.clear()
        self._bufferedControlFrameBytes = 0
        if pending:
            t.write(pending)
        try:
            # a TLS transport only closes once no producer is registered
            t.unregisterProducer()
        except RuntimeError:
            pass
        t.loseConnection()
        if abort_after and self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.connectionLost(reason, _cancelTimeouts=False)

    def forceAbortClient(self) -> None:
        self._abortingCall = None
        self.transport.abortConnection()

    def _close_if_done(self) -> None:
        if not self._closed and not self.streams:
            self._close(Failure(ConnectionDone()))

    def timeoutConnection(self) -> None:
        if self.streams:
            # streams in progress (a long poll, a quiet event stream): not idle
            self.setTimeout(self.timeOut)
            return
        self.conn.close_connection(error_code=ErrorCodes.NO_ERROR)
        self._close(Failure(ConnectionLost("idle timeout")), abort_after=True)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone()),
                       _cancelTimeouts: bool = True) -> None:
        if self._send_queued:
            self._send_queued = False
            self._sender.discard(self)
        self._closed = True
        self._stillProducing = False
        if _cancelTimeouts:
            self.setTimeout(None)
        for req in list(self.streams.values()):
            req.stream_reset(reason)
        for stream_id in list(self.streams):
            self._requestDone(stream_id)
        if _cancelTimeouts and self._abortingCall is not None:
            self._abortingCall.cancel()
            self._abortingCall = None

    # --- the transport's producer ----------------------------------------------

    def stopProducing(self) -> None:
        self.connectionLost(Failure(ConnectionLost("Producing stopped")))

    def pauseProducing(self) -> None:
        self._consumerBlocked = Deferred()
        # pending control data goes first once the transport drains
        self._consumerBlocked.addCallback(self._flushBufferedControlData)

    def resumeProducing(self) -> None:
        d, self._consumerBlocked = self._consumerBlocked, None
        if d is not None:
            d.callback(None)

    # --- the site's interface -------------------------------------------------

    def is_idle(self) -> bool:
        return not self.streams

    def close_when_idle(self) -> None:
        """
        Graceful shutdown: GOAWAY now, the streams opened so far complete,
        then the connection closes.
        """
        if self._closed:
            return
        if not self._draining:
            self._draining = True
            self._last_accepted = self.conn.highest_inbound_stream_id
            self.conn.send_goaway(self._last_accepted)
            self._tryToWriteControlData()
        self._close_if_done()

    def abort(self) -> None:
        self._closed = True
        self.transport.abortConnection()

    # --- streams: requests --------------------------------------------------------

    def _request_received(self, event: Any) -> None:
        stream_id = event.stream_id
        method = path = authority = None
        raw: list[tuple[bytes, bytes]] = []
        host = False
        length = None
        expect = False
        for header in event.headers:
            name = header[0]
            if name[0] == 0x3A:
                if name == b":method":
                    method = header[1]
                elif name == b":path":
                    path = header[1]
                elif name == b":authority":
                    authority = header[1]
                continue
            if name == b"host":
                host = True
            elif name == b"content-length":
                try:
                    length = int(header[1])
                except ValueError:
                    length = None
            elif name == b"expect":
                expect = header[1].lower() == b"100-continue"
            raw.append((name, header[1]))
        if authority is not None and not host:
            raw.insert(0, (b"host", authority))
        req = H2Request(self, stream_id, method or b"", path or b"", raw)
        self.streams[stream_id] = req
        self._outboundStreamQueues[stream_id] = deque()
        self.priority.insert_blocked(stream_id)
        ended = event.stream_ended is not None
        if ended:
            self._render(req)
            return
        req.body_done = False
        req.expect_continue = expect
        if length is not None and length >= 0:
            req.body_length = length
            self._render(req)
        elif expect:
            # the client waits for 100 Continue before it sends the body:
            # streamed, its length unknown
            req.body_length = -1
            self._render(req)
        else:
            # no declared length: collect a small body (dispatched with its
            # length at END_STREAM), stream a larger one
            req.body_length = -1
            self._pending[stream_id] = req

    def _collect(self, req: H2Request, event: Any) -> None:
        """
        Body data of a stream not dispatched yet: held, and acknowledged
        (the client may send more than one window before END_STREAM); past
        L{PREBUFFER} bytes the stream is dispatched with its body streamed.
        """
        if req._held is None:
            req._held = []
        req._held.append((event.data, 0))
        req._held_bytes += len(event.data)
        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if req._held_bytes > PREBUFFER:
            del self._pending[event.stream_id]
            self._render(req)

    def _render(self, req: H2Request) -> None:
        site = self.site
        try:
            resource = site.resource
            if not resource.isLeaf:
                resource = site.getResourceFor(req)
            else:
                req.site = site
            body = resource.render(req)
            if isinstance(body, bytes):
                if not req.started:
                    req.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
                req.write(body)
                req.finish()
        except Exception:
            site.render_failed(req, Failure())

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """
        C{flow_length} bytes of C{stream_id}'s body were consumed: give them
        back to the stream's window (the connection's was at receipt).
        """
        if flow_length and not self._closed:
            self.conn.acknowledge_stream_data(flow_length, stream_id)
            self._tryToWriteControlData()

    def _requestAborted(self, event: Any) -> None:
        stream_id = event.stream_id
        self.streams[stream_id].stream_reset(
            Failure(ConnectionLost("Stream reset with code %s" % event.error_code)))
        self._requestDone(stream_id)
        # refill for the elapsed time, then spend one token; an empty
        # bucket is a Rapid Reset flood: GOAWAY and close
        now = self._reactor.seconds()
        elapsed = max(0.0, now - self._resetTokenTimestamp)
        self._resetTokens = min(self._resetTokenBurst,
                                self._resetTokens + elapsed * self._resetTokenRate)
        self._resetTokenTimestamp = now
        if self._resetTokens < 1:
            self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
            self._terminate(Failure(ConnectionLost("Too many stream resets")))
        else:
            self._resetTokens -= 1

    def _requestDone(self, streamID: int) -> None:
        """
        The stream is over (answered, reset, or the connection is gone):
        forget it and the body data it still held.
        """
        req = self.streams.pop(streamID, None)
        self._pending.pop(streamID, None)
        self._outboundStreamQueues.pop(streamID, None)
        try:
            self.priority.remove_stream(streamID)
        except priority.MissingStreamError:
            pass
        if req is not None:
            req.release_held()
        if (self._draining or self._peer_going_away) and not self._closed:
            self._close_if_done()

    # --- streams: responses --------------------------------------------------------

    def send_head(self, stream_id: int, code: int, headers: list[tuple[bytes, bytes]],
                  end: bool) -> None:
        """
        Queue a response head; with C{end} it ends the stream (a response
        without a body).
        """
        if self._closed:
            return
        try:
            self.conn.send_response_head(stream_id, code, headers, end)
        except h2.exceptions.StreamClosedError:
            # the client reset the stream meanwhile
            return
        self._wake()

    def send_informational(self, stream_id: int, block: list[Any]) -> None:
        """
        Queue a 1xx head (100 Continue).
        """
        if self._closed:
            return
        try:
            self.conn.send_headers(stream_id, block)
        except h2.exceptions.StreamClosedError:
            return
        self._wake()

    def queue_data(self, stream_id: int, data: bytes) -> None:
        queue = self._outboundStreamQueues.get(stream_id)
        if queue is None or self._closed:
            return
        queue.append(data)
        window = self.conn.local_flow_control_window(stream_id)
        if window > 0:
            self.priority.unblock(stream_id)
            self._wake()
        for chunk in queue:
            if chunk is not _END_STREAM:
                window -= len(chunk)
        if window <= 0:
            self.streams[stream_id].window_blocked()

    def stream_ended(self, stream_id: int, queued: bool) -> None:
        """
        A response is complete.  With C{queued}, its end goes behind its
        queued data (the last DATA frame carries END_STREAM); without, its
        head already ended the stream.  What is queued is sent now, so that
        the last data goes out with the head (one TLS record for a small
        response).
        """
        queue = self._outboundStreamQueues.get(stream_id)
        if queue is None:
            return
        if queued:
            if len(queue) == 1 and self._consumerBlocked is None and not self._closed:
                # one piece left (a small response): its frame ends the
                # stream, if the windows and the frame size allow
                conn = self.conn
                data = queue[0]
                n = len(data)
                if (n <= conn.local_flow_control_window(stream_id)
                        and n <= conn.max_outbound_frame_size):
                    queue.clear()
                    conn.send_data_frame(stream_id, data, True)
                    self.priority.block(stream_id)
                    self._done.append(stream_id)
                    queued = False
            if queued:
                queue.append(_END_STREAM)
                self.priority.unblock(stream_id)
        else:
            self._done.append(stream_id)
        if self._send_queued and self._consumerBlocked is None:
            self._send_queued = False
            self._sender.discard(self)
            self._sendPrioritisedData()
        else:
            self._schedule_send()

    def reset_stream(self, stream_id: int) -> None:
        """
        Abort one stream (RST_STREAM INTERNAL_ERROR).
        """
        if self._closed or stream_id not in self.streams:
            return
        try:
            self.conn.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.StreamClosedError:
            pass
        if self._tryToWriteControlData():
            self._requestDone(stream_id)

    def remaining_window(self, stream_id: int) -> int:
        if stream_id not in self._outboundStreamQueues:
            return 0
        return self.remainingOutboundWindow(stream_id)

    def remainingOutboundWindow(self, stream_id: int) -> int:
        """
        The stream's send window less the data queued for it.
        """
        window = self.conn.local_flow_control_window(stream_id)
        for chunk in self._outboundStreamQueues[stream_id]:
            if chunk is not _END_STREAM:
                window -= len(chunk)
        return window

    def _handleWindowUpdate(self, event: Any) -> None:
        stream_id = event.stream_id
        queues = self._outboundStreamQueues
        if stream_id:
            req = self.streams.get(stream_id)
            if req is None:
                # a late WINDOW_UPDATE for a finished stream
                return
            if queues.get(stream_id):
                self.priority.unblock(stream_id)
            req.window_opened()
        else:
            for sid, req in list(self.streams.items()):
                if queues.get(sid):
                    self.priority.unblock(sid)
                req.window_opened()
        self._wake_sender()

    def _windows_changed(self) -> None:
        """
        SETTINGS_INITIAL_WINDOW_SIZE changed every stream's send window by
        the same amount: retry the streams that have data waiting.
        """
        queues = self._outboundStreamQueues
        for stream_id, req in list(self.streams.items()):
            if queues.get(stream_id):
                self.priority.unblock(stream_id)
            req.window_opened()
        self._wake_sender()

    # --- sending ------------------------------------------------------------------

    #: the send loop is due in the next reactor iteration (L{mproxy.nextturn.NextIteration})
    _send_queued = False
    _waiting_for_consumer = False

    def _consumer_ready(self, *args: Any) -> None:
        self._waiting_for_consumer = False
        self._sendPrioritisedData()

    def _schedule_send(self, *args: Any) -> None:
        """
        Run the send loop at the start of the next reactor iteration (once,
        however many streams got data meanwhile).
        """
        if not self._send_queued and self._stillProducing:
            self._send_queued = True
            self._sender.add(self)

    _wake = _wake_sender = _schedule_send

    def _send_scheduled(self) -> None:
        self._send_queued = False
        self._sendPrioritisedData()

    def _tryToWriteControlData(self) -> bool:
        """
        Write what the state machine has queued (control frames, heads),
        or buffer it while the transport is full.

        @return: C{False} if the connection was aborted because too much
            was buffered for a client that does not read.
        """
        data = self.conn.data_to_send()
        if not data:
            return True
        if self._consumerBlocked is None and not self._bufferedControlFrames:
            self.transport.write(data)
            return True
        self._bufferedControlFrames.append(data)
        self._bufferedControlFrameBytes += len(data)
        if self._bufferedControlFrameBytes >= self._maxBufferedControlFrameBytes:
            self.transport.abortConnection()
            self.connectionLost(Failure(ConnectionLost(
                "too many control frame bytes buffered")))
            return False
        return True

    def _flushBufferedControlData(self, *args: Any) -> None:
        while self._consumerBlocked is None and self._bufferedControlFrames:
            data = self._bufferedControlFrames.popleft()
            self._bufferedControlFrameBytes -= len(data)
            self.transport.write(data)

    def _sendPrioritisedData(self, *args: Any) -> None:
        """
        Send frames of the streams that have data and send window, in
        turns, until none is left, the transport is full or L{SEND_BUDGET}
        bytes went out (then again next iteration); the frames go to the
        transport in one write.  A stream's last data frame carries
        END_STREAM.  A stream whose window is zero or negative waits
        (blocked) for a WINDOW_UPDATE or a larger initial window.
        """
        if not self._stillProducing:
            return
        conn = self.conn
        priority_tree = self.priority
        queues = self._outboundStreamQueues
        budget = SEND_BUDGET
        done = self._done
        if done:
            self._done = []
        ready = priority_tree._ready
        try:
            while True:
                if not ready:
                    # nothing to send: wait until a stream has data
                    return
                stream = next(priority_tree)
                if self._consumerBlocked is not None:
                    # the transport is full: resume when it drains
                    if not self._waiting_for_consumer:
                        self._waiting_for_consumer = True
                        self._consumerBlocked.addCallback(self._consumer_ready)
                    return
                if budget <= 0:
                    self._schedule_send()
                    return
                queue = queues[stream]
                frameData = queue.popleft()
                if frameData is _END_STREAM:
                    conn.end_stream(stream)
                    priority_tree.block(stream)
                    done.append(stream)
                    continue
                window = conn.local_flow_control_window(stream)
                if window <= 0:
                    queue.appendleft(frameData)
                    priority_tree.block(stream)
                    self.streams[stream].window_blocked()
                    continue
                size = min(conn.max_outbound_frame_size, window)
                if len(frameData) > size:
                    if not isinstance(frameData, memoryview):
                        frameData = memoryview(frameData)
                    queue.appendleft(frameData[size:])
                    frameData = frameData[:size]
                end = bool(queue) and queue[0] is _END_STREAM
                if end:
                    queue.popleft()
                conn.send_data_frame(stream, frameData, end)
                budget -= len(frameData)
                if end:
                    priority_tree.block(stream)
                    done.append(stream)
                    continue
                if not queue:
                    priority_tree.block(stream)
                    if window - len(frameData) <= 0:
                        self.streams[stream].window_blocked()
                elif self.remainingOutboundWindow(stream) <= 0:
                    self.streams[stream].window_blocked()
        finally:
            alive = True
            if conn._data_to_send:
                self.resetTimeout()
                # False: aborted, too much buffered for a client that does not read
                alive = self._tryToWriteControlData()
            if alive:
                for stream in done:
                    if stream in self.streams:
                        self._requestDone(stream)
