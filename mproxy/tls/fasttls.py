# -*- test-case-name: tests.test_tls_fasttls -*-
"""
The HTTPS listener's TLS transport on the standard library's C{ssl}
(C{SSLObject} over two C{MemoryBIO}s), in place of pyOpenSSL through
Twisted's C{TLSMemoryBIOProtocol}: fewer Python-level calls per record, and
what the application writes during one reactor iteration goes out as one
TLS record (up to 16 KiB) and one socket send at the start of the next
iteration, instead of one record and one buffered Twisted write per
C{write} call.

API::

    factory = FastTLSFactory(tls, wrapped_factory)
        # tls: a mproxy.tls.sni.ServerTLS (certificate selection, ALPN list,
        #   challenges); wrapped_factory builds the protocol that runs once
        #   the handshake is done (it is told through IHandshakeListener).

Once the handshake is done and nothing is left in the memory BIOs or the TCP
transport's buffer, a connection on a plain TCP transport is moved onto its
socket (L{mproxy.tls.sslbio}: OpenSSL reads and writes the socket through a
buffering BIO, without the copies into and out of the memory BIOs); the TCP
transport's C{doRead} and C{doWrite} then become this protocol's
C{_do_read} and C{_do_write}, and what the socket does not take waits for it
to be writable with the TCP transport's producer paused.  Connections that
cannot be moved stay on the memory BIOs.

Certificate selection is L{ServerTLS}'s (its C{select} and the same
fallback to a TLS-ALPN-01 certificate for names without one), done in the
C{sni_callback}, which swaps the connection's C{SSLContext} for one holding
the chosen certificate.  The standard library cannot choose a certificate
by the client's ALPN offer, so a handshake for a name with a pending
TLS-ALPN-01 challenge is handed, ClientHello and all, to the pyOpenSSL
C{TLSMemoryBIOProtocol} of the factory it subclasses, which answers
C{acme-tls/1} as before.  Nothing has been sent to the client at that
point, so the client sees one ordinary handshake.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import sys
import sysconfig
import tempfile
import weakref
from typing import Any

from twisted.internet.interfaces import (
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mproxy.http.batch import DIRECT_TYPES
from mproxy.http.reads import MAX_READ, READ_GROW_AT, body_read_size, grow_reads
from mproxy.nextturn import next_iteration_for
from mproxy.tls.certs import CertifiedKey, certified_pem
from mproxy.tls.fill import Filling
from mproxy.tls.fill import available as fill_available
from mproxy.tls.sslbio import (
    BULK_MIN,
    READ_WANTS_READ,
    READ_WANTS_WRITE,
    DirectIO,
    attach,
)

__all__ = ["FastTLSFactory", "StdlibContexts"]

#: plaintext queued beyond this many bytes is encrypted at once (so the TCP
#: transport's buffer limits and producer pausing apply to large bodies)
MAX_PENDING = 65536
#: bytes read from the SSL object at a time
READ_SIZE = 65536
#: a piece this large (it fills a TLS record of its own) is encrypted as it
#: is, not joined with the pieces around it (a response head, chunk framing)
SEPARATE_AT = 16384
#: decrypted bytes handed to the protocol per socket event, at most (the
#: rest is read in the next reactor iteration): the largest read of a plain
#: TCP connection (mproxy.http.reads.MAX_READ), so the HTTP layer sees the
#: same sizes over both
MAX_READ_EVENT = MAX_READ
#: a first record this large (a full one) on a busy connection starts a
#: bulk read: the event's records decrypted into one object
BULK_RECORD = 16384
#: a flush of this many bytes gives the connection's buffering BIO its
#: large write buffer
GROW_AT = 32768
#: a socket event that brings this many bytes (a full record: a large body
#: on its way) gives it its large read buffer
READ_GROW_AT_TLS = 16384
#: TLS 1.3 cipher suites, most preferred first: AES-128-GCM (as Go's TLS
#: and the browsers order them; about a fifth cheaper to encrypt and decrypt
#: than AES-256-GCM, which OpenSSL's default list puts first and the server's
#: cipher preference then picks for every client)
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def set_tls13_ciphersuites(ctx: ssl.SSLContext, suites: bytes) -> bool:
    """
    Set C{ctx}'s TLS 1.3 cipher suites (C{SSL_CTX_set_ciphersuites}), which
    the standard library has no method for.  On CPython the C{SSL_CTX}
    pointer is the first field after the object header of an
    C{ssl.SSLContext}; it is used only if OpenSSL reports the same options
    for it as the context does.  C{False} (the context unchanged) where
    that does not hold.
    """
    if (sys.implementation.name != "cpython" or hasattr(sys, "getobjects")
            or sysconfig.get_config_var("Py_GIL_DISABLED")
            or not (3, 11) <= sys.version_info[:2] <= (3, 14)):
        # another object header (a trace-refs or free-threaded build), or
        # a version whose SSLContext layout was not checked
        return False
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        get_options = lib.SSL_CTX_get_options
        set_suites = lib.SSL_CTX_set_ciphersuites
    except (OSError, AttributeError):
        return False
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    set_suites.restype = ctypes.c_int
    set_suites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pointer = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if not pointer or get_options(pointer) != ctx.options:
        return False
    return bool(set_suites(pointer, suites))


class StdlibContexts:
    """
    The standard-library contexts for a L{ServerTLS}: a base context
    without a certificate whose C{sni_callback} picks one, and one cached
    context per certificate.  Same policy as L{ServerTLS}'s pyOpenSSL
    contexts: TLS 1.2 minimum, the same TLS 1.2 cipher list, server cipher
    preference, no compression, no renegotiation, its ALPN list.
    """

    def __init__(self, tls: Any) -> None:
        self.tls = tls
        self._contexts: weakref.WeakKeyDictionary[CertifiedKey, ssl.SSLContext] = (
            weakref.WeakKeyDictionary()
        )
        self.base = self._new_context()
        self.base.sni_callback = self._on_servername

    def _new_context(self) -> ssl.SSLContext:
        from mproxy.tls.sni import CIPHERS

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | getattr(ssl, "OP_NO_RENEGOTIATION", 0))
        ctx.set_ciphers(CIPHERS.decode("ascii"))
        set_tls13_ciphersuites(ctx, TLS13_CIPHERSUITES)
        ctx.set_alpn_protocols([p.decode("ascii") for p in self.tls.protocols])
        return ctx

    def context_for(self, certified: CertifiedKey) -> ssl.SSLContext:
        ctx = self._contexts.get(certified)
        if ctx is None:
            ctx = self._new_context()
            chain, key = certified_pem(certified)
            # load_cert_chain reads files only: a private file, removed at once
            fd, path = tempfile.mkstemp(prefix="mproxy-cert-", suffix=".pem")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(key + b"\n" + chain)
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
            self._contexts[certified] = ctx
        return ctx

    def _on_servername(self, sslobj: Any, server_name: str | None, ctx: Any) -> Any:
        from mproxy.tls.sni import normalise_server_name

        conn = getattr(sslobj, "_mproxy_conn", None)
        name = normalise_server_name(server_name.encode("ascii") if server_name else None)
        tls = self.tls
        challenges = tls.challenges
        if (challenges is not None and name is not None and conn is not None
                and not conn._sent):
            if challenges.alpn_certificate(name) is not None:
                # only pyOpenSSL can pick the certificate by the ALPN offer
                conn._fallback = True
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        certified = tls.certificate_for(name)
        if certified is None:
            tls.logger.debug(f"No certificate for server name {name!r}", server_name=name)
            return None
        try:
            sslobj.context = self.context_for(certified)
        except Exception as e:
            tls.logger.error(f"Loading the certificate for {name!r} failed",
                             server_name=name, error=f"{type(e).__name__}: {e}")
        return None


@implementer(ISSLTransport, ITCPTransport, INegotiated, IPushProducer)
class FastTLSProtocol(Protocol):
    """
    The TCP connection's protocol, and the transport of the application
    protocol built once the handshake is done.
    """

    negotiatedProtocol: bytes | None = None
    disconnecting = False
    disconnected = False
    _fallback = False
    _sent = False  # anything sent to the client yet
    TLS = True
    #: the buffering BIO on the socket, once the connection runs on it
    _io: DirectIO | None = None
    #: what the socket could not take yet (the first piece is the one
    #: OpenSSL must be given again), or None
    _blocked: list[bytes] | None = None
    _closing = False  # close once what is blocked is sent
    _shut = False  # close_notify written
    _want_write = False  # a read needs the socket writable (a TLS reply)
    _paused = False  # the application paused reading
    #: L{write} and L{writeSequence} take memoryviews of C{bytes} as well
    #: (encrypted as they are; one that waits keeps its bytes alive)
    takes_views = True

    def __init__(self, factory: "FastTLSFactory", addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = factory.contexts.base.wrap_bio(
            self._incoming, self._outgoing, server_side=True)
        self._sslobj._mproxy_conn = self
        # the C object's methods, without the ssl.SSLObject wrappers
        self._ssl = getattr(self._sslobj, "_sslobj", self._sslobj)
        self._deliver: Any = None
        self._handshaking = True
        #: bytes the protocol said are still to come (L{fit_reads}); read
        #: at every read event
        self._read_want = 0
        # the client's bytes until anything is sent (the fallback replays them)
        self._hello: list[bytes] | None = []
        self._plain: list[bytes] = []
        self._plain_len = 0
        self._queued = False
        self.app: Any = None
        self._reason: Failure | None = None

    # -- from the TCP transport ------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        self.connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if len(data) >= READ_GROW_AT:
            grow_reads(self.transport, len(data))
        self._incoming.write(data)
        if self._handshaking:
            if self._hello is not None:
                self._hello.append(data)
            if not self._handshake():
                return
        if not self.disconnecting:
            # every complete record received, decrypted and handed to the
            # protocol in one call (a record holds at most 16 KiB: a large
            # upload would otherwise cost one protocol call per record)
            sslobj = self._ssl
            incoming = self._incoming
            first: bytes | None = None
            more: list[bytes] | None = None
            error: ssl.SSLError | None = None
            closed = False
            while True:
                try:
                    chunk = sslobj.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLError as e:
                    error = e
                    break
                if not chunk:
                    # close_notify from the client
                    closed = True
                    break
                if first is None:
                    first = chunk
                elif more is None:
                    more = [first, chunk]
                else:
                    more.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
            if first is not None:
                self._deliver(first if more is None else b"".join(more))
            if error is not None:
                self._fail(error)
            elif closed:
                self.loseConnection()
        if self._outgoing.pending:
            self._send_outgoing()
        if self.factory.direct and not self._handshaking and not self.disconnecting:
            self._go_direct()

    def _handshake(self) -> bool:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_outgoing()
            return False
        except ssl.SSLError as e:
            if self._fallback:
                self._to_pyopenssl()
            else:
                # send the alert, then close
                self._send_outgoing()
                self._fail(e)
            return False
        self._handshaking = False
        self._hello = None
        proto = self._sslobj.selected_alpn_protocol()
        self.negotiatedProtocol = proto.encode("ascii") if proto else None
        self._send_outgoing()
        app = self.factory.wrappedFactory.buildProtocol(self.addr)
        if app is None:
            self.loseConnection()
            return False
        self.app = app
        app.makeConnection(self)
        if IHandshakeListener.providedBy(app):
            app.handshakeCompleted()
        # bytes go straight to the protocol the ALPN dispatcher chose
        inner = getattr(app, "inner", None)
        self._deliver = (inner if inner is not None else app).dataReceived
        return not self.disconnecting

    # -- on the socket ---------------------------------------------------------

    def _go_direct(self) -> None:
        """
        Move the established connection from the memory BIOs onto its
        socket (L{mproxy.tls.sslbio}), once nothing is left in them or in
        the TCP transport's buffer; reads and writes then go through
        L{_do_read} and L{_do_write}, which the reactor calls for the TCP
        transport.  Connections that cannot be moved stay as they are.
        """
        t = self.transport
        if (type(t) not in DIRECT_TYPES or "doRead" in t.__dict__
                or "doWrite" in t.__dict__):
            self._go_direct = self._noop  # type: ignore[method-assign]
            return
        if (not t.connected or t.disconnecting or t.dataBuffer or t._tempDataLen
                or self._incoming.pending or self._outgoing.pending):
            return  # not yet: after the next read
        io = attach(self._sslobj, self._incoming, self._outgoing, t.fileno())
        if io is None:
            self._go_direct = self._noop  # type: ignore[method-assign]
            return
        self._io = io
        self._go_direct = self._noop  # type: ignore[method-assign]
        t.doRead = self._do_read
        t.doWrite = self._do_write

    def _noop(self) -> None:
        pass

    def _do_read(self) -> Any:
        """
        The socket is readable: decrypt every record OpenSSL can read now
        (up to L{MAX_READ_EVENT} bytes) and hand them to the protocol in
        one call.  The reactor's C{doRead}: returns why the connection is
        lost, or None.
        """
        io = self._io
        if io is None or self.disconnected:
            return None
        if self.disconnecting:
            self.transport.stopReading()
            return None
        if self._read_want >= BULK_RECORD and io.grown_reads and fill_available():
            # a body with more than a record still to come: read into one
            # object from the start
            return self._read_bulk(b"")
        sslobj = self._ssl
        first: bytes | None = None
        more: list[bytes] | None = None
        total = 0
        why: Any = None
        closed = False
        while True:
            try:
                chunk = sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except OSError as e:
                why = self._read_failed(e)
                break
            if not chunk:
                closed = True  # close_notify from the client
                break
            total += len(chunk)
            if first is None:
                if total >= BULK_RECORD and io.grown_reads and fill_available():
                    # a full record on a busy connection: a large body on
                    # its way, read into one object
                    return self._read_bulk(chunk)
                first = chunk
            elif more is None:
                more = [first, chunk]
            else:
                more.append(chunk)
            if total >= MAX_READ_EVENT:
                self.factory.reader.add(self)
                break
            if not sslobj.pending() and not io.unread():
                # nothing left in OpenSSL's buffers: what the socket still
                # holds makes the reactor call again (asking OpenSSL would
                # cost a failed read and an SSLWantReadError)
                break
        if total >= READ_GROW_AT_TLS and not io.grown_reads:
            io.grow(True)
        if first is not None:
            self._deliver(first if more is None else b"".join(more))
        if why is None and closed:
            self.loseConnection()
        return why

    def _read_bulk(self, first: bytes) -> Any:
        """
        The rest of L{_do_read} once a full record came first, or all of
        it when the protocol said a large body is on its way (L{fit_reads};
        C{first} is then empty): C{first} and the records after it, up to
        L{MAX_READ_EVENT} bytes, decrypted
        into one C{bytes} (L{mproxy.tls.fill}) instead of one per record
        and a join, by one call into OpenSSL for all of them
        (L{DirectIO.read_into}) where it can, else one C{read} per record;
        no question to OpenSSL per record (a failed read ends the event).
        Handed to the protocol in one call, as there.
        """
        io = self._io
        assert io is not None
        sslobj = self._ssl
        # the rest of a body a little larger than an event: all of it now
        size = body_read_size(MAX_READ_EVENT, self._read_want)
        filling = Filling(size)
        view = filling.view
        total = len(first)
        view[:total] = first
        del first
        why: Any = None
        closed = False
        read = sslobj.read
        if size - total >= BULK_MIN:
            n, state = io.read_into(filling.address + total, size - total)
            total += n
            if state == READ_WANTS_READ:
                size = total  # the socket is drained: no read below
            elif state == READ_WANTS_WRITE:
                self._wants_write()
                size = total
            # READ_FULL: done; READ_ENDED: the read below says why
        while total < size:
            try:
                n = read(size - total, view[total:])
            except ssl.SSLWantReadError:
                break
            except OSError as e:
                why = self._read_failed(e)
                break
            if not n:
                closed = True  # close_notify from the client
                break
            total += n
        else:
            if total >= MAX_READ_EVENT and (sslobj.pending() or io.unread()):
                # decrypted or read already: the socket will not signal it
                self.factory.reader.add(self)
        del view
        if total:
            self._deliver(filling.take(total))
        else:
            del filling  # nothing came (freed unused)
        if why is None and closed:
            self.loseConnection()
        return why

    def fit_reads(self, left: int) -> None:
        """
        The protocol expects C{left} more bytes (the rest of a request
        body; 0: nothing in particular).  On a busy connection, more than
        a record's worth makes each event a bulk read from its first
        record on; and a bulk read takes all of them when they are a
        little more than it takes at most
        (L{mproxy.http.reads.body_read_size}), so that the last few bytes
        (those a request head moved past the end of the last full-size
        read) do not come in an event of their own.
        """
        self._read_want = left

    def _read_failed(self, e: OSError) -> Any:
        """
        What a read from the socket that raised C{e} means for the
        connection: C{None} if it goes on (a reply OpenSSL must send first:
        the socket is watched for writing), else why it ends.
        """
        if isinstance(e, ssl.SSLWantWriteError):
            self._wants_write()
            return None
        if isinstance(e, ssl.SSLEOFError):
            return CONNECTION_DONE
        if isinstance(e, ssl.SSLError):
            # OpenSSL has sent its alert
            self._reason = Failure(e)
        return CONNECTION_LOST

    def _wants_write(self) -> None:
        """
        A read needs the socket writable first: a reply OpenSSL must send
        (a key update).
        """
        self._want_write = True
        self.transport.startWriting()

    def _read_later(self) -> None:
        """
        Read what OpenSSL holds already (the socket will not signal it):
        after a capped read, or once the protocol resumes reading.
        """
        if self._io is None or self.disconnecting or self._paused:
            return
        why = self._do_read()
        if why is not None:
            if self._reason is None:
                self._reason = Failure(why)
            self.transport.abortConnection()

    def _send_direct(self, pieces: list[bytes], total: int) -> None:
        """
        Encrypt C{pieces} onto the socket; what it does not take waits
        for it to be writable (L{_do_write}), with the TCP transport's
        producer paused.
        """
        io = self._io
        assert io is not None
        if self._blocked is not None:
            self._blocked.extend(pieces)
            return
        if total >= GROW_AT and not io.grown_writes:
            io.grow(False)
        write = self._ssl.write
        for i, piece in enumerate(pieces):
            try:
                write(piece)
            except ssl.SSLWantWriteError:
                self._blocked = pieces[i:]
                self._wait_writable()
                return
            except OSError as e:
                self._fail_direct(e)
                return
        self._sent = True
        r = io.flush()
        if r == 0:
            self._blocked = []
            self._wait_writable()
        elif r < 0:
            self._fail_direct(ConnectionError("sending to the client failed"))

    def _wait_writable(self) -> None:
        t = self.transport
        producer = t.producer
        if producer is not None and t.streamingProducer and not t.producerPaused:
            t.producerPaused = True
            producer.pauseProducing()
        t.startWriting()

    def _fail_direct(self, e: Exception) -> None:
        self._reason = Failure(e)
        self.disconnecting = True
        self._plain = []
        self._blocked = None
        self.transport.abortConnection()

    def _do_write(self) -> Any:
        """
        The socket is writable: send what it could not take before, then
        let the TCP transport resume its producer or finish closing.  The
        reactor's C{doWrite}.
        """
        t = self.transport
        if self._want_write:
            self._want_write = False
            why = self._do_read()
            if why is not None:
                return why
        blocked = self._blocked
        if blocked is not None:
            self._blocked = None
            self._send_direct(blocked, 0)
            if self._blocked is not None:
                return None
        if self._closing and not self._shut:
            self._shutdown()
            if self._blocked is not None:
                return None
        if self.disconnected or "doWrite" not in t.__dict__:
            return None
        return type(t).doWrite(t)

    def _to_pyopenssl(self) -> None:
        """
        Replay the ClientHello into the pyOpenSSL TLS protocol, which
        takes over the TCP connection.
        """
        hello, self._hello = self._hello or [], None
        self._handshaking = False
        self.disconnecting = True  # this object is done
        t = self.transport
        self.factory.protocols.pop(self, None)
        other = TLSMemoryBIOFactory.buildProtocol(self.factory, self.addr)
        t.protocol = other
        other.makeConnection(t)
        for data in hello:
            other.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = 0
        self.disconnecting = True
        self._plain = []
        self._blocked = None
        if self._io is not None:
            self._io.detach()
        self.factory.protocols.pop(self, None)
        app, self.app = self.app, None
        if app is not None:
            app.connectionLost(self._reason or reason)

    def _fail(self, e: Exception) -> None:
        self._reason = Failure(e)
        self.disconnecting = True
        self._plain = []
        self.transport.loseConnection()

    # -- sending ----------------------------------------------------------------

    def _send_outgoing(self) -> None:
        data = self._outgoing.read()
        if not data:
            return
        self._sent = True
        self._hello = None
        t = self.transport
        if (type(t) in DIRECT_TYPES and t.connected and not t.disconnecting
                and not t.dataBuffer and not t._tempDataLen):
            try:
                n = t.socket.send(data)
            except OSError:
                n = 0  # EAGAIN, or an error Twisted will notice itself
            if n == len(data):
                return
            data = data[n:]
        t.write(data)

    def _flush_plaintext(self) -> None:
        self._queued = False
        plain, self._plain = self._plain, []
        total, self._plain_len = self._plain_len, 0
        if plain and not self.disconnected:
            if self._io is not None:
                if len(plain) == 1:
                    pieces = plain
                elif total < SEPARATE_AT:
                    pieces = [b"".join(plain)]
                else:
                    pieces = _grouped(plain)
                self._send_direct(pieces, total)
                return
            write = self._ssl.write
            try:
                if len(plain) == 1:
                    write(plain[0])
                elif total < SEPARATE_AT:
                    write(b"".join(plain))
                else:
                    for piece in _grouped(plain):
                        write(piece)
            except ssl.SSLError as e:
                self._fail(e)
                return
            self._send_outgoing()

    # -- ITransport (for the application protocol) ---------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        self._plain.append(data)
        self._plain_len += len(data)
        if self._plain_len > MAX_PENDING:
            self._flush_plaintext()
        elif not self._queued:
            self._queued = True
            self.factory.flusher.add(self)

    def writeSequence(self, data: Any) -> None:
        """
        Queue the pieces as they are (a large body chunk is not joined
        with its framing).
        """
        if self.disconnecting:
            return
        plain = self._plain
        for piece in data:
            if piece:
                plain.append(piece)
                self._plain_len += len(piece)
        if self._plain_len > MAX_PENDING:
            self._flush_plaintext()
        elif plain and not self._queued:
            self._queued = True
            self.factory.flusher.add(self)

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self._handshaking:
            self.transport.loseConnection()
            return
        if self._plain:
            self._flush_plaintext()
        if self._io is not None:
            self.transport.stopReading()
            if self._blocked is not None:
                self._closing = True  # once the socket took the rest
                return
        self._shutdown()

    def _shutdown(self) -> None:
        self._shut = True
        try:
            self._sslobj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # no reply to our close_notify is awaited
        io = self._io
        if io is not None:
            r = io.flush()
            if r == 0:
                self._closing = True
                self._blocked = []
                self.transport.startWriting()
                return
        else:
            self._send_outgoing()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._plain = []
        self._blocked = None
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getHandle(self) -> Any:
        return self.transport.getHandle()

    def getPeerCertificate(self) -> Any:
        return None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    # -- IConsumer / IPushProducer: straight to the TCP transport ------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, False
        self.transport.resumeProducing()
        io = self._io
        if paused and io is not None and (io.unread() or self._ssl.pending()):
            # bytes OpenSSL holds already: the socket will not signal them
            self.factory.reader.add(self)

    def stopProducing(self) -> None:
        self.transport.stopProducing()


def _grouped(plain: list[bytes]) -> list[bytes]:
    """
    C{plain}'s pieces of L{SEPARATE_AT} bytes or more as they are, the
    small ones between them joined.
    """
    out: list[bytes] = []
    small: list[bytes] = []
    for piece in plain:
        if len(piece) >= SEPARATE_AT:
            if small:
                out.append(small[0] if len(small) == 1 else b"".join(small))
                small = []
            out.append(piece)
        else:
            small.append(piece)
    if small:
        out.append(small[0] if len(small) == 1 else b"".join(small))
    return out


class FastTLSFactory(TLSMemoryBIOFactory):
    """
    A L{TLSMemoryBIOFactory} whose connections run on the standard
    library's C{ssl} (handshakes that need C{acme-tls/1} fall back to the
    pyOpenSSL protocol).
    """

    #: move established connections onto their sockets (L{mproxy.tls.sslbio})
    direct = True

    def __init__(self, tls: Any, wrapped: Any, reactor: Any = None) -> None:
        super().__init__(tls, False, wrapped)
        self.tls = tls
        self.contexts = StdlibContexts(tls)
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.flusher = next_iteration_for(reactor, "_flush_plaintext")
        self.reader = next_iteration_for(reactor, "_read_later")

    def buildProtocol(self, addr: Any) -> Any:
        return FastTLSProtocol(self, addr)
