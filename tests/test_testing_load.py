"""
Tests for the kit's load client (L{mproxy.testing.LoadClient}) and WebSocket
helpers (L{mproxy.testing.open_websocket}, L{mproxy.testing.WebSocketUpstream}).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from mproxy.testing import (
    LoadClient,
    UpstreamApp,
    listen_websocket_upstream,
    open_websocket,
)
from mproxy.testing._load import socket_readable

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class _Server:
    """
    The far end of one in-memory client connection.
    """

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def requests(self) -> int:
        return self.transport.value().count(b"GET ")

    def answer(self, data: bytes = OK) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class LoadClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.readable = False
        self.servers: list[_Server] = []

    def client(self, **kw: Any) -> LoadClient:
        kw.setdefault("clients", 1)
        load = LoadClient(self.reactor, 8080, readable=lambda t: self.readable, **kw)
        load.start()
        return load

    def accept(self) -> _Server:
        """
        Complete the oldest connection attempt not yet completed.
        """
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[len(self.servers)]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        server = _Server(protocol, transport)
        self.servers.append(server)
        return server

    def refuse(self) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[len(self.servers)]
        self.servers.append(None)  # type: ignore[arg-type]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def test_keep_alive(self) -> None:
        """
        Each client sends its requests one after the other on one
        connection; C{clients} clients open that many.
        """
        load = self.client(clients=3)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        server = self.accept()
        self.assertEqual(server.requests(), 1)
        self.assertIn(b"Host: example.com\r\n", server.transport.value())
        server.answer()
        server.answer()
        self.assertEqual(server.requests(), 3)
        self.assertEqual(load.report().ok, 2)
        self.assertEqual(load.report().connections, 3)
        self.assertEqual(load.report().failures, ())

    def test_response_split_and_chunked(self) -> None:
        load = self.client()
        server = self.accept()
        server.answer(b"HTTP/1.1 200 OK\r\nContent-")
        server.answer(b"Length: 5\r\n\r\nab")
        self.assertEqual(load.report().ok, 0)
        server.answer(b"cde")
        self.assertEqual(load.report().ok, 1)
        server.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.assertEqual(load.report().ok, 1)
        server.answer(b"0\r\n\r\n")
        self.assertEqual(load.report().ok, 2)
        self.assertEqual(server.requests(), 3)

    def test_closed_while_idle_is_replaced_not_failed(self) -> None:
        """
        A connection the server closed while the client was between
        requests is not reused: a new one is opened, and nothing failed.
        """
        load = self.client(interval=1.0)
        server = self.accept()
        server.answer()
        server.close()
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(server.requests(), 1)
        second = self.accept()
        self.assertEqual(second.requests(), 1)
        self.assertEqual(load.report().failures, ())

    def test_readable_while_idle_is_discarded(self) -> None:
        """
        Before reuse the socket is checked as urllib3 does: one that became
        readable (the peer's close not yet seen) is dropped.
        """
        load = self.client(interval=1.0)
        server = self.accept()
        server.answer()
        self.readable = True
        self.reactor.advance(1.0)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.requests(), 1)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(load.report().discarded, 1)
        self.assertEqual(load.report().failures, ())

    def test_bytes_while_idle_discard(self) -> None:
        load = self.client(interval=1.0)
        server = self.accept()
        server.answer()
        server.answer(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(load.report().failures, ())

    def test_connection_close_response(self) -> None:
        load = self.client()
        server = self.accept()
        server.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(load.report().ok, 1)
        self.assertEqual(server.requests(), 1)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(load.report().failures, ())

    def test_closed_with_request_outstanding_fails(self) -> None:
        load = self.client()
        server = self.accept()
        server.close()
        self.assertEqual(len(load.report().failures), 1)
        self.assertIn("closed before the response", load.report().failures[0])
        self.assertEqual(len(self.reactor.tcpClients), 2)  # and goes on

    def test_closed_mid_response_fails(self) -> None:
        load = self.client()
        server = self.accept()
        server.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        server.close()
        self.assertIn("in the middle of the response", load.report().failures[0])

    def test_refused_fails(self) -> None:
        load = self.client()
        self.refuse()
        self.assertEqual(len(load.report().failures), 1)
        self.assertIn("connect", load.report().failures[0])

    def test_unexpected_status_fails(self) -> None:
        load = self.client(expect=(200, 404))
        server = self.accept()
        server.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        server.answer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(load.report().ok, 1)
        self.assertEqual(load.report().failures, ("status 502",))

    def test_timeout_fails(self) -> None:
        load = self.client(timeout=3.0)
        server = self.accept()
        self.reactor.advance(3.0)
        self.assertIn("within 3s", load.report().failures[0])
        self.assertTrue(server.transport.disconnecting)

    def test_stop_waits_for_requests_in_flight(self) -> None:
        load = self.client()
        server = self.accept()
        stopped = load.stop()
        self.assertNoResult(stopped)
        server.answer()
        report = self.successResultOf(stopped)
        self.assertEqual(report.ok, 1)
        self.assertEqual(server.requests(), 1)
        self.assertTrue(server.transport.disconnecting)

    def test_until(self) -> None:
        load = self.client()
        server = self.accept()
        reached = load.until(2)
        server.answer()
        self.assertNoResult(reached)
        server.answer()
        self.assertEqual(self.successResultOf(reached).ok, 2)


class SocketReadableTests(SynchronousTestCase):
    def test_readable(self) -> None:
        """
        A socket with bytes waiting, or whose peer closed, is readable; an
        idle one is not.
        """
        from zope.interface import implementer
        from twisted.internet.interfaces import ISystemHandle

        a, b = socket.socketpair()
        self.addCleanup(a.close)

        @implementer(ISystemHandle)
        class T:
            def getHandle(self) -> Any:
                return a

        self.assertFalse(socket_readable(T()))
        b.send(b"x")
        self.assertTrue(socket_readable(T()))
        a.recv(1)
        b.close()
        self.assertTrue(socket_readable(T()))
        self.assertFalse(socket_readable(StringTransport()))


class RealLoadTests(TestCase):
    @inlineCallbacks
    def test_against_a_real_server(self) -> Any:
        """
        Over real sockets: requests succeed on few connections.
        """
        site = Site(UpstreamApp(reactor, "app"))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        load = LoadClient(reactor, port.getHost().port, clients=4)
        load.start()
        yield load.until(40)
        report = yield load.stop()
        self.assertEqual(report.failures, ())
        self.assertEqual(report.connections, 4)


class WebSocketTests(TestCase):
    @inlineCallbacks
    def test_echo_and_close(self) -> Any:
        app, port = listen_websocket_upstream(reactor, "ws-1")
        self.addCleanup(port.stopListening)
        ws = yield open_websocket(reactor, port.getHost().port, b"/chat")
        self.assertEqual(app.opened, 1)
        self.assertEqual((yield ws.echo(b"hello")), b"ws-1:hello")
        self.assertEqual((yield ws.echo(b"x" * 70000)), b"ws-1:" + b"x" * 70000)
        ws.close(1001)
        self.assertEqual((yield ws.closed), 1001)

    @inlineCallbacks
    def test_not_upgraded(self) -> Any:
        site = Site(UpstreamApp(reactor, "app"))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with self.assertRaises(ConnectionError):
            yield open_websocket(reactor, port.getHost().port)

    @inlineCallbacks
    def test_upstream_answers_health_checks(self) -> Any:
        app, port = listen_websocket_upstream(reactor, "ws-1")
        self.addCleanup(port.stopListening)
        load = LoadClient(reactor, port.getHost().port, clients=1, path=b"/up")
        load.start()
        yield load.until(3)
        report = yield load.stop()
        self.assertEqual(report.failures, ())
