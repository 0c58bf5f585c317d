"""
L{mproxy.tls.fasttls} connections moved onto their sockets
(L{mproxy.tls.sslbio}): a real TCP transport (C{tcp.Server}) over one end
of a socket pair, on a MemoryReactorClock, driven synchronously; the client
is an C{ssl.SSLObject} on the other end.
"""

from __future__ import annotations

import select
import socket
import ssl
import tempfile

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.tls import fasttls, sslbio
from mproxy.tls.certs import certified_pem
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.fasttls import FastTLSFactory
from mproxy.tls.sni import ServerTLS, _ALPNDispatchFactory
from mproxy.tls.testing import make_ca, make_certificate
from tests.doubles import Producer

if not sslbio.available():
    skip = "connections cannot be moved onto their sockets on this Python"


class Recorder(Protocol):
    pause_on_data = False
    producer: "Producer | None" = None

    def connectionMade(self) -> None:
        if self.producer is not None:
            # as HTTP/2 connections do
            self.transport.registerProducer(self.producer, True)

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.pause_on_data:
            self.transport.pauseProducing()

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class _Port:
    _realPortNumber = 443


class DirectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca()
        self.cert = make_certificate(["a.test"], issuer=self.ca)
        self.apps: list[Recorder] = []
        self.reactor = MemoryReactorClock()

        self.app_producer = None

        def protocol_for_alpn(negotiated, addr):
            p = Recorder()
            p.producer = self.app_producer
            self.apps.append(p)
            return p

        tls = ServerTLS(lambda name: self.cert if name == "a.test" else None,
                        ChallengeStore(), logger=ListLogger())
        self.factory = FastTLSFactory(
            tls, _ALPNDispatchFactory(protocol_for_alpn, None), reactor=self.reactor)

    def connect(self, sndbuf: int | None = None):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        if sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        ours.setblocking(False)
        theirs.setblocking(False)
        self.theirs = theirs
        server = self.factory.buildProtocol(("127.0.0.1", 40000))
        t = tcp.Server(ours, server, ("127.0.0.1", 40000), _Port(), 1, self.reactor)
        self.addCleanup(lambda: t.disconnected or t.connectionLost(Failure(ConnectionDone())))
        server.makeConnection(t)
        self.server, self.t = server, t
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(certified_pem(self.ca)[0])
            f.flush()
            ctx.load_verify_locations(f.name)
        ctx.set_alpn_protocols(["http/1.1"])
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = ctx.wrap_bio(self.cin, self.cout, server_hostname="a.test")
        for _ in range(10):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            finally:
                self.send_client()
            self.server_read()
            self.client_receive()
        self.server_read()  # the client's Finished
        self.client_read()  # session tickets
        return self.apps[0]

    def send_client(self) -> None:
        out = self.cout.read()
        if out:
            self.theirs.sendall(out)

    def server_read(self):
        """
        What the reactor does while the socket is readable (and the
        transport reading).
        """
        why = None
        for _ in range(1000):
            why = self.t.doRead()
            if why:
                self.t.connectionLost(Failure(why))
                return why
            if (self.t not in self.reactor.getReaders()
                    or not select.select([self.t.fileno()], [], [], 0)[0]):
                break
        return why

    def client_receive(self) -> int:
        n = 0
        while True:
            try:
                data = self.theirs.recv(1 << 20)
            except BlockingIOError:
                return n
            if not data:
                return n
            n += len(data)
            self.cin.write(data)

    def client_read(self) -> bytes:
        self.client_receive()
        got = []
        while True:
            try:
                chunk = self.client.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            got.append(chunk)
        return b"".join(got)

    def test_movedOntoSocket(self) -> None:
        """
        Once the handshake is done the connection reads and writes its
        socket itself; bytes reach the application and its writes reach
        the client, one flush per reactor iteration.
        """
        app = self.connect()
        self.assertIsNotNone(self.server._io)
        self.assertIn("doRead", self.t.__dict__)
        self.client.write(b"GET / HTTP/1.1\r\n\r\n")
        self.send_client()
        self.assertIsNone(self.server_read())
        self.assertEqual(b"".join(app.received), b"GET / HTTP/1.1\r\n\r\n")
        app.transport.write(b"HTTP/1.1 200 OK\r\n")
        app.transport.writeSequence([b"Content-Length: 2\r\n\r\n", b"hi"])
        self.assertEqual(self.client_read(), b"")
        self.reactor.advance(0)
        self.assertEqual(self.client_read(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    def test_memoryviewPieces(self) -> None:
        """
        Memoryview pieces (a body that arrived with its head) are
        encrypted as they are, on the socket and on the memory BIOs, in
        order with the bytes around them; one that waits for the socket
        arrives intact.
        """
        body = bytes(range(256)) * 1024
        for direct in (True, False):
            self.apps.clear()
            self.factory.direct = direct
            app = self.connect(sndbuf=65536)
            self.assertEqual(self.server._io is not None, direct)
            view = memoryview(b"HEAD" + body)[4:]
            app.transport.writeSequence((b"head", view))
            app.transport.write(view[:20000])
            app.transport.write(b"tail")
            self.reactor.advance(0)
            got = []
            for _ in range(1000):
                got.append(self.client_read())
                if self.t not in self.reactor.getWriters():
                    break
                self.t.doWrite()
            got.append(self.client_read())
            self.assertEqual(b"".join(got), b"head" + body + body[:20000] + b"tail")

    def test_movedWithProducerRegistered(self) -> None:
        """
        A protocol that registers a producer when it starts (HTTP/2) is
        moved too; a blocked write pauses that producer.
        """
        self.app_producer = Producer()
        app = self.connect(sndbuf=65536)
        self.assertIsNotNone(self.server._io)
        app.transport.write(b"q" * 1000000)
        self.assertEqual(self.app_producer.calls, ["pause"])
        got = []
        for _ in range(1000):
            got.append(self.client_read())
            if self.t not in self.reactor.getWriters():
                break
            self.t.doWrite()
        got.append(self.client_read())
        self.assertEqual(len(b"".join(got)), 1000000)
        self.assertEqual(self.app_producer.calls, ["pause", "resume"])

    def test_notMovedWhenDisabled(self) -> None:
        """
        With C{direct} off the connection stays on its memory BIOs.
        """
        self.factory.direct = False
        app = self.connect()
        self.assertIsNone(self.server._io)
        self.client.write(b"ping")
        self.send_client()
        self.server_read()
        self.assertEqual(app.received, [b"ping"])

    def test_blockedWritePausesProducer(self) -> None:
        """
        What the socket does not take waits for it to be writable, with
        the producer paused; once all of it is sent the producer resumes
        and the bytes have arrived in order.
        """
        app = self.connect(sndbuf=65536)
        producer = Producer()
        app.transport.registerProducer(producer, True)
        body = bytes(range(256)) * 8192  # 2 MiB
        app.transport.write(body)
        self.assertEqual(producer.calls, ["pause"])
        self.assertIn(self.t, self.reactor.getWriters())
        got = []
        for _ in range(1000):
            got.append(self.client_read())
            if self.t not in self.reactor.getWriters():
                break
            self.assertIsNone(self.t.doWrite())
        got.append(self.client_read())
        self.assertEqual(b"".join(got), body)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertTrue(self.server._io.grown_writes)

    def test_64KiBResponseLeavesInOneSend(self) -> None:
        """
        Once a connection is busy, the records of a 64 KiB body and its
        head all fit the write buffer: none of them is sent before the
        flush, which sends them at once.
        """
        app = self.connect()
        app.transport.write(b"w" * 65536)  # busy: the large write buffer
        self.reactor.advance(0)
        self.assertEqual(len(self.client_read()), 65536)
        io = self.server._io
        self.assertTrue(io.grown_writes)
        piece = b"h" * 300 + b"p" * 65536
        self.server._ssl.write(piece)
        self.assertGreater(io.unsent(), len(piece))
        self.assertEqual(self.client_receive(), 0)
        self.assertEqual(io.flush(), 1)
        self.assertEqual(io.unsent(), 0)
        self.assertEqual(self.client_read(), piece)

    def test_largerPieceLeavesAsTheBufferFills(self) -> None:
        """
        A piece larger than the write buffer leaves in sends of its size
        as it is encrypted, the rest with the flush.
        """
        app = self.connect()
        app.transport.write(b"w" * 65536)
        self.reactor.advance(0)
        self.client_read()
        io = self.server._io
        piece = b"q" * 100000
        self.server._ssl.write(piece)
        self.assertLessEqual(io.unsent(), sslbio.BULK_WRITE_BUFFER)
        self.assertGreater(self.client_receive(), 0)
        self.assertEqual(io.flush(), 1)
        self.assertEqual(self.client_read(), piece)

    def test_writesWhileBlockedKeepOrder(self) -> None:
        """
        Writes made while the socket is full are sent after what it is
        still to take.
        """
        app = self.connect(sndbuf=65536)
        first = b"a" * 1000000
        app.transport.write(first)
        app.transport.write(b"then")
        self.reactor.advance(0)
        got = []
        for _ in range(1000):
            got.append(self.client_read())
            if self.t not in self.reactor.getWriters():
                break
            self.t.doWrite()
        got.append(self.client_read())
        self.assertEqual(b"".join(got), first + b"then")

    def test_loseConnectionAfterBlockedData(self) -> None:
        """
        C{loseConnection} while the socket is full sends the rest, then
        close_notify, then closes the TCP connection.
        """
        app = self.connect(sndbuf=65536)
        body = b"z" * 1000000
        app.transport.write(body)
        app.transport.loseConnection()
        self.assertFalse(self.t.disconnecting)
        got = []
        why = None
        for _ in range(1000):
            got.append(self.client_read())
            why = self.t.doWrite()
            if why:
                break
        got.append(self.client_read())
        self.assertEqual(b"".join(got), body)
        self.assertIsInstance(why, ConnectionDone)
        self.assertEqual(self.client.read(10), b"")  # close_notify

    def test_loseConnectionSendsCloseNotify(self) -> None:
        app = self.connect()
        app.transport.write(b"bye")
        app.transport.loseConnection()
        self.assertTrue(self.t.disconnecting)
        self.assertEqual(self.client_read(), b"bye")
        self.assertEqual(self.client.read(10), b"")  # close_notify

    def test_clientCloseNotify(self) -> None:
        """
        The client's close_notify, after data in the same read, delivers
        the data and closes the connection.
        """
        app = self.connect()
        self.client.write(b"last words")
        try:
            self.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.send_client()
        self.server_read()
        self.assertEqual(app.received, [b"last words"])
        self.assertTrue(self.t.disconnecting)

    def test_clientEOF(self) -> None:
        """
        The client closing TCP without close_notify loses the connection
        as a clean close (as on the memory BIOs, where the TCP transport
        sees the end of the stream).
        """
        app = self.connect()
        self.theirs.shutdown(socket.SHUT_WR)
        why = self.server_read()
        self.assertIsInstance(why, ConnectionDone)
        self.assertEqual(len(app.lost), 1)
        app.lost[0].trap(ConnectionDone)

    def test_corruptRecordFails(self) -> None:
        """
        A record that does not decrypt loses the connection with the
        TLS error.
        """
        app = self.connect()
        self.client.write(b"x" * 100)
        raw = bytearray(self.cout.read())
        raw[-1] ^= 1
        self.theirs.sendall(bytes(raw))
        self.assertTrue(self.server_read())
        app.lost[0].trap(ssl.SSLError)

    def test_detachedAfterConnectionLost(self) -> None:
        """
        Once the connection is lost the SSL object no longer reaches the
        socket (its descriptor may be reused): writes go nowhere.
        """
        app = self.connect()
        io = self.server._io
        fd = self.t.fileno()
        dup = socket.socket(fileno=__import__("os").dup(fd))
        self.addCleanup(dup.close)
        self.t.connectionLost(Failure(ConnectionDone()))
        app.transport.write(b"late")
        self.reactor.advance(0)
        self.server._ssl.write(b"later")
        self.assertIsNone(io._bio)
        self.assertEqual(self.client_receive(), 0)

    def test_largeUploadReadsAtOnce(self) -> None:
        """
        A busy upload gets the large read buffer; every byte arrives in
        order.
        """
        app = self.connect()
        body = bytes(range(256)) * 4096  # 1 MiB
        self.client.write(body)
        out = self.cout.read()
        while out:
            try:
                n = self.theirs.send(out)
            except BlockingIOError:
                n = 0
            out = out[n:]
            self.server_read()
        self.server_read()
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(self.server._io.grown_reads)

    def test_cappedReadContinuesNextIteration(self) -> None:
        """
        A socket event hands at most MAX_READ_EVENT bytes to the
        protocol; the rest, already read by OpenSSL, follows in the next
        iteration without another socket event, unless the protocol
        paused reading (then it follows once it resumes).
        """
        app = self.connect()
        body = bytes(range(256)) * 256  # 64 KiB: four records
        self.client.write(body)
        self.send_client()
        self.server_read()  # a busy read: the read buffer grows
        self.assertTrue(self.server._io.grown_reads)
        del app.received[:]
        self.patch(fasttls, "MAX_READ_EVENT", 20000)
        app.pause_on_data = True
        self.client.write(body)
        self.send_client()
        self.server_read()
        self.assertEqual(len(app.received), 1)
        self.assertLess(len(app.received[0]), len(body))
        self.reactor.advance(0)
        self.assertEqual(len(app.received), 1)  # paused
        app.pause_on_data = False
        app.transport.resumeProducing()
        for _ in range(5):
            self.reactor.advance(0)
        self.assertEqual(b"".join(app.received), body)

    def busy(self, app: Recorder) -> None:
        """
        Make the connection a busy one (its large read buffer), as a first
        large read does.
        """
        self.client.write(b"b" * 65536)
        self.send_client()
        self.server_read()
        self.assertTrue(self.server._io.grown_reads)
        del app.received[:]

    def send_all(self, data: bytes) -> None:
        while data:
            try:
                n = self.theirs.send(data)
            except BlockingIOError:
                n = 0
            data = data[n:]
            self.server_read()
        self.server_read()

    def record_fillings(self) -> list:
        made = []

        class Recording(fasttls.Filling):
            __slots__ = ()

            def __init__(self, size: int) -> None:
                super().__init__(size)
                made.append(size)

        self.patch(fasttls, "Filling", Recording)
        return made

    def test_bulkReadIntoOneObject(self) -> None:
        """
        On a busy connection, a socket event that starts with a full
        record reads the records that follow into one object (up to
        MAX_READ_EVENT bytes); every byte arrives in order.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        body = bytes(range(256)) * 4096  # 1 MiB
        self.client.write(body)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(made)
        self.assertEqual(set(made), {fasttls.MAX_READ_EVENT})
        self.assertTrue(all(type(p) is bytes and len(p) <= fasttls.MAX_READ_EVENT
                            for p in app.received))
        # fewer pieces than records
        self.assertLess(len(app.received), len(body) // 16384)

    def test_smallReadNotBulk(self) -> None:
        """
        A read that starts with less than a full record (a request head)
        is read record by record, as before.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        self.client.write(b"GET / HTTP/1.1\r\n\r\n")
        self.send_client()
        self.server_read()
        self.assertEqual(app.received, [b"GET / HTTP/1.1\r\n\r\n"])
        self.assertEqual(made, [])

    def test_bulkWithoutFilling(self) -> None:
        """
        Where bytes cannot be filled in place, large reads go record by
        record and join.
        """
        self.patch(fasttls, "fill_available", lambda: False)
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        body = bytes(range(256)) * 1024
        self.client.write(body)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), body)
        self.assertEqual(made, [])

    def test_bulkThenCloseNotify(self) -> None:
        """
        close_notify after full records, in the same read: the data is
        delivered, then the connection closes.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        body = b"c" * 100000
        self.client.write(body)
        try:
            self.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.send_client()
        self.server_read()
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(self.t.disconnecting)
        self.assertTrue(made)

    def test_bulkThenCorruptRecord(self) -> None:
        """
        A record that does not decrypt after full ones: the records before
        it are delivered, then the connection is lost with the TLS error.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        body = b"d" * 65536
        self.client.write(body)
        good = self.cout.read()
        self.client.write(b"x" * 100)
        bad = bytearray(self.cout.read())
        bad[-1] ^= 1
        self.theirs.sendall(good + bytes(bad))
        self.assertTrue(self.server_read())
        self.assertEqual(b"".join(app.received), body)
        app.lost[0].trap(ssl.SSLError)
        self.assertTrue(made)

    def test_bulkThenEOF(self) -> None:
        """
        The client closing TCP after full records: they are delivered,
        then the connection is lost as a clean close.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        body = b"e" * 50000
        self.client.write(body)
        self.send_client()
        self.theirs.shutdown(socket.SHUT_WR)
        why = self.server_read()
        self.assertEqual(b"".join(app.received), body)
        self.assertIsInstance(why, ConnectionDone)
        self.assertTrue(made)

    def count_reads(self) -> list[int]:
        """
        The sizes asked of the server's C{SSLObject.read}, from now on.
        """
        sizes: list[int] = []
        real = self.server._ssl

        class Counting:
            def read(self, n, *buffer):
                sizes.append(n)
                return real.read(n, *buffer)

            def __getattr__(self, name):
                return getattr(real, name)

        self.server._ssl = Counting()
        return sizes

    def test_bulkReadInOneCall(self) -> None:
        """
        The records after the first of a bulk read are decrypted by one
        call into OpenSSL, not one C{read} each: an event asks the
        C{SSLObject} for its first record only.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        reads = self.count_reads()
        body = bytes(range(256)) * 4096  # 1 MiB: 64 records
        self.client.write(body)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(made)
        self.assertLessEqual(len(reads), len(made) + 2)
        self.assertLess(len(reads), 64 // 4)

    def test_bulkRecordByRecordWithoutReader(self) -> None:
        """
        Where the BIOs for one call cannot be made, a bulk read reads one
        record per C{read}, into the same one object.
        """
        self.patch(sslbio.DirectIO, "_make_reader", lambda io: 0)
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        reads = self.count_reads()
        body = bytes(range(256)) * 1024  # 256 KiB: 16 records
        self.client.write(body)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(made)
        self.assertGreaterEqual(len(reads), 16)

    def test_keyUpdateDuringBulkRead(self) -> None:
        """
        A key update the client asks for between full records: the
        records after it are decrypted with the new key, and the server's
        own key update reaches the client, which reads what is written
        next.
        """
        import ctypes

        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        lib = sslbio._load()
        key_update = lib.SSL_key_update
        key_update.restype = ctypes.c_int
        key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
        first = b"f" * 65536
        self.client.write(first)
        client_ssl = sslbio._field(self.client._sslobj, 1)
        self.assertEqual(key_update(client_ssl, 1), 1)  # SSL_KEY_UPDATE_REQUESTED
        second = b"s" * 65536
        self.client.write(second)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), first + second)
        self.assertTrue(made)
        self.assertEqual(self.client_read(), b"")  # the server's key update
        app.transport.write(b"after the update")
        self.reactor.advance(0)
        self.assertEqual(self.client_read(), b"after the update")
        self.client.write(b"t" * 40000)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), first + second + b"t" * 40000)

    def upload_at_once(self, data: bytes) -> None:
        """
        Send C{data} from the client so that the server's socket holds
        all of it before it reads.
        """
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        self.t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.client.write(data)
        out = self.cout.read()
        self.theirs.setblocking(True)
        self.theirs.sendall(out)
        self.theirs.setblocking(False)

    def test_fittedReadTakesBodyRest(self) -> None:
        """
        Told that a little more than an event's bytes are still to come
        (fit_reads), a bulk read takes all of them in one event, instead
        of leaving the last few for a read of their own.
        """
        app = self.connect()
        self.busy(app)
        rest = fasttls.MAX_READ_EVENT + 150
        body = bytes(range(256)) * (rest // 256) + b"t" * (rest % 256)
        self.server.fit_reads(rest)
        self.upload_at_once(body)
        self.server_read()
        self.assertEqual([len(p) for p in app.received], [rest])
        self.assertEqual(app.received[0], body)

    def test_unfittedReadStopsAtEventSize(self) -> None:
        """
        Without it (or when far more is to come) an event stops at
        MAX_READ_EVENT bytes; the rest follows in the next iteration.
        """
        for want in (0, fasttls.MAX_READ_EVENT * 4):
            app = self.connect()
            self.busy(app)
            rest = fasttls.MAX_READ_EVENT + 150
            body = b"u" * rest
            self.server.fit_reads(want)
            self.upload_at_once(body)
            self.server_read()
            self.reactor.advance(0)
            self.assertEqual([len(p) for p in app.received], [fasttls.MAX_READ_EVENT, 150])
            self.assertEqual(b"".join(app.received), body)
            self.theirs.close()
            self.t.connectionLost(Failure(ConnectionDone()))
            del self.apps[:]

    def test_bodyOnItsWayReadInOneCall(self) -> None:
        """
        Told that more than a record of a body is still to come, an event
        reads into one object from its first record on: no C{read} of the
        C{SSLObject} at all.
        """
        app = self.connect()
        self.busy(app)
        made = self.record_fillings()
        self.server.fit_reads(1 << 20)
        reads = self.count_reads()
        body = bytes(range(256)) * 1024  # 256 KiB
        self.client.write(body)
        self.send_all(self.cout.read())
        self.assertEqual(b"".join(app.received), body)
        self.assertTrue(made)
        self.assertEqual(reads, [])
        self.assertNotIn(b"", app.received)

    def test_bodyOnItsWayThenCloseNotify(self) -> None:
        """
        close_notify where body bytes were expected: nothing (not an empty
        piece) is delivered, and the connection closes.
        """
        app = self.connect()
        self.busy(app)
        self.server.fit_reads(1 << 20)
        try:
            self.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.send_client()
        self.server_read()
        self.assertEqual(app.received, [])
        self.assertTrue(self.t.disconnecting)

    def test_readerFreedOnDetach(self) -> None:
        """
        The BIOs of the one-call read go with the connection: after it is
        lost, reading through them is refused.
        """
        app = self.connect()
        self.busy(app)
        self.client.write(b"g" * 65536)
        self.send_all(self.cout.read())
        io = self.server._io
        self.assertTrue(io._reader)
        self.t.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(io._reader, 0)
        import ctypes

        buf = bytearray(sslbio.BULK_MIN)
        address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        self.assertEqual(io.read_into(address, len(buf)), (0, sslbio.READ_ENDED))


class AttachTests(SynchronousTestCase):
    def setUp(self) -> None:
        from mproxy.tls.testing import pem_pair

        cert = make_certificate(["a.test"])
        chain, key = pem_pair(cert)
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(key + b"\n" + chain)
            f.flush()
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(f.name)

    def test_refusesOtherBIOs(self) -> None:
        """
        An SSL object whose memory BIOs are not the ones given is left
        alone.
        """
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.ctx.wrap_bio(inc, out, server_side=True)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertIsNone(sslbio.attach(obj, ssl.MemoryBIO(), out, a.fileno()))
        self.assertIsNone(sslbio.attach(obj, inc, ssl.MemoryBIO(), a.fileno()))
        self.assertIsNotNone(sslbio.attach(obj, inc, out, a.fileno()))

    def test_refusesPendingBytes(self) -> None:
        """
        Bytes still in either memory BIO would be lost: not attached.
        """
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.ctx.wrap_bio(inc, out, server_side=True)
        inc.write(b"\x16\x03\x01")
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertIsNone(sslbio.attach(obj, inc, out, a.fileno()))
