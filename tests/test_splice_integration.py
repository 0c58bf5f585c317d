"""
End-to-end tests of spliced response bodies (L{mproxy.http.splice}): the
real C{mproxy run} in a child process, an upstream in this process, clients
on blocking sockets in threads, all on 127.0.0.1.  Content-Length bodies
with at least 64 KiB left after the first read go from the target's socket
to the client's through a pipe: they must arrive byte for byte, whatever
the client does, and leave no pipe or connection behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import struct
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.http.splice import MAX_IDLE_PIPES, available
from mproxy.testing import MproxyProcess

from tests.wire import read_response

_bodies: dict[int, bytes] = {}


def body(n: int) -> bytes:
    b = _bodies.get(n)
    if b is None:
        b = _bodies[n] = random.Random(n).randbytes(n)
    return b


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class App(Factory):
    """
    C{/size/N}: N bytes of L{body}; C{/die/N}: the head of an N-byte body,
    half of it, then the connection closed.  Counts connections made and
    lost (health checks' too); C{served}: the paths each connection was
    asked for.
    """

    def __init__(self) -> None:
        self.made = 0
        self.lost = 0
        self.served: list[list[bytes]] = []
        self.timers: list[Any] = []

    def cancel_timers(self) -> None:
        for t in self.timers:
            if t.active():
                t.cancel()

    def buildProtocol(self, addr: Any) -> Protocol:
        p = _Upstream()
        p.factory = self
        return p


class _Upstream(Protocol):
    factory: App

    def connectionMade(self) -> None:
        self.factory.made += 1
        self.buf = b""
        self.paths: list[bytes] = []
        self.factory.served.append(self.paths)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost += 1

    #: request body bytes still to come, and their hash so far
    left = 0
    hasher: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.left:
                piece, self.buf = self.buf[:self.left], self.buf[self.left:]
                self.hasher.update(piece)
                self.got += len(piece)
                self.left -= len(piece)
                if self.left:
                    return
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s %d"
                                     % (64 + 1 + len(b"%d" % self.got),
                                        self.hasher.hexdigest().encode(), self.got))
                continue
            if b"\r\n\r\n" not in self.buf:
                return
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            self.paths.append(path)
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if m and int(m.group(1)):
                self.left = int(m.group(1))
                self.hasher = hashlib.sha256()
                self.got = 0
                if path == b"/slowupload":
                    # take nothing for a while: the proxy must hold back
                    self.transport.pauseProducing()
                    self.factory.timers.append(
                        reactor.callLater(0.5, self.transport.resumeProducing))
                continue
            self.answer(path)

    def answer(self, path: bytes) -> None:
        parts = path.split(b"/")
        if len(parts) == 3 and parts[1] in (b"size", b"die"):
            n = int(parts[2])
            data = body(n)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
            if parts[1] == b"die":
                self.transport.write(head + data[:n // 2])
                self.transport.loseConnection()
                return
            self.transport.write(head + data)
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup")


def pipes(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                        n += 1
                except OSError:
                    pass
        except OSError:
            pass
    return n


def piped(pids: list[int]) -> int:
    """
    The most bytes any pipe of the processes holds (read through
    /proc/PID/fd, which opens the same pipe).
    """
    import fcntl
    import termios

    most = 0
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in names:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if not os.readlink(path).startswith("pipe:"):
                    continue
                f = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                buf = fcntl.ioctl(f, termios.FIONREAD, b"\0\0\0\0")
                most = max(most, struct.unpack("i", buf)[0])
            except OSError:
                pass
            finally:
                os.close(f)
    return most


def fds(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


class SpliceIntegrationTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        if not available():
            raise self.skipTest("no splice(2) here")

    @inlineCallbacks
    def proxy(self) -> Any:
        app = App()
        port = reactor.listenTCP(0, app, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(app.cancel_timers)
        p = MproxyProcess(reactor, self.mktemp())
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command("deploy", f"127.0.0.1:{port.getHost().port}",
                            "--health-check-interval", "100ms")
        self.assertEqual(r.status, 0, r.err)
        started = [x for x in p.records if x.get("msg") == "Workers started"]
        workers = started[-1]["pids"] if started else [p.process.pid]
        return p, app, workers

    def client(self, p: Any, rcvbuf: int = 0) -> socket.socket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(30)
        s.connect(("127.0.0.1", p.http_port))
        self.addCleanup(s.close)
        return s

    @inlineCallbacks
    def test_bodies_keep_alive_and_pipelined(self) -> Any:
        """
        Bodies of several sizes (under the splice threshold, just over it,
        1 MiB, several MiB and an odd size), pipelined on one keep-alive
        connection and then one by one, arrive byte for byte and in order;
        the target connection is re-used after each spliced body; an
        HTTP/1.0 client's body arrives whole before the close.
        """
        p, app, workers = yield self.proxy()
        sizes = [1000, 70000, 65536 + 70000, 1 << 20, (3 << 20) + 7, 200001, 5]

        def run() -> list[bytes]:
            s = self.client(p)
            s.sendall(b"".join(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in sizes))
            got = []
            rest = b""
            for _ in sizes:
                head, data, rest = read_response(s, rest)
                got.append(data)
            for n in sizes:
                s.sendall(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
                head, data, rest = read_response(s, rest)
                self.assertEqual(rest, b"")
                got.append(data)
            s10 = self.client(p)
            s10.sendall(b"GET /size/%d HTTP/1.0\r\nHost: x\r\n\r\n" % (1 << 20))
            head, data, rest = read_response(s10)
            self.assertEqual(s10.recv(10), b"")
            got.append(data)
            return got

        got = yield deferToThread(run)
        want = sizes + sizes + [1 << 20]
        self.assertEqual([len(g) for g in got], want)
        for n, g in zip(want, got):
            self.assertEqual(hashlib.sha256(g).digest(), hashlib.sha256(body(n)).digest(), n)
        # one connection to the target served the pipelined and serial
        # requests (and the HTTP/1.0 client's, unless it came to the other
        # worker)
        conns = [paths for paths in app.served if any(x.startswith(b"/size/") for x in paths)]
        self.assertLessEqual(len(conns), 2)
        self.assertGreaterEqual(max(len(c) for c in conns), 2 * len(sizes))

    @inlineCallbacks
    def test_slow_client_disconnects_and_fds(self) -> Any:
        """
        A client reading slowly gets every byte (the body waits in a pipe
        meanwhile: the worker holds one more); clients that go away
        mid-body make the target's connections close (not re-used), and
        the workers' file descriptors come back to their baseline plus the
        kept pipes.
        """
        p, app, workers = yield self.proxy()
        size = 8 << 20
        body(size)
        yield sleep(0.3)
        base_pipes = pipes(workers)
        base_fds = fds(workers)

        s = self.client(p, rcvbuf=32768)
        s.sendall(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        # the body's rest waits in a pipe while the client reads nothing.
        # How much depends on timing, not only on the pipe's size: reading
        # from the target stops while the pipe holds bytes, so the pipe
        # holds what one read from the target's socket took, less what the
        # client's socket took of it.
        deadline = time.monotonic() + 5.0
        while not piped(workers) and time.monotonic() < deadline:
            yield sleep(0.1)
        self.assertEqual(pipes(workers), base_pipes + 2)
        self.assertGreater(piped(workers), 0)

        def slow() -> bytes:
            buf = b""
            while len(buf) < (1 << 20):
                buf += s.recv(16384)
                time.sleep(0.001)
            head, data, rest = read_response(s, buf)
            return data

        data = yield deferToThread(slow)
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(body(size)).digest())

        def goners() -> None:
            for i in range(MAX_IDLE_PIPES + 4):
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
                c.connect(("127.0.0.1", p.http_port))
                c.sendall(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
                c.recv(65536)
                if i % 2:
                    # a reset
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()

        lost = app.lost
        yield deferToThread(goners)
        deadline = time.monotonic() + 5
        while app.lost - lost < MAX_IDLE_PIPES + 4 and time.monotonic() < deadline:
            yield sleep(0.1)
        self.assertGreaterEqual(app.lost - lost, MAX_IDLE_PIPES + 4)
        # the proxy still serves, and holds no more than its kept pipes
        s2 = self.client(p)
        head, data, rest = yield deferToThread(
            lambda: (s2.sendall(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size),
                     read_response(s2))[1])
        self.assertEqual(len(data), size)
        s.close()
        s2.close()
        deadline = time.monotonic() + 5
        while fds(workers) > base_fds + 2 * 2 and time.monotonic() < deadline:
            yield sleep(0.1)
        self.assertLessEqual(pipes(workers), base_pipes + 2 * 2)
        self.assertLessEqual(fds(workers), base_fds + 2 * 2)

    @inlineCallbacks
    def test_target_dies_mid_body(self) -> Any:
        """
        A target that closes its connection half-way through a spliced body:
        the client's connection is closed short of the announced length
        (never a complete-looking response), and the proxy serves the next
        request.
        """
        p, app, workers = yield self.proxy()
        size = 4 << 20

        def run() -> tuple[int, bytes]:
            s = self.client(p)
            s.sendall(b"GET /die/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
            buf = b""
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                buf += chunk
            head, _, data = buf.partition(b"\r\n\r\n")
            return len(data), head

        got, head = yield deferToThread(run)
        self.assertIn(b"Content-Length: %d" % size, head)
        self.assertLess(got, size)
        self.assertGreaterEqual(got, 0)
        errors = [x for x in p.records if x.get("msg") == "Error while proxying"]
        deadline = time.monotonic() + 3
        while not errors and time.monotonic() < deadline:
            yield sleep(0.1)
            errors = [x for x in p.records if x.get("msg") == "Error while proxying"]
        self.assertIn("mid-response", errors[-1]["error"])
        s2 = self.client(p)
        head, data, rest = yield deferToThread(
            lambda: (s2.sendall(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size),
                     read_response(s2))[1])
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(body(size)).digest())

    @inlineCallbacks
    def test_uploads(self) -> Any:
        """
        Request bodies of several sizes, pipelined on one keep-alive
        connection with a download after them, reach the target byte for
        byte (its sha256 of each); a target that takes nothing for a while
        gets the whole body after it; a client leaving mid-upload makes the
        target's connection close; the workers' descriptors come back to
        their baseline plus the kept pipes.
        """
        p, app, workers = yield self.proxy()
        sizes = [1000, 70000, 65536 + 70000, 1 << 20, (3 << 20) + 7]
        yield sleep(0.3)
        base_fds = fds(workers)

        def post(path: bytes, n: int) -> bytes:
            return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, n)
                    + body(n))

        def run() -> list[bytes]:
            s = self.client(p)
            s.sendall(b"".join(post(b"/upload", n) for n in sizes)
                      + b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (1 << 20))
            got = []
            rest = b""
            for _ in range(len(sizes) + 1):
                head, data, rest = read_response(s, rest)
                got.append(data)
            s.sendall(post(b"/slowupload", 4 << 20))
            head, data, rest = read_response(s, rest)
            got.append(data)
            return got

        got = yield deferToThread(run)
        for n, g in zip(sizes, got):
            self.assertEqual(g, hashlib.sha256(body(n)).hexdigest().encode() + b" %d" % n)
        self.assertEqual(hashlib.sha256(got[len(sizes)]).digest(),
                         hashlib.sha256(body(1 << 20)).digest())
        self.assertEqual(got[-1], hashlib.sha256(body(4 << 20)).hexdigest().encode()
                         + b" %d" % (4 << 20))

        c = socket.socket()
        self.addCleanup(c.close)

        def send_what_fits() -> None:
            c.connect(("127.0.0.1", p.http_port))
            data = memoryview(post(b"/slowupload", 32 << 20))
            c.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                try:
                    sent += c.send(data[sent:sent + (1 << 20)])
                except BlockingIOError:
                    time.sleep(0.01)

        lost = app.lost
        yield deferToThread(send_what_fits)
        # the target takes nothing yet: the body's rest waits in a pipe
        self.assertGreater(piped(workers), 0)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        deadline = time.monotonic() + 5
        while app.lost == lost and time.monotonic() < deadline:
            yield sleep(0.1)
        self.assertGreater(app.lost, lost)
        deadline = time.monotonic() + 5
        while fds(workers) > base_fds + 2 * 2 and time.monotonic() < deadline:
            yield sleep(0.1)
        self.assertLessEqual(fds(workers), base_fds + 2 * 2)
