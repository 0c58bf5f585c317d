"""
An in-memory TCP network on a L{MemoryReactorClock}: hosts by name and
address, servers listening on them, and the connections the reactor's
C{connectTCP} asks for, completed and pumped by hand.

    network = MemoryNetwork(reactor)
    network.add_host("web-1", "10.0.1.1")
    network.listen("10.0.1.1", 3000, site)
    reactor.connectTCP("web-1", 3000, factory)   # the code under test
    network.pump()                                # connects, moves bytes

C{pump} does one round: every new C{connectTCP} call is connected (or
fails, as a real one would: an unknown name with L{DNSLookupError}, a port
nobody listens on with L{ConnectionRefusedError}), then every connection
moves what each side wrote to the other.  The reactor's name resolver is
replaced, so L{HostnameEndpoint}s (the health checks) find the same hosts.

The transports behave like TCP where the proxy can tell: a reader paused
with C{pauseProducing} gets nothing until resumed, a streaming producer is
paused while more than L{HIGH_WATER} bytes wait to be read,
C{loseConnection} closes after the written bytes are delivered (both sides
see L{ConnectionDone}), C{abortConnection} drops them (L{ConnectionAborted}
on that side, L{ConnectionLost} on the other).
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    UserError,
)
from twisted.internet.interfaces import (
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

#: bytes a transport buffers before it pauses its streaming producer
HIGH_WATER = 65536


@implementer(IHostResolution)
@attrs.define
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
@attrs.define
class _Resolver:
    """
    Resolves the network's names (and IPv4 literals) to their addresses.
    """

    network: MemoryNetwork

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        address = self.network.address_of(hostName)
        if address is not None:
            resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(ITCPTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """
    One end of an in-memory connection.  What the protocol writes waits in
    C{written} until the network delivers it to the other end.
    """

    connected = 1
    disconnecting = False
    disconnected = False
    aborted = False
    reading_paused = False
    producer: Any = None
    streaming = False
    _producer_paused = False

    def __init__(self, protocol: Any, host: IPv4Address, peer: IPv4Address) -> None:
        self.protocol = protocol
        self.host = host
        self.peer = peer
        self.written: list[bytes] = []
        self.pending = 0
        self.no_delay = False
        self.keep_alive = False

    def write(self, data: bytes) -> None:
        if self.disconnected or self.aborted or not data:
            return
        self.written.append(data)
        self.pending += len(data)
        if (self.streaming and self.producer is not None and not self._producer_paused
                and self.pending > HIGH_WATER):
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def take(self) -> bytes:
        data = b"".join(self.written)
        self.written = []
        self.pending = 0
        return data

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True
        self.written = []
        self.pending = 0

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return self.host

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.keep_alive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = bool(enabled)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        self.streaming = bool(streaming)
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producer_paused = False

    # Reading, as a producer of what the protocol receives.

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    def drained(self) -> bool:
        """
        Everything written was delivered: resume a producer this paused
        (or ask a pull producer for more).  True if one was asked.
        """
        if self.producer is None or self.disconnected:
            return False
        if self.streaming:
            if self._producer_paused:
                self._producer_paused = False
                self.producer.resumeProducing()
                return True
            return False
        self.producer.resumeProducing()
        return True


class Connection:
    """
    An in-memory TCP connection between a client and a server protocol.
    """

    def __init__(self, client: MemoryTransport, server: MemoryTransport, factory: Any,
                 connector: Any) -> None:
        self.client = client
        self.server = server
        self.factory = factory
        self.connector = connector
        self.closed = False

    def pump(self) -> bool:
        """
        Deliver what each side wrote; close the connection once a side's
        close is due.  True if anything happened.
        """
        if self.closed:
            return False
        moved = False
        for source, sink in ((self.client, self.server), (self.server, self.client)):
            if source.written and not source.aborted and not sink.reading_paused \
                    and not sink.aborted:
                data = source.take()
                sink.protocol.dataReceived(data)
                moved = True
                if not source.written and source.drained():
                    moved = True
        for side, other in ((self.client, self.server), (self.server, self.client)):
            if side.aborted:
                self._close(side, ConnectionAborted(), other, ConnectionLost())
                return True
            if side.disconnecting and not side.written:
                self._close(side, ConnectionDone(), other, ConnectionDone())
                return True
        return moved

    def _close(self, side: MemoryTransport, reason: Exception, other: MemoryTransport,
               other_reason: Exception) -> None:
        self.closed = True
        reasons = {id(side): reason, id(other): other_reason}
        for t in (self.server, self.client):
            t.connected = 0
            t.disconnecting = True
            t.disconnected = True
            t.written = []
        for t in (self.server, self.client):
            t.protocol.connectionLost(Failure(reasons[id(t)]))
        self.factory.clientConnectionLost(self.connector, Failure(reasons[id(self.client)]))


class MemoryNetwork:
    """
    The hosts, servers and connections of one L{MemoryReactorClock}.

    @ivar source: the address connections come from when they name no
        C{bindAddress} (the host the code under test runs on).
    """

    def __init__(self, reactor: MemoryReactorClock, source: str = "10.0.0.1") -> None:
        self.reactor = reactor
        self.source = source
        self.connections: list[Connection] = []
        self._names: dict[str, str] = {}
        self._servers: dict[tuple[str, int], Any] = {}
        self._seen = 0
        self._ports = itertools.count(40000)
        reactor.installNameResolver(_Resolver(self))

    def add_host(self, name: str, address: str) -> None:
        """
        Make C{name} resolve to the IPv4 C{address}.
        """
        self._names[name.lower()] = address

    def address_of(self, host: str) -> str | None:
        if isIPAddress(host):
            return host
        return self._names.get(host.lower())

    def listen(self, host: str, port: int, factory: Any) -> None:
        """
        Serve C{factory} on C{host} (a name or address) and C{port}.
        """
        address = self.address_of(host)
        if address is None:
            raise ValueError(f"unknown host {host!r}")
        self._servers[(address, port)] = factory

    def stop_listening(self, host: str, port: int) -> None:
        """
        Refuse new connections to C{host}:C{port}.
        """
        self._servers.pop((self.address_of(host) or host, port), None)

    def pump(self) -> bool:
        """
        Connect what was asked for, then move bytes once on every
        connection.  True if anything happened.
        """
        moved = self._connect_pending()
        for conn in list(self.connections):
            if conn.pump():
                moved = True
        self.connections = [c for c in self.connections if not c.closed]
        return moved

    def _connect_pending(self) -> bool:
        clients = self.reactor.tcpClients
        connectors = self.reactor.connectors
        moved = False
        while self._seen < len(clients):
            host, port, factory, timeout, bind = clients[self._seen]
            connector = connectors[self._seen] if self._seen < len(connectors) else None
            self._seen += 1
            moved = True
            self._connect(host, port, factory, bind, connector)
        return moved

    def _connect(self, host: str, port: int, factory: Any, bind: Any, connector: Any) -> None:
        if connector is not None and connector.stoppedConnecting:
            factory.clientConnectionFailed(connector, Failure(UserError()))
            return
        address = self.address_of(host)
        if address is None:
            factory.clientConnectionFailed(connector, Failure(DNSLookupError(host)))
            return
        server_factory = self._servers.get((address, port))
        if server_factory is None:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        source = bind[0] if bind and bind[0] else self.source
        client_address = IPv4Address("TCP", source, next(self._ports))
        server_address = IPv4Address("TCP", address, port)
        server_protocol = server_factory.buildProtocol(client_address)
        client_protocol = factory.buildProtocol(server_address)
        if server_protocol is None or client_protocol is None:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        server = MemoryTransport(server_protocol, server_address, client_address)
        client = MemoryTransport(client_protocol, client_address, server_address)
        self.connections.append(Connection(client, server, factory, connector))
        server_protocol.makeConnection(server)
        client_protocol.makeConnection(client)
