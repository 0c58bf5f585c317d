"""
Helpers for testing code that uses L{mproxy.tls}: certificate factories, a
fake issuer for L{mproxy.tls.service.CertificateService}, and an in-memory
TLS handshake driver.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from zope.interface import implementer

from mproxy.tls.certs import CertifiedKey
from mproxy.tls.interfaces import IIssuer

__all__ = [
    "make_ca",
    "make_certificate",
    "pem_pair",
    "handshake",
    "FakeIssuer",
    "https_get_http11",
    "https_get_h2",
]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "mproxy test CA") -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(key=key, chain=[cert])


def make_certificate(
    names: list[str],
    not_before: float | None = None,
    not_after: float | None = None,
    issuer: CertifiedKey | None = None,
    ips: list[str] = (),  # type: ignore[assignment]
) -> CertifiedKey:
    """
    A leaf certificate for C{names} (first one is the CN), self-signed unless
    C{issuer} is given; times are POSIX timestamps (default: valid now for
    30 days).
    """
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    nb = (
        datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc)
        if not_before is not None
        else now - datetime.timedelta(hours=1)
    )
    na = (
        datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc)
        if not_after is not None
        else now + datetime.timedelta(days=30)
    )
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else "test"))
        .issuer_name(issuer.leaf.subject if issuer else _name(names[0] if names else "test"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    chain = [cert] + (list(issuer.chain) if issuer else [])
    return CertifiedKey(key=key, chain=chain)


def pem_pair(certified: CertifiedKey) -> tuple[bytes, bytes]:
    """
    (chain PEM, key PEM).
    """
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certified.chain)
    key = certified.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return chain, key


def handshake(
    server: SSL.Connection,
    server_name: bytes | None = None,
    alpn: list[bytes] | None = None,
    max_version: int | None = None,
) -> tuple[SSL.Connection, Exception | None]:
    """
    Run a TLS handshake in memory between C{server} (accept state is set
    here) and a fresh client offering C{server_name} and C{alpn}.  Returns
    the client connection and the first error either side raised.
    """
    server.set_accept_state()
    cctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        cctx.set_max_proto_version(max_version)
    client = SSL.Connection(cctx, None)
    client.set_connect_state()
    if server_name is not None:
        client.set_tlsext_host_name(server_name)
    if alpn:
        client.set_alpn_protos(alpn)
    error: Exception | None = None
    done = [False, False]
    for _ in range(20):
        for i, (a, b) in enumerate(((client, server), (server, client))):
            if not done[i]:
                try:
                    a.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    return client, e
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
        if all(done):
            break
    else:
        error = RuntimeError("handshake did not complete")
    return client, error


@implementer(IIssuer)
class FakeIssuer:
    """
    A scripted stand-in for L{mproxy.tls.acme.AcmeIssuer}.

    C{results} maps a host to a list of outcomes consumed one per order: an
    exception instance to raise, or L{None} to issue a certificate valid from
    C{clock.seconds()} for C{lifetime} seconds.  Hosts without a script
    succeed.  C{orders} records C{(host, challenge_type)} per call.
    """

    def __init__(self, clock: Any, lifetime: float = 90 * 86400) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.results: dict[str, list[Any]] = {}
        self.orders: list[tuple[str, str]] = []
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def issue(self, host: str, challenge_type: str) -> tuple[bytes, bytes]:
        self.orders.append((host, challenge_type))
        script = self.results.get(host)
        if script:
            outcome = script.pop(0)
            if outcome is not None:
                raise outcome
        now = self.clock.seconds()
        certified = make_certificate([host], not_before=now, not_after=now + self.lifetime)
        chain, key = pem_pair(certified)
        return key, chain


def synchronous_runner() -> Callable[[Callable[[], Any]], Any]:
    """
    A C{run_in_thread} that runs the job at once on the calling thread.
    """
    from twisted.internet.defer import maybeDeferred

    def run(job: Callable[[], Any]) -> Any:
        return maybeDeferred(job)

    return run


def _client_context(cafile: str | None, host: str | None) -> Any:
    import ssl

    if cafile is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=cafile)
    if host is None:
        ctx.check_hostname = False
    return ctx


def https_get_http11(
    port: int, host: str | None, cafile: str | None, address: str = "127.0.0.1"
) -> tuple[str, bytes, str]:
    """
    Blocking HTTPS GET / over HTTP/1.1 with SNI C{host} (None: no SNI and no
    hostname check), trusting C{cafile} (None: no verification).  Returns
    (ALPN protocol, raw response, peer SAN repr).  For tests, from a thread.
    """
    import socket

    ctx = _client_context(cafile, host)
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((address, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host or address}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            peer = s.getpeercert()
            san = peer.get("subjectAltName", ()) if peer else ()
            return s.selected_alpn_protocol(), data, repr(san)


def https_get_h2(
    port: int, host: str, cafile: str, address: str = "127.0.0.1"
) -> tuple[str, int, bytes]:
    """
    Blocking HTTPS GET / over HTTP/2 (h2 library).  Returns (ALPN protocol,
    status, body).  For tests, from a thread.
    """
    import socket

    import h2.connection
    import h2.events

    ctx = _client_context(cafile, host)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((address, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            alpn = s.selected_alpn_protocol()
            conn = h2.connection.H2Connection()
            conn.initiate_connection()
            conn.send_headers(
                1,
                [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", host)],
                end_stream=True,
            )
            s.sendall(conn.data_to_send())
            status, body = 0, b""
            done = False
            while not done:
                data = s.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        done = True
                s.sendall(conn.data_to_send())
            conn.close_connection()
            s.sendall(conn.data_to_send())
            return alpn, status, body
