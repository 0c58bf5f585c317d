"""
WebSockets for end-to-end tests: L{WebSocketClient} (opened with
L{open_websocket}) sends text messages and sees what comes back, and
L{WebSocketUpstream} (served with L{listen_websocket_upstream}) is an app
that echoes them, so a test can check a WebSocket through mproxy keeps
working and how it is closed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def websocket_accept_key(key: bytes) -> bytes:
    """
    The C{Sec-WebSocket-Accept} answering C{Sec-WebSocket-Key: key}.
    """
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def encode_websocket_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """
    One final frame (clients mask theirs, servers do not).
    """
    n = len(payload)
    bit = 0x80 if mask else 0
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(key, payload)


def _unmask(key: bytes, payload: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def decode_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """
    The complete frames at the start of C{data}, as (opcode, unmasked
    payload), and the bytes after them.
    """
    frames, rest = decode_websocket_frames(data)
    return [(opcode, payload) for opcode, payload, _ in frames], rest


def decode_websocket_frames(data: bytes) -> tuple[list[tuple[int, bytes, bool]], bytes]:
    """
    Like L{decode_frames}, with each frame's (opcode, unmasked payload,
    whether it was masked): a test checks clients mask and servers do not.
    """
    frames = []
    while len(data) >= 2:
        opcode, masked, n, pos = data[0] & 0x0F, data[1] & 0x80, data[1] & 0x7F, 2
        if n == 126:
            if len(data) < 4:
                break
            n, pos = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            if len(data) < 10:
                break
            n, pos = struct.unpack("!Q", data[2:10])[0], 10
        key = data[pos:pos + 4] if masked else b""
        pos += len(key)
        if len(data) < pos + n:
            break
        payload = data[pos:pos + n]
        frames.append((opcode, _unmask(key, payload) if masked else payload, bool(masked)))
        data = data[pos + n:]
    return frames, data


class WebSocketClient(Protocol):
    """
    The client end of one WebSocket (see L{open_websocket}).

    @ivar opened: fires with the client once the server answered 101 (fails
        with the response head otherwise).
    @ivar messages: the text messages received, in order.
    @ivar closed: fires when the connection is gone, with the close code the
        server sent (C{None} when it closed without a close frame).
    """

    def __init__(self, path: bytes = b"/", host: bytes = b"example.com") -> None:
        self.path = path
        self.host = host
        self.key = base64.b64encode(os.urandom(16))
        self.opened: Deferred[WebSocketClient] = Deferred()
        self.closed: Deferred[int | None] = Deferred()
        self.messages: list[bytes] = []
        self.close_code: int | None = None
        self._head: bytes | None = None
        self._buffer = b""
        self._waiting: list[Deferred[bytes]] = []
        self._gone = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path, self.host, self.key)
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
            status = self._head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" " or websocket_accept_key(self.key) not in self._head:
                self.opened.errback(Failure(ConnectionError(f"not upgraded: {self._head[:200]!r}")))
                self.transport.loseConnection()
                return
            self.opened.callback(self)
        frames, self._buffer = decode_frames(self._buffer)
        for opcode, payload in frames:
            if opcode == TEXT:
                self.messages.append(payload)
                if self._waiting:
                    self._waiting.pop(0).callback(payload)
            elif opcode == PING:
                self._write(PONG, payload)
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                if self.close_code is None:
                    self.close_code = code
                    self._write(CLOSE, payload[:2])
                self.transport.loseConnection()

    def _write(self, opcode: int, payload: bytes) -> None:
        if not self._gone:
            self.transport.write(encode_websocket_frame(opcode, payload, mask=True))

    def send(self, text: bytes) -> None:
        """
        Send one text message.
        """
        self._write(TEXT, text)

    def next_message(self) -> Deferred[bytes]:
        """
        Fires with the next text message to arrive (fails if the connection
        ends first).
        """
        d: Deferred[bytes] = Deferred()
        if self._gone:
            d.errback(Failure(ConnectionError(f"closed (code {self.close_code})")))
        else:
            self._waiting.append(d)
        return d

    def echo(self, text: bytes) -> Deferred[bytes]:
        """
        Send C{text}; fires with the next message that comes back.
        """
        d = self.next_message()
        self.send(text)
        return d

    def close(self, code: int = 1000) -> None:
        """
        Start the closing handshake.
        """
        self._write(CLOSE, struct.pack("!H", code))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._gone = True
        if not self.opened.called:
            self.opened.errback(Failure(ConnectionError("closed before the upgrade")))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(Failure(ConnectionError(f"closed (code {self.close_code})")))
        self.closed.callback(self.close_code)


def open_websocket(
    reactor: Any, port: int, path: bytes = b"/", host: bytes = b"example.com",
    address: str = "127.0.0.1",
) -> Deferred[WebSocketClient]:
    """
    Open a WebSocket to C{address}:C{port} (C{Host: host}, GET C{path});
    fires with the L{WebSocketClient} once upgraded.
    """
    client = WebSocketClient(path, host)
    d = connectProtocol(TCP4ClientEndpoint(reactor, address, port), client)
    d.addCallback(lambda _: client.opened)
    return d


class _UpstreamConnection(Protocol):
    factory: WebSocketUpstream

    def __init__(self) -> None:
        self._buffer = b""
        self._upgraded = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
            self._request(head)
        frames, self._buffer = decode_frames(self._buffer)
        name = self.factory.name.encode()
        for opcode, payload in frames:
            if opcode == TEXT:
                self.transport.write(encode_websocket_frame(TEXT, name + b":" + payload, mask=False))
            elif opcode == PING:
                self.transport.write(encode_websocket_frame(PONG, payload, mask=False))
            elif opcode == CLOSE:
                self.transport.write(encode_websocket_frame(CLOSE, payload[:2], mask=False))
                self.transport.loseConnection()

    def _request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        target = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) > 1 else b"/"
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if b"websocket" in headers.get(b"upgrade", b"").lower():
            self._upgraded = True
            self.factory.opened += 1
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                % websocket_accept_key(headers.get(b"sec-websocket-key", b""))
            )
            return
        body = b"up" if target.split(b"?")[0] == b"/up" else self.factory.name.encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )


class WebSocketUpstream(Factory):
    """
    An app for WebSockets behind mproxy: a WebSocket upgrade on any path is
    accepted, and each text message comes back as C{<name>:<message>}; a
    close frame is answered and the connection closed.  Other requests get
    200 (C{up} for C{/up}, the name otherwise), so it passes health checks.

    @ivar opened: WebSockets accepted so far.
    """

    protocol = _UpstreamConnection

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = 0


def listen_websocket_upstream(
    reactor: Any, name: str, port: int = 0
) -> tuple[WebSocketUpstream, Any]:
    """
    Serve a new L{WebSocketUpstream} on 127.0.0.1; returns it and the
    listening port.
    """
    app = WebSocketUpstream(name)
    return app, reactor.listenTCP(port, app, interface="127.0.0.1")
