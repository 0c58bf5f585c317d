# -*- test-case-name: tests.test_http_server -*-
"""
Batched sends on plain TCP transports.

Twisted's C{transport.write} buffers the bytes, registers the socket for
writability (an epoll update), sends them when the reactor dispatches the
writable event and unregisters again (another epoll update).  For a proxy
that writes one small request and one small response per exchange, that
bookkeeping is a large part of the cost.  A L{WriteBatcher} collects what
is written to idle TCP transports during one reactor iteration and sends it
straight to the sockets at the end of it (a reactor with
C{call_at_turn_end}, L{mproxy.workers.reactor}) or at the start of the next
one (C{callLater(0)}), so writes stay batched per iteration but skip the
writability round trip.
A large piece (a body chunk of L{SEND_NOW} bytes or more) is not copied
into the batch: it goes to the socket at once, after what is pending for
the transport, in one C{sendmsg}.  Whatever a socket does not take, and
every transport that is not a plain TCP connection with an empty Twisted
buffer, goes through C{transport.write} as usual.

L{WriteBatcher.write_pieces} sends a large chunk with its framing (a
response head, chunk size lines) the same way, without joining them.
A large piece (L{SEND_NOW} bytes or more) may be a memoryview of bytes (a
body that arrived with its head, L{mproxy.http.rawbody}): what of it goes
to Twisted, which takes only C{bytes}, is copied; a transport whose
C{takes_views} is true (the TLS connection of L{mproxy.tls.fasttls}) gets
it as it is.

Rule for users: once bytes for a transport may have gone through
L{WriteBatcher.write}, call L{WriteBatcher.flush_transport} before any
other write to, or close of, that transport.

    batcher = batcher_for(reactor)
    batcher.write(transport, data)
    batcher.write_pieces(transport, (head, data))   # a large chunk and its framing
    batcher.flush_transport(transport)   # then transport.loseConnection()
    batcher.sent_out(transport)          # True: all in the socket (splice may follow)
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import tcp as _tcp

#: transport types whose sockets may be written to directly
DIRECT_TYPES: set[type] = {_tcp.Server, _tcp.Client}
#: above this many pending bytes a transport's data goes to Twisted at once,
#: so that its buffer limits (and producer pausing) apply to large writes
MAX_PENDING = 65536
#: a piece this large is sent at once instead of being batched
SEND_NOW = 16384


def _bytes(piece: bytes | memoryview) -> bytes:
    return piece if type(piece) is bytes else bytes(piece)


def _direct(transport: Any) -> bool:
    """
    The transport's socket may be written to now: a plain TCP connection,
    open, with nothing buffered by Twisted.
    """
    return (type(transport) in DIRECT_TYPES and transport.connected
            and not transport.disconnecting and not transport._aborting
            and not transport._tempDataLen and not transport.dataBuffer)


class WriteBatcher:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        # a transport's first piece is kept as it was given (most
        # transports get one piece per iteration); a second one makes it
        # a bytearray
        self._pending: dict[Any, bytes | bytearray] = {}
        self._call: Any = None
        self._at_turn_end = getattr(reactor, "call_at_turn_end", None)

    def write(self, transport: Any, data: bytes) -> None:
        if not data:
            return
        pending = self._pending
        buf = pending.get(transport)
        if len(data) >= SEND_NOW:
            if buf is not None:
                del pending[transport]
            self._send_now(transport, buf, data)
            return
        if buf is not None:
            if type(buf) is not bytearray:
                buf = pending[transport] = bytearray(buf)
            buf += data
            if len(buf) > MAX_PENDING:
                del pending[transport]
                transport.write(bytes(buf))
            return
        if (len(data) > MAX_PENDING or type(transport) not in DIRECT_TYPES
                or transport._tempDataLen or transport.dataBuffer
                or not transport.connected or transport.disconnecting
                or transport._aborting):
            transport.write(data)
            return
        pending[transport] = bytes(data)
        if self._call is None:
            at_turn_end = self._at_turn_end
            if at_turn_end is not None:
                self._call = True
                at_turn_end(self.flush)
            else:
                self._call = self.reactor.callLater(0, self.flush)

    def _send_now(self, transport: Any, buf: bytes | bytearray | None, data: bytes) -> None:
        """
        Send C{buf} (what was pending) and C{data} to the socket now; what
        it does not take goes to Twisted.
        """
        if type(transport) not in DIRECT_TYPES:
            transport.write(bytes(buf) + data if buf else _bytes(data))
            return
        if transport._aborting:
            return
        if not _direct(transport):
            transport.write(bytes(buf) + data if buf else _bytes(data))
            return
        try:
            if buf:
                n = transport.socket.sendmsg((buf, data))
            else:
                n = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error Twisted will notice itself
            n = 0
        if buf:
            held = len(buf)
            if n < held:
                transport.write(bytes(buf[n:]) + data)
                return
            n -= held
        if n < len(data):
            transport.write(_bytes(data[n:] if n else data))

    def write_pieces(self, transport: Any, pieces: tuple[bytes, ...]) -> None:
        """
        Write C{pieces} (a large body chunk with its head or chunk framing)
        at once, after what is pending for C{transport}: on a plain TCP
        transport in one C{sendmsg}, without joining them; what the socket
        does not take, and every piece for another transport, goes to
        Twisted as a sequence (no join here either).
        """
        buf = self._pending.pop(transport, None)
        if type(transport) not in DIRECT_TYPES or not _direct(transport):
            if type(transport) in DIRECT_TYPES and transport._aborting:
                return
            if buf:
                transport.write(bytes(buf))
            if getattr(transport, "takes_views", False):
                transport.writeSequence(pieces)
            else:
                transport.writeSequence([_bytes(p) for p in pieces])
            return
        if buf:
            pieces = (bytes(buf),) + pieces
        try:
            n = transport.socket.sendmsg(pieces)
        except OSError:
            # EAGAIN, or an error Twisted will notice itself
            n = 0
        for i, piece in enumerate(pieces):
            size = len(piece)
            if n < size:
                rest = [_bytes(p) for p in pieces[i:]]
                if n:
                    rest[0] = _bytes(piece[n:])
                transport.writeSequence(rest)
                return
            n -= size

    def sent_out(self, transport: Any) -> bool:
        """
        Send what is pending for C{transport} (a plain TCP one) to its
        socket now; C{True} when nothing written to it is left outside its
        socket (nothing pending here, nothing buffered by Twisted) and it
        is open, so that bytes may go to the socket directly next.
        """
        if type(transport) not in DIRECT_TYPES or not _direct(transport):
            return False
        buf = self._pending.pop(transport, None)
        if buf:
            try:
                n = transport.socket.send(buf)
            except OSError:
                # EAGAIN, or an error Twisted will notice itself
                n = 0
            if n < len(buf):
                transport.write(bytes(buf[n:]))
                return False
        return True

    def flush_transport(self, transport: Any) -> None:
        """
        Hand what is pending for C{transport} to Twisted now.
        """
        buf = self._pending.pop(transport, None)
        if buf:
            transport.write(bytes(buf))

    def flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        for transport, data in pending.items():
            if transport._aborting:
                continue
            if (transport.connected and not transport.disconnecting
                    and not transport._tempDataLen and not transport.dataBuffer):
                try:
                    n = transport.socket.send(data)
                except OSError:
                    # EAGAIN, or an error Twisted will notice itself
                    n = 0
                if n == len(data):
                    continue
                if n:
                    data = data[n:]
            transport.write(bytes(data))


_batchers: weakref.WeakKeyDictionary[Any, WriteBatcher] = weakref.WeakKeyDictionary()


def batcher_for(reactor: Any) -> WriteBatcher:
    """
    The reactor's batcher (one per reactor, so that one flush per
    iteration serves every connection).
    """
    b = _batchers.get(reactor)
    if b is None:
        b = _batchers[reactor] = WriteBatcher(reactor)
    return b
