"""
L{LoadClient}: steady HTTP/1.1 load from many keep-alive clients, counting
every request that failed.

Each client sends one GET at a time over a persistent connection, and reuses
that connection the way urllib3 reuses a pooled one: before sending on an
idle connection it checks that nothing happened on it while it was idle (no
bytes arrived, the peer did not close it, the socket is not readable).  A
connection that fails the check is dropped and a new one opened; that is
not a failure, since the client never sent anything on it.  A request that
was sent and did not get a complete response with an expected status is a
failure: connection refused, reset or closed before the response ended, an
unexpected status, no answer within the timeout.  A response with
C{Connection: close} ends its connection; the next request opens a new one.
"""

from __future__ import annotations

import select
from typing import Any, Callable, Iterable, Mapping

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import ISystemHandle
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


@frozen
class LoadReport:
    """
    What a L{LoadClient} saw so far.

    @ivar ok: requests answered completely with an expected status.
    @ivar failures: one line per failed request, saying what went wrong.
    @ivar connections: connections opened.
    @ivar discarded: idle connections dropped by the check before reuse.
    """

    ok: int
    failures: tuple[str, ...]
    connections: int
    discarded: int


def socket_readable(transport: Any) -> bool:
    """
    Whether the socket under C{transport} has something to read (bytes, or
    the peer's close), without waiting: urllib3's test of an idle pooled
    connection.  A transport without a socket is never readable.
    """
    if not ISystemHandle.providedBy(transport):
        return False
    try:
        readable, _, _ = select.select([transport.getHandle()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _ResponseError(Exception):
    pass


class _Connection(Protocol):
    """
    One keep-alive connection: sends a request, parses one response at a
    time (Content-Length, chunked, or ended by the close), and notes
    anything arriving while no request is outstanding.
    """

    def __init__(self) -> None:
        self.waiting: Deferred[int] | None = None
        self.stale = False
        self.closed = False
        self.keep_alive = True
        self._buffer = b""
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._remaining: int | None = None  # body bytes left (Content-Length)
        self._chunked = False
        self._until_close = False

    def request(self, data: bytes) -> Deferred[int]:
        """
        Send C{data}; fires with the response's status once it is complete.
        """
        d: Deferred[int] = Deferred()
        self.waiting = d
        self._buffer = b""
        self._head = None
        self.transport.write(data)
        return d

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            self.stale = True  # bytes nobody asked for: the connection is unusable
            return
        self._buffer += data
        try:
            self._parse()
        except _ResponseError as e:
            self._fail(str(e))
            self.transport.abortConnection()

    def _parse(self) -> None:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 65536:
                    raise _ResponseError("response header section too large")
                return
            lines = self._buffer[:end].split(b"\r\n")
            self._buffer = self._buffer[end + 4:]
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise _ResponseError(f"malformed status line {lines[0][:80]!r}")
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            status = int(parts[1])
            self._head = (status, headers)
            connection = headers.get(b"connection", b"").lower()
            self.keep_alive = b"close" not in connection and parts[0] != b"HTTP/1.0"
            self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
            self._until_close = False
            self._remaining = None
            if status in (204, 304) or 100 <= status < 200:
                self._remaining = 0
            elif not self._chunked:
                if b"content-length" in headers:
                    self._remaining = int(headers[b"content-length"])
                else:
                    self._until_close = True
                    self.keep_alive = False
        if self._until_close:
            self._buffer = b""
            return
        if self._chunked:
            while True:
                line_end = self._buffer.find(b"\r\n")
                if line_end < 0:
                    return
                try:
                    size = int(self._buffer[:line_end].split(b";")[0], 16)
                except ValueError:
                    raise _ResponseError("malformed chunk size")
                if size == 0:
                    end = self._buffer.find(b"\r\n\r\n", line_end)
                    if end < 0:
                        return
                    self._buffer = self._buffer[end + 4:]
                    break
                if len(self._buffer) < line_end + 2 + size + 2:
                    return
                self._buffer = self._buffer[line_end + 2 + size + 2:]
        else:
            assert self._remaining is not None
            taken = min(self._remaining, len(self._buffer))
            self._remaining -= taken
            self._buffer = self._buffer[taken:]
            if self._remaining:
                return
        self._complete()

    def _complete(self) -> None:
        assert self._head is not None
        d, self.waiting = self.waiting, None
        if self._buffer:
            self.stale = True  # more than one response: unusable
        if d is not None:
            d.callback(self._head[0])

    def _fail(self, reason: str) -> None:
        d, self.waiting = self.waiting, None
        if d is not None:
            d.errback(Failure(_ResponseError(reason)))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.stale = True
        if self.waiting is not None and self._head is not None and self._until_close:
            self._complete()
            return
        what = "before the response" if self._head is None else "in the middle of the response"
        self._fail(f"connection closed {what}: {reason.getErrorMessage() if reason else ''}")


class LoadClient:
    """
    C{clients} keep-alive clients, each sending GET C{path} to C{host}:C{port}
    one request at a time, pausing C{interval} seconds between requests.
    L{start} starts them, L{stop} stops them once their requests in flight
    have ended and fires with the L{LoadReport}.

    @param headers: request headers (C{Host} among them; by default
        C{Host: example.com}).
    @param expect: the statuses that count as success.
    @param timeout: seconds a request may take before it is a failure.
    @param readable: urllib3's test of an idle socket (L{socket_readable}),
        replaceable where the transports have no socket.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        host: str = "127.0.0.1",
        clients: int = 20,
        path: bytes = b"/",
        headers: Mapping[bytes, bytes] | None = None,
        interval: float = 0.0,
        timeout: float = 10.0,
        expect: Iterable[int] = (200,),
        readable: Callable[[Any], bool] = socket_readable,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.host = host
        self.clients = clients
        self.interval = interval
        self.timeout = timeout
        self.expect = frozenset(expect)
        self.readable = readable
        header_lines = b"".join(
            b"%s: %s\r\n" % (k, v) for k, v in (headers or {b"Host": b"example.com"}).items()
        )
        self._request = b"GET %s HTTP/1.1\r\n%s\r\n" % (path, header_lines)
        self._running = False
        self._active = 0
        self._stopped: list[Deferred[LoadReport]] = []
        self._waiters: list[tuple[int, Deferred[LoadReport]]] = []
        self.ok = 0
        self.failures: list[str] = []
        self.connections = 0
        self.discarded = 0

    def report(self) -> LoadReport:
        return LoadReport(self.ok, tuple(self.failures), self.connections, self.discarded)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for _ in range(self.clients):
            self._active += 1
            self._next(None)

    def until(self, ok: int) -> Deferred[LoadReport]:
        """
        Fires with the report once C{ok} requests (counted since the start)
        succeeded.
        """
        d: Deferred[LoadReport] = Deferred()
        self._waiters.append((ok, d))
        self._check_waiters()
        return d

    def stop(self) -> Deferred[LoadReport]:
        """
        Send no more requests; fires with the report once every client's
        request in flight has ended.
        """
        self._running = False
        d: Deferred[LoadReport] = Deferred()
        self._stopped.append(d)
        self._check_stopped()
        return d

    def _endpoint(self) -> Any:
        if ":" in self.host:
            return TCP6ClientEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        return TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)

    def _usable(self, connection: _Connection | None) -> bool:
        if connection is None:
            return False
        if connection.closed or connection.stale or not connection.keep_alive:
            if not connection.closed:
                self.discarded += 1
                connection.transport.loseConnection()
            return False
        if self.readable(connection.transport):
            self.discarded += 1
            connection.transport.loseConnection()
            return False
        return True

    def _next(self, connection: _Connection | None) -> None:
        if not self._running:
            if connection is not None and not connection.closed:
                connection.transport.loseConnection()
            self._active -= 1
            self._check_stopped()
            return
        if self._usable(connection):
            assert connection is not None
            self._send(connection)
            return
        self.connections += 1
        factory = Factory.forProtocol(_Connection)
        d = self._endpoint().connect(factory)

        def refused(f: Failure) -> None:
            self._failed(f"connect: {f.getErrorMessage()}")
            self._later(None)

        d.addCallbacks(self._send, refused)

    def _send(self, connection: _Connection) -> None:
        d = connection.request(self._request)
        timer = self.reactor.callLater(self.timeout, self._timed_out, connection)

        def answered(status: int) -> None:
            if timer.active():
                timer.cancel()
            if status in self.expect:
                self.ok += 1
                self._check_waiters()
            else:
                self._failed(f"status {status}")
            self._later(connection)

        def failed(f: Failure) -> None:
            if timer.active():
                timer.cancel()
            self._failed(f.getErrorMessage())
            self._later(None)

        d.addCallbacks(answered, failed)

    def _timed_out(self, connection: _Connection) -> None:
        connection._fail(f"no complete response within {self.timeout:g}s")
        connection.transport.abortConnection()

    def _later(self, connection: _Connection | None) -> None:
        if self.interval > 0:
            self.reactor.callLater(self.interval, self._next, connection)
        else:
            self._next(connection)

    def _failed(self, reason: str) -> None:
        self.failures.append(reason)

    def _check_waiters(self) -> None:
        for item in list(self._waiters):
            if self.ok >= item[0]:
                self._waiters.remove(item)
                item[1].callback(self.report())

    def _check_stopped(self) -> None:
        if self._active == 0:
            stopped, self._stopped = self._stopped, []
            for d in stopped:
                d.callback(self.report())
