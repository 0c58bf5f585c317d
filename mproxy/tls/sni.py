# -*- test-case-name: tests.test_tls_sni -*-
"""
The HTTPS listener's TLS plumbing: per-handshake certificate selection by SNI,
ALPN (C{h2}, C{http/1.1}, C{acme-tls/1}) and the protocol switch after the
handshake.

API::

    tls = ServerTLS(select, challenges, logger=None)
        # select(server_name: str | None) -> CertifiedKey | None
        #   server_name is lower-case without trailing dot, None without SNI;
        #   None result refuses the handshake.
        #   CertificateService.select is the production implementation.
        # challenges: IChallengeResponder (TLS-ALPN-01 certificates) or None.
        # logger: a JSONLogger (default: JSON lines on stdout).
    factory = https_factory(tls, site, protocol_for_alpn=None, stdlib=True)
        # -> a TLSMemoryBIOFactory (with stdlib, the subclass
        #    mproxy.tls.fasttls.FastTLSFactory, whose connections run on the
        #    standard library's ssl and fall back to pyOpenSSL only to
        #    answer TLS-ALPN-01): listen with any stream server endpoint, e.g.
        #    StreamServerEndpointService(TCP4ServerEndpoint(reactor, 443,
        #        interface=bind), factory)
        # protocol_for_alpn(negotiated: bytes | None, addr) -> IProtocol builds
        # the HTTP protocol once the handshake has picked one; the default
        # (default_protocol_for_alpn(site)) uses Twisted's
        # _GenericHTTPChannelProtocol, which speaks HTTP/2 when ALPN chose h2.

Security settings: TLS 1.2 minimum, ECDHE with AES-GCM / ChaCha20 for TLS
1.2 (TLS 1.3 suites are OpenSSL's defaults), no compression, no
renegotiation.  The base context has no certificate, so a handshake for
which C{select} gives nothing fails.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mproxy.logging import JSONLogger
from mproxy.tls.certs import CertifiedKey
from mproxy.tls.interfaces import IChallengeResponder

__all__ = [
    "ServerTLS",
    "https_factory",
    "default_protocol_for_alpn",
    "ALPN_ACME",
    "ALPN_H2",
    "ALPN_HTTP11",
    "normalise_server_name",
]

ALPN_ACME = b"acme-tls/1"
ALPN_H2 = b"h2"
ALPN_HTTP11 = b"http/1.1"

CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"


def normalise_server_name(raw: bytes | None) -> str | None:
    if not raw:
        return None
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    name = name.lower().rstrip(".")
    return name or None


def guarded_select(select: Callable[[str | None], Any], name: str | None, logger: Any) -> Any:
    """
    C{select(name)}, with an exception of its logged (with its traceback)
    and answered as no certificate: a bug there refuses one handshake
    instead of breaking the connection's code (TCP or QUIC).
    """
    try:
        return select(name)
    except Exception as e:
        import traceback

        logger.error(
            f"Selecting a certificate for {name!r} failed",
            server_name=name,
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(),
        )
        return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    An L{IOpenSSLServerConnectionCreator} that chooses the certificate per
    handshake.
    """

    def __init__(
        self,
        select: Callable[[str | None], CertifiedKey | None],
        challenges: IChallengeResponder | None = None,
        protocols: Iterable[bytes] = (ALPN_H2, ALPN_HTTP11),
        logger: Any = None,
    ) -> None:
        self.select = select
        self.logger = logger if logger is not None else JSONLogger()
        self.challenges = challenges
        self.protocols = tuple(protocols)
        # one context per certificate, dropped with the certificate
        self._contexts: weakref.WeakKeyDictionary[CertifiedKey, SSL.Context] = (
            weakref.WeakKeyDictionary()
        )
        self._base = self._new_context()
        self._base.set_tlsext_servername_callback(self._on_servername)

    # -- contexts -----------------------------------------------------------

    def _new_context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
        options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
        ctx.set_options(options)
        ctx.set_cipher_list(CIPHERS)
        ctx.set_session_id(b"mproxy")
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_alpn_select_callback(self._on_alpn)
        return ctx

    def context_for(self, certified: CertifiedKey) -> SSL.Context:
        """
        The (cached) context serving C{certified}.
        """
        ctx = self._contexts.get(certified)
        if ctx is None:
            ctx = self._new_context()
            ctx.use_certificate(crypto.X509.from_cryptography(certified.chain[0]))
            ctx.use_privatekey(crypto.PKey.from_cryptography_key(certified.key))
            for extra in certified.chain[1:]:
                ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
            ctx.check_privatekey()
            self._contexts[certified] = ctx
        return ctx

    def certificate_for(self, name: str | None) -> Any:
        """
        C{select(name)}, with an exception of its logged (with its
        traceback) and answered as no certificate, so that a bug there
        refuses one handshake instead of breaking the connection's code.
        """
        return guarded_select(self.select, name, self.logger)

    # -- callbacks (reactor thread, inside the handshake) -----------------

    def _on_servername(self, conn: SSL.Connection) -> None:
        name = normalise_server_name(conn.get_servername())
        certified = self.certificate_for(name)
        if certified is None and self.challenges is not None:
            # Without a certificate here OpenSSL cannot choose a cipher before
            # the ALPN callback runs.  A name without a certificate of its own
            # but with a pending TLS-ALPN-01 challenge gets the challenge
            # certificate; clients other than the validator would have been
            # refused anyway.
            certified = self.challenges.alpn_certificate(name)
        if certified is None:
            self.logger.debug(f"No certificate for server name {name!r}", server_name=name)
            return
        conn.set_context(self.context_for(certified))

    def _on_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
        if ALPN_ACME in offered and self.challenges is not None:
            name = normalise_server_name(conn.get_servername())
            certified = self.challenges.alpn_certificate(name)
            if certified is not None:
                conn.set_context(self.context_for(certified))
                return ALPN_ACME
        for proto in self.protocols:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    # -- IOpenSSLServerConnectionCreator ----------------------------------

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._base, None)



def default_protocol_for_alpn(site: Factory) -> Callable[[bytes | None, Any], Any]:
    """
    Build protocols from C{site} (a L{twisted.web.server.Site}): its
    C{_GenericHTTPChannelProtocol} switches to HTTP/2 when ALPN chose C{h2}.
    """

    def protocol_for_alpn(negotiated: bytes | None, addr: Any) -> Any:
        return site.buildProtocol(addr)

    return protocol_for_alpn


@implementer(IHandshakeListener)
class _ALPNDispatch(Protocol):
    """
    Waits for the TLS handshake, then hands the connection to the protocol
    chosen for the negotiated ALPN protocol.  C{acme-tls/1} connections are
    closed after the handshake (RFC 8737 section 3).
    """

    inner: Any = None

    def __init__(self, factory: "_ALPNDispatchFactory", addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self._buffer: list[bytes] = []

    def handshakeCompleted(self) -> None:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == ALPN_ACME:
            self.transport.loseConnection()
            return
        inner = self.factory.protocol_for_alpn(negotiated, self.addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        if IHandshakeListener.providedBy(inner):
            inner.handshakeCompleted()
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            inner.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
        else:
            self._buffer.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def readConnectionLost(self) -> None:
        if self.inner is not None and hasattr(self.inner, "readConnectionLost"):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()


class _ALPNDispatchFactory(Factory):
    noisy = False

    def __init__(self, protocol_for_alpn: Callable[[bytes | None, Any], Any], wrapped: Any) -> None:
        self.protocol_for_alpn = protocol_for_alpn
        self.wrapped = wrapped

    def doStart(self) -> None:
        if self.wrapped is not None:
            self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        if self.wrapped is not None:
            self.wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: Any) -> Protocol:
        p = _ALPNDispatch(self, addr)
        p.factory = self
        return p


def https_factory(
    tls: ServerTLS,
    site: Factory | None = None,
    protocol_for_alpn: Callable[[bytes | None, Any], Any] | None = None,
    stdlib: bool = True,
) -> TLSMemoryBIOFactory:
    """
    A server factory for the HTTPS port: TLS with certificate selection by
    C{tls}, then the protocol from C{protocol_for_alpn} (default: C{site}'s).
    With C{stdlib} (the default) connections run on the standard library's
    C{ssl} (L{mproxy.tls.fasttls}); without it, on pyOpenSSL.
    """
    if protocol_for_alpn is None:
        if site is None:
            raise TypeError("https_factory needs a site or protocol_for_alpn")
        protocol_for_alpn = default_protocol_for_alpn(site)
    wrapped = _ALPNDispatchFactory(protocol_for_alpn, site)
    if stdlib:
        from mproxy.tls.fasttls import FastTLSFactory

        # the site's reactor runs the per-iteration write flush
        return FastTLSFactory(tls, wrapped, getattr(site, "reactor", None))
    return TLSMemoryBIOFactory(tls, False, wrapped)
