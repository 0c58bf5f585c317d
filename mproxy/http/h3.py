# -*- test-case-name: tests.test_h3 -*-
"""
The HTTP/3 front end: QUIC on the HTTPS port's UDP socket, driven sans-I/O
(aioquic's L{QuicConnection} and L{H3Connection}) from Twisted.

    listener = H3Listener(proxy_handler(resource), reactor, select,
                          logger=logger, idle_timeout=75)
    port = reactor.listenUDP(443, listener, interface="127.0.0.1")
    listener.ports.append(port)
    listener.shutdown(timeout) -> Deferred   # graceful stop, then stopListening

    # or, for mproxy run, a service beside the HTTPS listener (Alt-Svc on):
    HTTP3Service(reactor, https_site, certificates.select, logger, bind="",
                 https_port=lambda: https_listener.port, grace=10)

L{H3Listener} is the UDP protocol: it answers unknown QUIC versions with a
version negotiation, starts an L{H3Session} for a client's first Initial
packet and hands every other datagram to the session its destination
connection ID names.  An L{H3Session} owns one QUIC connection: it feeds it
datagrams, sends what it has to send, keeps its one timer on the reactor
(C{callLater}), and turns each request stream into an L{H3Exchange}, the
L{mproxy.http.interfaces.IExchange} the proxy resource drives exactly as it
drives an HTTP/1.1 or HTTP/2 request (routing, buffering, limits, drains,
request log and metrics are the proxy's).

TLS: the certificate is chosen per connection from the ClientHello's
server name by C{select(server_name)} (the HTTPS listener's selection:
L{mproxy.tls.service.CertificateService.select}); no certificate refuses
the handshake.  QUIC is TLS 1.3 only.

Flow control: a response stream whose unacknowledged data passes
L{SEND_HIGH_WATER} pauses its producer (the relay, hence the target) until
it drops below L{SEND_LOW_WATER}; a request body whose consumer is paused
stops getting stream credit (MAX_STREAM_DATA), so the client stops sending;
a request stream gets no credit beyond its first window until its header
section is complete (bounding it), which then has HTTP/1.1's limits (414,
431).  A response sent before the request body ended stops the body
(STOP_SENDING).

Graceful shutdown: a GOAWAY to every client, new connections and new
streams are refused, open streams complete, then each connection closes;
whatever is left after the timeout is closed at once.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Sequence

from aioquic import tls
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mproxy.http.interfaces import IExchange
from mproxy.http.parsing import MAX_HEADER_BYTES, MAX_HEADER_COUNT, MAX_URL_LENGTH
from mproxy.http.request import MAX_QUEUED_BODY, address_strings, reason_bytes
from mproxy.listeners import BindingService
from mproxy.tls.sni import guarded_select, normalise_server_name

__all__ = ["HTTP3Service", "H3Listener", "H3Session", "H3Exchange", "proxy_handler", "SEND_HIGH_WATER", "SEND_LOW_WATER"]

# aioquic logs through the standard library ("quic", "http3") without a
# handler of its own: Python would print its warnings (a client's protocol
# error) to stderr.  What matters is logged here, as JSON.
for _name in ("quic", "http3"):
    logging.getLogger(_name).addHandler(logging.NullHandler())

#: unacknowledged response bytes on a stream above which its producer pauses
SEND_HIGH_WATER = 256 * 1024
#: ... and below which it resumes
SEND_LOW_WATER = 64 * 1024
#: the smallest datagram that may carry a client's first Initial packet
MIN_INITIAL_SIZE = 1200

#: response headers that have no meaning in HTTP/3 (RFC 9114 section 4.2)
_CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_NO_BODY_CODES = frozenset((204, 304))


class _UnrecognizedName(tls.Alert):
    description = tls.AlertDescription.unrecognized_name


class _SNIQuicConnection(QuicConnection):
    """
    A server L{QuicConnection} whose TLS certificate is chosen from the
    ClientHello's server name, and whose request streams can be held (no
    more receive credit) while their body's consumer is full.
    """

    def __init__(self, *, select: Callable[[str | None], Any], logger: Any,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._select = select
        self._mproxy_logger = logger
        self.held_streams: set[int] = set()
        #: request streams whose header section arrived (the others get no
        #: more credit than the first window: it bounds a header section)
        self.headed_streams: set[int] = set()
        self.server_name: str | None = None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = self.tls
        handle_hello = context._server_handle_hello

        def choose_then_handle(input_buf: Buffer, initial_buf: Buffer,
                               handshake_buf: Buffer) -> None:
            start = input_buf.tell()
            hello = tls.pull_client_hello(input_buf)
            input_buf.seek(start)
            self.server_name = name = normalise_server_name(
                hello.server_name.encode("idna") if hello.server_name else None)
            certified = guarded_select(self._select, name, self._mproxy_logger)
            if certified is None:
                self._mproxy_logger.debug(f"No certificate for server name {name!r}",
                                          server_name=name)
                raise _UnrecognizedName(f"no certificate for {name!r}")
            context.certificate = certified.chain[0]
            context.certificate_chain = list(certified.chain[1:])
            context.certificate_private_key = certified.key
            handle_hello(input_buf, initial_buf, handshake_buf)

        context._server_handle_hello = choose_then_handle

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        sid = stream.stream_id
        if sid in self.held_streams or (sid % 4 == 0 and sid not in self.headed_streams):
            return
        super()._write_stream_limits(builder, space, stream)


def unacknowledged(quic: QuicConnection, stream_id: int) -> int:
    """
    Bytes written on C{stream_id} that the peer has not acknowledged yet.
    """
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start


def _address(addr: Any) -> Any:
    host, port = addr[0], addr[1]
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)


@implementer(IExchange)
class H3Exchange:
    """
    One HTTP/3 request stream, as the proxy drives it (see
    L{mproxy.http.interfaces.IExchange}).
    """

    upgrade = False
    is_tls = True
    clientproto = b"HTTP/3.0"
    started = False
    finished = False

    def __init__(self, session: H3Session, stream_id: int,
                 headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.method = b""
        self.uri = b""
        raw: list[tuple[bytes, bytes]] = []
        authority = None
        has_host = False
        length: int | None = None
        for name, value in headers:
            if name.startswith(b":"):
                if name == b":method":
                    self.method = value
                elif name == b":path":
                    self.uri = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"host":
                has_host = True
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            raw.append((name, value))
        if authority is not None and not has_host:
            raw.insert(0, (b"host", authority))
        self.raw_headers = raw
        uri = self.uri
        q = uri.find(b"?")
        self.path, self.query = (uri, b"") if q < 0 else (uri[:q], uri[q + 1:])
        self.client = _address(session.addr)
        self.client_strings = address_strings(self.client)
        if ended:
            self.body_length = 0
        else:
            self.body_length = length if length else -1
        self.body_done = ended
        self.sentLength = 0
        self.code = 200
        self._head: list[tuple[bytes, bytes]] | None = None
        self._no_body = False
        self._producer: Any = None
        self._producer_paused = False
        self._lost: Callable[[], None] | None = None
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._consumer_paused = False
        self.body_producer = _BodyProducer(self)

    # --- the request body ------------------------------------------------------

    def body_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > MAX_QUEUED_BODY:
            self.session.hold(self.stream_id)

    def body_complete(self) -> None:
        self.body_done = True
        if self._on_end is not None:
            self._on_end()

    def set_body_consumer(self, on_data: Callable[[bytes], None], on_end: Callable[[], None],
                          on_error: Callable[[int, str], None]) -> None:
        self._on_data = on_data
        self._on_end = on_end
        queue, self._queue = self._queue, deque()
        self._queued = 0
        for chunk in queue:
            on_data(chunk)
        if not self._consumer_paused:
            self.session.release(self.stream_id)
        if self.body_done and self.body_length:
            on_end()

    def send_continue(self) -> None:
        pass

    # --- the response ---------------------------------------------------------

    def send_informational(self, code: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started or self.finished or code < 102 or code >= 200:
            return
        self.session.send_headers(self.stream_id, self._header_list(code, headers), False)

    def close_after_response(self) -> None:
        pass

    def _header_list(self, code: int,
                     headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = [(b":status", b"%d" % code)]
        for name, value in headers:
            lname = name.lower()
            if lname not in _CONNECTION_HEADERS:
                out.append((lname, value))
        return out

    def start_response(self, code: int, reason: bytes | None,
                       headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.started = True
        self.code = code
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            self._no_body = True
        self._head = self._header_list(code, headers)

    def _send_head(self, end: bool) -> None:
        head, self._head = self._head, None
        if head is not None:
            self.session.send_headers(self.stream_id, head, end)

    def write(self, data: bytes) -> None:
        if self.finished:
            return
        if self._head is not None:
            self._send_head(False)
        if data and not self._no_body:
            self.sentLength += len(data)
            self.session.send_data(self.stream_id, data, False)
            if (self._producer is not None and not self._producer_paused
                    and self.session.unacknowledged(self.stream_id) > SEND_HIGH_WATER):
                self._producer_paused = True
                self.session.watch(self)
                self._producer.pauseProducing()

    def finish(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._producer = None
        if self._head is not None:
            if trailers:
                self._send_head(False)
            else:
                self._send_head(True)
                self.session.exchange_done(self)
                return
        if trailers:
            self.session.send_headers(
                self.stream_id, [(n.lower(), v) for n, v in trailers], True)
        else:
            self.session.send_data(self.stream_id, b"", True)
        self.session.exchange_done(self)

    def abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._producer = None
        self.session.reset(self.stream_id)
        self.session.exchange_done(self)

    def set_lost_handler(self, fn: Callable[[], None] | None) -> None:
        self._lost = fn

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None

    # --- from the session -------------------------------------------------------

    def sent_some(self) -> bool:
        """
        Acknowledgements arrived: resume the producer once the stream has
        room again.  True while it stays paused.
        """
        if not self._producer_paused:
            return False
        if self.session.unacknowledged(self.stream_id) > SEND_LOW_WATER:
            return True
        self._producer_paused = False
        producer = self._producer
        if producer is not None:
            producer.resumeProducing()
        return False

    def connection_lost(self) -> None:
        """
        The stream was reset or the connection ended before the response
        was finished.
        """
        if self.finished:
            return
        self.finished = True
        self._producer = None
        fn, self._lost = self._lost, None
        if fn is not None:
            fn()


def _refusal(exchange: H3Exchange, headers: list[tuple[bytes, bytes]]) -> int:
    """
    The status for a request the proxy does not take (0: it does): only
    origin-form targets (no CONNECT, no C{*}), and the size limits of
    HTTP/1.1 (414, 431).
    """
    if not exchange.uri.startswith(b"/") or exchange.method == b"CONNECT":
        return 400
    if len(exchange.uri) > MAX_URL_LENGTH:
        return 414
    if (len(headers) > MAX_HEADER_COUNT
            or sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEADER_BYTES):
        return 431
    return 0


class _BodyProducer:
    """
    Holds back the client's request body while its consumer is full.
    """

    def __init__(self, exchange: H3Exchange) -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        ex = self.exchange
        ex._consumer_paused = True
        ex.session.hold(ex.stream_id)

    def resumeProducing(self) -> None:
        ex = self.exchange
        ex._consumer_paused = False
        ex.session.release(ex.stream_id)

    def stopProducing(self) -> None:
        self.pauseProducing()


class H3Session:
    """
    One QUIC connection and its HTTP/3 layer (see the module docstring).
    """

    def __init__(self, listener: H3Listener, quic: _SNIQuicConnection, addr: Any) -> None:
        self.listener = listener
        self.quic = quic
        self.addr = addr
        self.clock = listener.clock
        self.h3: H3Connection | None = None
        self.exchanges: dict[int, H3Exchange] = {}
        self._paused: set[H3Exchange] = set()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._transmit_call: Any = None
        self._last_accepted: int | None = None
        self._highest = -4  # the highest request stream seen
        self.closed = False
        # QUIC's idle timeout counts any silence; a quiet long response
        # (long poll, event stream) is not idle: ping while streams are open
        self._keepalive_interval = max(0.5, listener.idle_timeout / 3)
        self._keepalive_call = self.clock.callLater(self._keepalive_interval, self._keepalive)

    def now(self) -> float:
        return self.clock.seconds()

    # --- datagrams, events, timers ----------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        self.quic.receive_datagram(data, addr, self.now())
        self._process()

    def _process(self) -> None:
        quic = self.quic
        while True:
            event = quic.next_event()
            if event is None:
                break
            self._quic_event(event)
        if self._paused:
            for ex in list(self._paused):
                if not ex.sent_some():
                    self._paused.discard(ex)
        self._check_draining()
        if not self.closed:
            self.transmit()

    def _quic_event(self, event: Any) -> None:
        listener = self.listener
        if isinstance(event, qe.ConnectionIdIssued):
            listener.sessions[event.connection_id] = self
        elif isinstance(event, qe.ConnectionIdRetired):
            if listener.sessions.get(event.connection_id) is self:
                del listener.sessions[event.connection_id]
        elif isinstance(event, qe.ConnectionTerminated):
            self._terminated()
            return
        elif isinstance(event, qe.ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN and self.h3 is None:
                self.h3 = H3Connection(self.quic)
        elif isinstance(event, (qe.StreamReset, qe.StopSendingReceived)):
            # the client gave up on the request, or on its response
            ex = self.exchanges.pop(event.stream_id, None)
            if ex is not None:
                ex.connection_lost()
                if isinstance(event, qe.StopSendingReceived):
                    self.reset(event.stream_id)
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: Any) -> None:
        stream_id = event.stream_id
        if isinstance(event, HeadersReceived):
            ex = self.exchanges.get(stream_id)
            if ex is not None:
                # trailers: the body ends here
                if event.stream_ended:
                    ex.body_complete()
                return
            if stream_id % 4 != 0:
                return
            if self._last_accepted is not None and stream_id > self._last_accepted:
                # opened after our GOAWAY: the client may retry it
                self.quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
                self.quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
                return
            self._highest = max(self._highest, stream_id)
            self.quic.headed_streams.add(stream_id)
            ex = H3Exchange(self, stream_id, event.headers, event.stream_ended)
            self.exchanges[stream_id] = ex
            status = _refusal(ex, event.headers)
            if status:
                body = b"<h1>%d %s</h1>" % (status, reason_bytes(status))
                ex.start_response(status, None, [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", b"%d" % len(body))], len(body))
                ex.write(body)
                ex.finish()
                return
            self.listener.render(ex)
        elif isinstance(event, DataReceived):
            ex = self.exchanges.get(stream_id)
            if ex is None or ex.body_done:
                return
            if event.data:
                ex.body_received(event.data)
            if event.stream_ended:
                ex.body_complete()

    def transmit(self) -> None:
        """
        Send every datagram the connection has ready, and re-arm its timer.
        """
        t, self._transmit_call = self._transmit_call, None
        if t is not None and t.active():
            t.cancel()
        write = self.listener.transport.write
        for data, addr in self.quic.datagrams_to_send(now=self.now()):
            try:
                write(data, addr)
            except OSError:
                pass
        at = self.quic.get_timer()
        if at == self._timer_at:
            return
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._timer_at = at
        if at is not None:
            self._timer = self.clock.callLater(max(0.0, at - self.now()), self._on_timer)

    def transmit_soon(self) -> None:
        if self._transmit_call is None and not self.closed:
            self._transmit_call = self.clock.callLater(0, self.transmit)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        self.quic.handle_timer(now=self.now())
        self._process()

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.closed:
            return
        if self.exchanges:
            self.quic.send_ping(0)
            self.transmit()
        self._keepalive_call = self.clock.callLater(self._keepalive_interval, self._keepalive)

    def _terminated(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in (self._timer, self._transmit_call, self._keepalive_call):
            if t is not None and t.active():
                t.cancel()
        exchanges, self.exchanges = self.exchanges, {}
        for ex in exchanges.values():
            ex.connection_lost()
        self.listener.session_ended(self)

    # --- what exchanges ask ------------------------------------------------------

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end: bool) -> None:
        if self.closed or self.h3 is None:
            return
        try:
            self.h3.send_headers(stream_id, headers, end)
        except Exception:
            return
        self.transmit_soon()

    def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if self.closed or self.h3 is None:
            return
        try:
            self.h3.send_data(stream_id, data, end)
        except Exception:
            return
        self.transmit_soon()

    def reset(self, stream_id: int) -> None:
        if self.closed:
            return
        try:
            self.quic.reset_stream(stream_id, ErrorCode.H3_INTERNAL_ERROR)
            self.quic.stop_stream(stream_id, ErrorCode.H3_INTERNAL_ERROR)
        except Exception:
            pass
        self.transmit_soon()

    def unacknowledged(self, stream_id: int) -> int:
        return unacknowledged(self.quic, stream_id)

    def watch(self, exchange: H3Exchange) -> None:
        self._paused.add(exchange)

    def hold(self, stream_id: int) -> None:
        self.quic.held_streams.add(stream_id)

    def release(self, stream_id: int) -> None:
        held = self.quic.held_streams
        if stream_id in held:
            held.discard(stream_id)
            self.transmit_soon()

    def exchange_done(self, exchange: H3Exchange) -> None:
        sid = exchange.stream_id
        if self.exchanges.get(sid) is exchange:
            del self.exchanges[sid]
        self._paused.discard(exchange)
        quic = self.quic
        quic.held_streams.discard(sid)
        quic.headed_streams.discard(sid)
        if not exchange.body_done and not self.closed:
            # answered before the whole body arrived: the rest is not wanted
            try:
                quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
            except ValueError:
                pass
            self.transmit_soon()

    # --- shutdown ---------------------------------------------------------------

    def is_idle(self) -> bool:
        return not self.exchanges

    def close_when_idle(self) -> None:
        """
        GOAWAY now (the streams opened so far complete), close when none is
        left.
        """
        if self.closed:
            return
        if self._last_accepted is None:
            self._last_accepted = self._highest
            if self.h3 is not None:
                control = self.h3._local_control_stream_id
                if control is not None:
                    self.quic.send_stream_data(
                        control, encode_frame(FrameType.GOAWAY,
                                              encode_uint_var(self._last_accepted + 4)))
        self._check_draining()
        self.transmit_soon()

    def _check_draining(self) -> None:
        """
        Draining and nothing left: close once the peer has acknowledged
        every response byte (a closing connection sends nothing else).
        """
        if self._last_accepted is None or self.exchanges or self.closed:
            return
        quic = self.quic
        if any(unacknowledged(quic, sid) for sid in list(quic._streams)):
            return
        self.close()

    def close(self, error_code: int = ErrorCode.H3_NO_ERROR) -> None:
        """
        Close the connection now (CONNECTION_CLOSE is sent); it is gone for
        the listener at once.
        """
        if self.closed:
            return
        self.quic.close(error_code=error_code)
        self.transmit()
        self._terminated()


class H3Listener(DatagramProtocol):
    """
    The UDP protocol of the HTTP/3 port (see the module docstring).

    @param handler: C{handler(exchange)} serves one request (L{proxy_handler}).
    @param select: C{server_name -> CertifiedKey | None}.
    @ivar sessions: connection ID -> L{H3Session}.
    """

    def __init__(self, handler: Callable[[H3Exchange], None], clock: Any, select: Callable[[str | None], Any], *,
                 logger: Any, idle_timeout: float = 75.0,
                 configuration: Callable[[], QuicConfiguration] | None = None) -> None:
        self.handler = handler
        self.clock = clock
        self.select = select
        self.logger = logger
        self.idle_timeout = idle_timeout
        self._configuration = configuration
        self.sessions: dict[bytes, H3Session] = {}
        #: the UDP ports serving this listener, stopped after L{shutdown}
        self.ports: list[Any] = []
        self.connections: set[H3Session] = set()
        self.shutting_down = False
        self._shutdown_waiters: list[Deferred[None]] = []
        self._shutdown_timer: Any = None
        self.supported_versions = self.new_configuration().supported_versions

    def new_configuration(self) -> QuicConfiguration:
        if self._configuration is not None:
            return self._configuration()
        return QuicConfiguration(
            alpn_protocols=H3_ALPN, is_client=False, idle_timeout=self.idle_timeout,
            # the real one is chosen from the ClientHello
            certificate=_CHOSEN_PER_CONNECTION, private_key=_CHOSEN_PER_CONNECTION,
        )

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            self._received(data, addr)
        except Exception as e:
            self.logger.error("Error while handling a QUIC datagram",
                              error=f"{type(e).__name__}: {e}")

    def _received(self, data: bytes, addr: Any) -> None:
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=8)
        except ValueError:
            return
        session = self.sessions.get(header.destination_cid)
        if session is not None:
            session.datagram_received(data, addr)
            return
        if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and header.version is not None
                and header.version not in self.supported_versions):
            self.transport.write(encode_quic_version_negotiation(
                source_cid=header.destination_cid,
                destination_cid=header.source_cid,
                supported_versions=self.supported_versions,
            ), addr)
            return
        if (header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_SIZE
                or self.shutting_down):
            return
        quic = _SNIQuicConnection(
            configuration=self.new_configuration(),
            original_destination_connection_id=header.destination_cid,
            select=self.select, logger=self.logger,
        )
        session = H3Session(self, quic, addr)
        self.connections.add(session)
        self.sessions[header.destination_cid] = session
        self.sessions[quic.host_cid] = session
        session.datagram_received(data, addr)

    def render(self, exchange: H3Exchange) -> None:
        try:
            self.handler(exchange)
        except Exception:
            f = Failure()
            self.logger.error("Error while proxying", error=f.getErrorMessage(),
                              path=exchange.path.decode("latin-1"))
            exchange.abort()

    def session_ended(self, session: H3Session) -> None:
        self.connections.discard(session)
        for cid, s in list(self.sessions.items()):
            if s is session:
                del self.sessions[cid]
        if self.shutting_down and not self.connections:
            self._shutdown_complete()

    def shutdown(self, timeout: float) -> Deferred[None]:
        """
        Graceful stop: GOAWAY everywhere, new connections and streams
        refused, connections close as their streams complete; whatever is
        left after C{timeout} seconds is closed.  Then the UDP ports in
        L{ports} stop listening.
        """
        d: Deferred[None] = Deferred()
        self._shutdown_waiters.append(d)
        if not self.shutting_down:
            self.shutting_down = True
            for s in list(self.connections):
                s.close_when_idle()
            if self.connections:
                self._shutdown_timer = self.clock.callLater(timeout, self._shutdown_expired)
        if not self.connections:
            self._shutdown_complete()
        return d

    def _shutdown_expired(self) -> None:
        self._shutdown_timer = None
        for s in list(self.connections):
            s.close(ErrorCode.H3_NO_ERROR)
        self._shutdown_complete()

    def _shutdown_complete(self) -> None:
        t, self._shutdown_timer = self._shutdown_timer, None
        if t is not None and t.active():
            t.cancel()
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
        waiters, self._shutdown_waiters = self._shutdown_waiters, []
        for d in waiters:
            d.callback(None)


#: stands in for the certificate until the ClientHello names the server
#: (aioquic's server connection insists on having one up front)
_CHOSEN_PER_CONNECTION = object()


def proxy_handler(resource: Any) -> Callable[[H3Exchange], None]:
    """
    Serve exchanges with the proxy resource's request path
    (L{mproxy.http.proxy.handle}).
    """
    from mproxy.http.call import ProxyCall
    from mproxy.http.proxy import handle

    def serve(exchange: H3Exchange) -> None:
        handle(ProxyCall(resource, exchange))

    return serve



class HTTP3Service(BindingService):
    """
    HTTP/3 for C{mproxy run --http3}, as a service of the server's tree:
    UDP on the port the HTTPS listener got (C{https_port()}), serving the
    HTTPS C{site}'s proxy resource (routing, metrics, logs) with its idle
    timeout, and C{Alt-Svc} on the site's TCP responses once bound.
    Without C{bind}: C{::} (dual-stack), else C{0.0.0.0}.  With
    C{inherited} (descriptor, family) UDP sockets (handed over by an
    upgrading server) it serves those instead of binding.  Stopping drains
    (up to C{grace} seconds), then closes the port.

    @ivar port: the UDP port bound, or C{None}.
    """

    def __init__(self, reactor: Any, site: Any, select: Callable[[str | None], Any],
                 logger: Any, *, bind: str, https_port: Callable[[], int | None],
                 grace: float, inherited: Sequence[tuple[int, int]] = ()) -> None:
        self.setName("http3")
        self.inherited = list(inherited)
        self.reactor = reactor
        self.site = site
        self.bind = bind
        self.https_port = https_port
        self.grace = grace
        self.listener = H3Listener(proxy_handler(site.resource), reactor, select,
                                   logger=logger, idle_timeout=site.idle_timeout)
        self.port: int | None = None

    def _bind(self) -> None:
        from mproxy.listeners import listen_failure

        if self.inherited:
            for fd, family in self.inherited:
                # the port listens on a duplicate: the handed-over one stays open
                port = self.reactor.adoptDatagramPort(fd, family, self.listener)
                self.listener.ports.append(port)
                self.port = port.getHost().port
            self.site.resource.alt_svc = [(b"Alt-Svc", b'h3=":%d"; ma=2592000' % self.port)]
            return
        number = self.https_port() or 0
        error: Exception | None = None
        for interface in ([self.bind.strip("[]")] if self.bind else ["::", "0.0.0.0"]):
            try:
                port = self.reactor.listenUDP(number, self.listener, interface=interface)
            except CannotListenError as e:
                error = e
                continue
            self.listener.ports.append(port)
            self.port = port.getHost().port
            break
        if self.port is None:
            assert error is not None
            raise listen_failure("HTTP/3 (UDP)", number, error)
        self.site.resource.alt_svc = [(b"Alt-Svc", b'h3=":%d"; ma=2592000' % self.port)]

    def abandon(self) -> None:
        self.port = None
        ports, self.listener.ports = self.listener.ports, []
        for p in ports:
            p.stopListening()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.site.resource.alt_svc = None
        return self.listener.shutdown(self.grace)
