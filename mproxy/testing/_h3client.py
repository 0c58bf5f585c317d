# -*- test-case-name: tests.test_h3_integration -*-
"""
A small HTTP/3 client on Twisted (aioquic's client connection driven from
the reactor), for tests and the benchmark.

    client = H3Client(reactor, "127.0.0.1", 443, server_name="app.test",
                      cafile="ca.pem")          # cafile=None: no verification
    yield client.connect()                      # the handshake
    response = yield client.request("GET", "/") # H3Response(status, headers, body)
    client.peer_certificate                     # the server's leaf certificate
    client.close()

Requests run concurrently on one connection.  A connection that ends fails
the requests still open with L{H3ConnectionLost}.
"""

from __future__ import annotations

import ssl
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol

__all__ = ["H3Client", "H3Response", "H3ConnectionLost"]


class H3ConnectionLost(Exception):
    """
    The connection ended (or a stream was reset) before the response did.
    """


@frozen
class H3Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class _Pending:
    def __init__(self) -> None:
        self.d: Deferred[H3Response] = Deferred()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []


class H3Client(DatagramProtocol):
    def __init__(self, reactor: Any, host: str, port: int, server_name: str | None = None,
                 cafile: str | None = None, idle_timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.address = (host, port)
        config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True,
                                   server_name=server_name, idle_timeout=idle_timeout)
        if cafile is None:
            config.verify_mode = ssl.CERT_NONE
        else:
            config.load_verify_locations(cafile)
        self.quic = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.quic)
        self._port: Any = None
        self._timer: Any = None
        self._connected: Deferred[None] = Deferred()
        self._pending: dict[int, _Pending] = {}
        self.closed = False
        self.close_reason: Any = None

    @property
    def peer_certificate(self) -> Any:
        return getattr(self.quic.tls, "_peer_certificate", None)

    def connect(self) -> Deferred[None]:
        self._port = self.reactor.listenUDP(0, self, interface=self.address[0])
        self.quic.connect(self.address, now=self.reactor.seconds())
        self._transmit()
        return self._connected

    def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                body: bytes | None = None, authority: str | None = None) -> Deferred[H3Response]:
        if self.closed:
            raise H3ConnectionLost("connection closed")
        stream_id = self.quic.get_next_available_stream_id()
        host = authority or self.quic.configuration.server_name or self.address[0]
        head = [(b":method", method.encode()), (b":scheme", b"https"),
                (b":authority", host.encode()), (b":path", path.encode())]
        head += [(n.lower(), v) for n, v in headers]
        p = self._pending[stream_id] = _Pending()
        self.h3.send_headers(stream_id, head, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self._transmit()
        return p.d

    def close(self) -> None:
        if not self.closed:
            self.quic.close()
            self._transmit()
            self._ended("closed by the client")

    # --- the sans-I/O connection --------------------------------------------

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        self.quic.receive_datagram(data, addr, now=self.reactor.seconds())
        self._process()

    def _process(self) -> None:
        while True:
            event = self.quic.next_event()
            if event is None:
                break
            if isinstance(event, qe.HandshakeCompleted):
                if not self._connected.called:
                    self._connected.callback(None)
            elif isinstance(event, qe.ConnectionTerminated):
                self._transmit()
                self._ended(event.reason_phrase or f"error {event.error_code:#x}")
                return
            elif isinstance(event, qe.StreamReset):
                p = self._pending.pop(event.stream_id, None)
                if p is not None:
                    p.d.errback(H3ConnectionLost(f"stream reset ({event.error_code:#x})"))
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)
        self._transmit()

    def _h3_event(self, event: Any) -> None:
        p = self._pending.get(event.stream_id)
        if p is None:
            return
        if isinstance(event, HeadersReceived):
            status = dict(event.headers).get(b":status", b"0")
            if not p.status and not (100 <= int(status) < 200):
                p.status = int(status)
                p.headers = [(n, v) for n, v in event.headers if not n.startswith(b":")]
        elif isinstance(event, DataReceived):
            p.body.append(event.data)
        if getattr(event, "stream_ended", False):
            del self._pending[event.stream_id]
            p.d.callback(H3Response(p.status, p.headers, b"".join(p.body)))

    def _transmit(self) -> None:
        if self._port is None:
            return
        for data, addr in self.quic.datagrams_to_send(now=self.reactor.seconds()):
            try:
                self.transport.write(data, addr)
            except OSError:
                pass
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        at = self.quic.get_timer()
        if at is not None and not self.closed:
            self._timer = self.reactor.callLater(max(0.0, at - self.reactor.seconds()),
                                                 self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self.reactor.seconds())
        self._process()

    def _ended(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.d.errback(H3ConnectionLost(reason))
        if not self._connected.called:
            self._connected.errback(H3ConnectionLost(reason))
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()
