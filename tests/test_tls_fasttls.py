"""
L{mproxy.tls.fasttls}: the standard-library TLS transport of the HTTPS
listener, driven in memory (a client C{ssl.SSLObject} on one side, a
StringTransport on the other, a Clock for the per-iteration flush).
"""

from __future__ import annotations

import ssl
import tempfile

from cryptography import x509
from twisted.internet.interfaces import INegotiated, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.tls.certs import certified_pem
from mproxy.tls.challenges import ChallengeStore, tls_alpn_certificate
from mproxy.tls.fasttls import FastTLSFactory, FastTLSProtocol
from mproxy.tls.sni import ServerTLS, _ALPNDispatchFactory
from mproxy.tls.testing import make_ca, make_certificate


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


def records(data: bytes) -> list[int]:
    """
    The content types of the TLS records in C{data}.
    """
    types = []
    while data:
        types.append(data[0])
        length = int.from_bytes(data[3:5], "big")
        data = data[5 + length:]
    return types


class FastTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca()
        self.cert = make_certificate(["a.test"], issuer=self.ca)
        self.challenges = ChallengeStore()
        self.logger = ListLogger()
        self.apps: list[tuple[bytes | None, Recorder]] = []

        def select(name):
            return self.cert if name == "a.test" else None

        def protocol_for_alpn(negotiated, addr):
            p = Recorder()
            self.apps.append((negotiated, p))
            return p

        self.clock = Clock()
        self.tls = ServerTLS(select, self.challenges, logger=self.logger)
        self.factory = FastTLSFactory(
            self.tls, _ALPNDispatchFactory(protocol_for_alpn, None), reactor=self.clock)

    def client(self, name: str, alpn: list[str] | None = None, verify: bool = True):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if verify:
            with tempfile.NamedTemporaryFile(suffix=".pem") as f:
                f.write(certified_pem(self.ca)[0])
                f.flush()
                ctx.load_verify_locations(f.name)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        return ctx.wrap_bio(cin, cout, server_hostname=name), cin, cout

    def connect(self, name: str, alpn: list[str] | None = None, verify: bool = True):
        server = self.factory.buildProtocol(None)
        wire = StringTransport()
        wire.protocol = server  # as a TCP transport has it
        server.makeConnection(wire)
        client, cin, cout = self.client(name, alpn, verify)
        error = None
        for _ in range(10):
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                error = e
                break
            finally:
                out = cout.read()
                if out:
                    wire.protocol.dataReceived(out)
            cin.write(wire.value())
            wire.clear()
        return server, wire, client, cin, cout, error

    def pump(self, wire, client, cin, cout) -> bytes:
        self.clock.advance(0)
        raw = wire.value()
        wire.clear()
        cin.write(raw)
        got = b""
        while True:
            try:
                got += client.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
        return got

    def test_handshakeBySNIAndALPN(self) -> None:
        """
        The certificate is the one C{select} gives for the SNI name, ALPN
        picks C{h2} when offered, and the application protocol is built
        after the handshake, on a transport that is an L{ISSLTransport}
        with the negotiated protocol.
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["h2", "http/1.1"])
        self.assertIsNone(error)
        peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
        self.assertEqual(peer, self.cert.chain[0])
        self.assertEqual(client.selected_alpn_protocol(), "h2")
        self.assertEqual([n for n, _ in self.apps], [b"h2"])
        self.assertIsInstance(server, FastTLSProtocol)
        self.assertTrue(ISSLTransport.providedBy(server))
        self.assertTrue(INegotiated.providedBy(server))
        self.assertEqual(server.negotiatedProtocol, b"h2")

    def test_http11(self) -> None:
        self.connect("a.test", ["http/1.1"])
        self.assertEqual([n for n, _ in self.apps], [b"http/1.1"])

    def test_unknownNameRefused(self) -> None:
        """
        A name C{select} has no certificate for fails the handshake and
        builds no application protocol.
        """
        server, wire, client, cin, cout, error = self.connect("nope.test", verify=False)
        self.assertIsInstance(error, ssl.SSLError)
        self.assertEqual(self.apps, [])
        self.assertTrue(wire.disconnecting)

    def test_dataBothWays(self) -> None:
        """
        Decrypted bytes reach the application; what it writes during one
        reactor iteration leaves as a single TLS record at the next one.
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.pump(wire, client, cin, cout)  # session tickets
        client.write(b"GET / HTTP/1.1\r\n\r\n")
        server.dataReceived(cout.read())
        app = self.apps[0][1]
        self.assertEqual(b"".join(app.received), b"GET / HTTP/1.1\r\n\r\n")
        app.transport.write(b"HTTP/1.1 200 OK\r\n")
        app.transport.writeSequence([b"Content-Length: 2\r\n\r\n", b"hi"])
        self.assertEqual(wire.value(), b"")
        self.clock.advance(0)
        raw = wire.value()
        self.assertEqual(records(raw), [23])
        wire.clear()
        cin.write(raw)
        self.assertEqual(client.read(65536),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    def test_aes128PreferredForTLS13(self) -> None:
        """
        TLS 1.3 connections use AES-128-GCM, even with a client that lists
        AES-256-GCM first (OpenSSL's default order).
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.assertIsNone(error)
        self.assertEqual(client.version(), "TLSv1.3")
        self.assertEqual(client.cipher()[0], "TLS_AES_128_GCM_SHA256")

    def test_tls13CiphersuitesRefused(self) -> None:
        """
        Suites OpenSSL does not know are refused and leave the context
        as it was.
        """
        from mproxy.tls.fasttls import set_tls13_ciphersuites

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.assertFalse(set_tls13_ciphersuites(ctx, b"TLS_NO_SUCH_SUITE"))
        self.assertTrue(set_tls13_ciphersuites(ctx, b"TLS_CHACHA20_POLY1305_SHA256"))

    def test_largePieceNotJoined(self) -> None:
        """
        A large piece written with its framing (a response head) is
        encrypted as it is: the head goes in a record of its own instead of
        being joined with the piece; the bytes arrive in order.
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.pump(wire, client, cin, cout)
        app = self.apps[0][1]
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n"
        big = bytes(range(256)) * 78 + b"x" * 32  # 20,000 bytes
        app.transport.writeSequence([head, big])
        app.transport.write(b"a")
        app.transport.write(b"b")
        self.clock.advance(0)
        cin.write(wire.value())
        got = []
        while True:
            try:
                got.append(client.read(65536))
            except ssl.SSLWantReadError:
                break
        self.assertEqual(got[0], head)
        self.assertEqual(b"".join(got), head + big + b"ab")

    def test_recordsOfOneReadDeliveredTogether(self) -> None:
        """
        The plaintext of every record that arrived in one read reaches the
        application in one call (a record holds at most 16 KiB).
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.pump(wire, client, cin, cout)
        body = bytes(range(256)) * 256  # 64 KiB: four records
        client.write(body)
        raw = cout.read()
        self.assertGreaterEqual(len(records(raw)), 4)
        server.dataReceived(raw)
        app = self.apps[0][1]
        self.assertEqual(app.received, [body])

    def test_dataThenCloseNotify(self) -> None:
        """
        Data followed by close_notify in one read is delivered, then the
        connection closes.
        """
        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.pump(wire, client, cin, cout)
        client.write(b"last words")
        try:
            client.unwrap()
        except ssl.SSLWantReadError:
            pass
        server.dataReceived(cout.read())
        self.assertEqual(self.apps[0][1].received, [b"last words"])
        self.assertTrue(wire.disconnecting)

    def test_busyConnectionReadsMore(self) -> None:
        """
        A read that fills the TCP transport's buffer doubles it, up to
        MAX_READ; smaller reads leave it as it is.
        """
        from mproxy.http.reads import MAX_READ

        server, wire, client, cin, cout, error = self.connect("a.test", ["http/1.1"])
        self.pump(wire, client, cin, cout)
        wire.bufferSize = 65536
        client.write(b"small")
        server.dataReceived(cout.read())
        self.assertEqual(wire.bufferSize, 65536)
        client.write(b"x" * 70000)
        server.dataReceived(cout.read())
        self.assertEqual(wire.bufferSize, 131072)
        for _ in range(3):
            client.write(b"x" * MAX_READ)
            server.dataReceived(cout.read())
        self.assertEqual(wire.bufferSize, MAX_READ)

    def test_largeWriteAtOnce(self) -> None:
        """
        Plaintext beyond the pending limit is encrypted at once, so the TCP
        transport's buffering and producer pausing see it.
        """
        server, wire, client, cin, cout, error = self.connect("a.test")
        self.clock.advance(0)
        wire.clear()
        self.apps[0][1].transport.write(b"x" * 100000)
        self.assertGreater(len(wire.value()), 100000)

    def test_loseConnectionSendsCloseNotify(self) -> None:
        """
        C{loseConnection} flushes pending data, sends close_notify and
        closes the TCP connection; C{connectionLost} reaches the application.
        """
        server, wire, client, cin, cout, error = self.connect("a.test")
        self.pump(wire, client, cin, cout)
        app = self.apps[0][1]
        app.transport.write(b"bye")
        app.transport.loseConnection()
        self.assertTrue(wire.disconnecting)
        cin.write(wire.value())
        self.assertEqual(client.read(100), b"bye")
        self.assertEqual(client.read(100), b"")  # close_notify
        server.connectionLost(None)
        self.assertEqual(len(app.lost), 1)

    def test_clientCloseNotify(self) -> None:
        """
        The client's close_notify closes the connection.
        """
        server, wire, client, cin, cout, error = self.connect("a.test")
        self.pump(wire, client, cin, cout)
        try:
            client.unwrap()
        except ssl.SSLWantReadError:
            pass
        server.dataReceived(cout.read())
        self.assertTrue(wire.disconnecting)

    def test_tlsAlpnChallengeFallsBack(self) -> None:
        """
        A handshake for a name with a pending TLS-ALPN-01 challenge is
        replayed into the pyOpenSSL protocol, which answers C{acme-tls/1}
        with the challenge certificate.
        """
        challenge = tls_alpn_certificate("a.test", "token.thumb")
        self.challenges.add_tls_alpn01("a.test", challenge)
        server, wire, client, cin, cout, error = self.connect(
            "a.test", ["acme-tls/1"], verify=False)
        self.assertIsNone(error)
        self.assertEqual(client.selected_alpn_protocol(), "acme-tls/1")
        peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
        self.assertEqual(peer, challenge.chain[0])
        self.assertIsInstance(wire.protocol, TLSMemoryBIOProtocol)

    def test_challengeNameStillServesH2(self) -> None:
        """
        During a challenge, ordinary clients of that name still get its
        certificate and their protocol (through the fallback).
        """
        self.challenges.add_tls_alpn01("a.test", tls_alpn_certificate("a.test", "t.k"))
        server, wire, client, cin, cout, error = self.connect("a.test", ["h2", "http/1.1"])
        self.assertIsNone(error)
        self.assertEqual(client.selected_alpn_protocol(), "h2")
        self.assertEqual([n for n, _ in self.apps], [b"h2"])

    def test_newCertificateNewContext(self) -> None:
        """
        A replaced certificate gets its own context (connections already
        open keep theirs); the same certificate reuses its context.
        """
        contexts = self.factory.contexts
        first = contexts.context_for(self.cert)
        self.assertIs(contexts.context_for(self.cert), first)
        self.cert = make_certificate(["a.test"], issuer=self.ca)
        self.assertIsNot(contexts.context_for(self.cert), first)
        server, wire, client, cin, cout, error = self.connect("a.test")
        peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
        self.assertEqual(peer, self.cert.chain[0])

    def test_tls12Minimum(self) -> None:
        """
        TLS 1.1 clients are refused.
        """
        server = self.factory.buildProtocol(None)
        wire = StringTransport()
        server.makeConnection(wire)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            raise self.skipTest("this OpenSSL cannot offer TLS 1.1")
        cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = ctx.wrap_bio(cin, cout, server_hostname="a.test")
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        server.dataReceived(cout.read())
        self.assertEqual(self.apps, [])
        self.assertTrue(wire.disconnecting)
