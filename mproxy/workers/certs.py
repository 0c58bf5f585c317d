"""
Certificates and ACME challenges across the supervisor and its workers.

The supervisor's L{mproxy.tls.service.CertificateService} issues, renews
and loads every certificate; a worker terminates TLS with what the
supervisor sent it:

  - L{certificate_snapshot} (supervisor): what every handshake may need, as
    PEM: the certificate for handshakes without SNI, the custom
    certificates by service, the ACME certificates by (directory, host) and
    the two ACME directories.  L{CertificateWatch} sends it to the workers
    whenever it changes (checked after every routing change and every
    L{CertificateWatch.interval} seconds).
  - L{CertificateMirror} (worker): L{CertificateMirror.select} makes the
    same choice as C{CertificateService.select} from the snapshot and the
    worker's router.  For a name of an on-demand service without a
    certificate here, L{HelloGate} holds the connection's ClientHello and
    asks the supervisor first (L{CertificateMirror.fetch},
    L{mproxy.workers.commands.FetchCertificate}): a certificate the
    supervisor has (in its store, not mirrored yet) answers this very
    handshake, as it would in one process.  When it has none, the handshake
    is refused, the supervisor runs the on-demand policy and issues, and the
    certificate arrives with the next snapshot.
  - L{NotifyingChallenges} (supervisor): the challenge store the ACME
    issuer writes into; adding a challenge returns only once every worker
    holds it (the issuer tells the ACME server to validate right after),
    so HTTP-01 and TLS-ALPN-01 are answered by whichever worker the
    validation reaches.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python import threadable

from mproxy.tls.certs import CertifiedKey, certified_pem, load_certified_key
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.sni import normalise_server_name

#: How long a worker waits before asking again for an on-demand name.
ASK_AGAIN_AFTER = 2.0

#: How long an ACME thread waits for the workers to hold a new challenge.
CHALLENGE_PUSH_TIMEOUT = 5.0

#: How long a handshake waits for the supervisor's certificate.
FETCH_TIMEOUT = 5.0

#: The most bytes of a ClientHello looked at (one TLS record).
MAX_HELLO = 5 + 16384


def _pem(cert: CertifiedKey | None) -> list[str] | None:
    if cert is None:
        return None
    chain, key = certified_pem(cert)
    return [chain.decode("ascii"), key.decode("ascii")]


def certificate_snapshot(certs: Any) -> dict[str, Any]:
    """
    The JSON snapshot of a L{mproxy.tls.service.CertificateService}'s
    certificates (see the module docstring).
    """
    static = {}
    for name in sorted(certs._services):
        loaded = certs.static.get(name)
        if loaded is not None and loaded.certificate is not None:
            static[name] = _pem(loaded.certificate)
    hosts = [
        [directory, name, _pem(host.certificate)]
        for (directory, name), host in sorted(certs._hosts.items())
        if host.certificate is not None
    ]
    return {
        "default": _pem(certs._default_certificate()),
        "static": static,
        "hosts": hosts,
        "directories": [certs.directories.production, certs.directories.staging],
    }


def _identity(certs: Any) -> tuple[Any, ...]:
    """
    Cheap to compute, and different whenever the snapshot would be.
    """
    static = tuple(
        (name, id(getattr(certs.static.get(name), "certificate", None)))
        for name in sorted(certs._services)
    )
    hosts = tuple((key, id(host.certificate)) for key, host in sorted(certs._hosts.items()))
    return static, hosts, id(certs._default_certificate())


class CertificateWatch:
    """
    Sends the certificate snapshot to the workers (C{push(snapshot)})
    whenever it changed: on L{check}, and every C{interval} seconds once
    started.
    """

    interval = 0.5

    def __init__(self, clock: Any, certs: Any, push: Callable[[dict[str, Any]], Any]) -> None:
        self.clock = clock
        self.certs = certs
        self.push = push
        self._last: Any = None
        self._call: Any = None
        self.snapshot: dict[str, Any] = {"default": None, "static": {}, "hosts": [],
                                         "directories": ["", ""]}

    def check(self) -> None:
        identity = _identity(self.certs)
        if identity == self._last:
            return
        self._last = identity
        self.snapshot = certificate_snapshot(self.certs)
        self.push(self.snapshot)

    def start(self) -> None:
        self.check()
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        self.check()
        self._call = self.clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class NotifyingChallenges(ChallengeStore):
    """
    A challenge store that hands every change to C{push(http01, alpn)} on
    the reactor; an addition made from another thread (the ACME order's)
    returns once the Deferred C{push} gave has fired, or after
    L{CHALLENGE_PUSH_TIMEOUT} seconds.
    """

    def __init__(self, reactor: Any,
                 in_io_thread: Callable[[], bool] = threadable.isInIOThread) -> None:
        super().__init__()
        self.reactor = reactor
        self.in_io_thread = in_io_thread
        self.push: Callable[[dict[str, str], dict[str, list[str]]], Deferred[Any]] | None = None

    def contents(self) -> tuple[dict[str, str], dict[str, list[str] | None]]:
        with self._lock:
            http01 = {t: v.decode("ascii") for t, v in self._http01.items()}
            alpn = {d: _pem(c) for d, c in self._alpn.items()}
        return http01, alpn

    def _send(self) -> Deferred[Any] | None:
        if self.push is None:
            return None
        http01, alpn = self.contents()
        return self.push(http01, alpn)  # type: ignore[arg-type]

    def _changed(self, wait: bool) -> None:
        if self.in_io_thread():
            self._send()
            return
        if not wait:
            self.reactor.callFromThread(self._send)
            return
        from twisted.internet.threads import blockingCallFromThread

        def send() -> Any:
            d = self._send()
            if d is not None:
                d.addTimeout(CHALLENGE_PUSH_TIMEOUT, self.reactor)
            return d

        try:
            blockingCallFromThread(self.reactor, send)
        except Exception:
            pass  # a worker that does not answer must not stop the order

    def add_http01(self, token: str, key_authorization: str) -> None:
        super().add_http01(token, key_authorization)
        self._changed(True)

    def remove_http01(self, token: str) -> None:
        super().remove_http01(token)
        self._changed(False)

    def add_tls_alpn01(self, domain: str, certificate: CertifiedKey) -> None:
        super().add_tls_alpn01(domain, certificate)
        self._changed(True)

    def remove_tls_alpn01(self, domain: str) -> None:
        super().remove_tls_alpn01(domain)
        self._changed(False)


class CertificateMirror:
    """
    The worker's certificates (see the module docstring).

    @param lookup: C{server_name -> (service name, ServiceOptions) | None},
        the worker's router's service for C{/} on that name.
    @param ask: called with an on-demand name that has no certificate yet.
    """

    def __init__(self, lookup: Callable[[str], Any], ask: Callable[[str], None],
                 now: Callable[[], float] = time.monotonic,
                 fetch: Callable[[str], Deferred[Any]] | None = None) -> None:
        """
        @param fetch: asks the supervisor for a name's certificate; fires
            with its PEM pair, or C{None} when it has none.
        """
        self.lookup = lookup
        self.ask = ask
        self.now = now
        self._fetch = fetch
        #: certificates fetched for one name, until a snapshot holds them
        self._fetched: dict[tuple[str, str], CertifiedKey] = {}
        self._fetching: dict[str, list[Deferred[None]]] = {}
        self.challenges = ChallengeStore()
        self._default: CertifiedKey | None = None
        self._static: dict[str, CertifiedKey] = {}
        self._hosts: dict[tuple[str, str], CertifiedKey] = {}
        self._directories = ("", "")
        self._loaded: dict[tuple[str, str], CertifiedKey] = {}
        self._asked: dict[str, float] = {}

    def _load(self, pem: list[str] | None) -> CertifiedKey | None:
        """
        The certificate of a PEM pair, the same object for the same PEM (so
        the TLS contexts built for it are kept).
        """
        if pem is None:
            return None
        key = (pem[0], pem[1])
        cert = self._loaded.get(key)
        if cert is None:
            cert = load_certified_key(pem[0].encode("ascii"), pem[1].encode("ascii"))
        return cert

    def update(self, snapshot: dict[str, Any]) -> None:
        loaded: dict[tuple[str, str], CertifiedKey] = {}

        def load(pem: list[str] | None) -> CertifiedKey | None:
            cert = self._load(pem)
            if cert is not None and pem is not None:
                loaded[(pem[0], pem[1])] = cert
            return cert

        self._default = load(snapshot.get("default"))
        self._static = {name: c for name, pem in snapshot.get("static", {}).items()
                        if (c := load(pem)) is not None}
        self._hosts = {(d, h): c for d, h, pem in snapshot.get("hosts", [])
                       if (c := load(pem)) is not None}
        directories = snapshot.get("directories") or ["", ""]
        self._directories = (directories[0], directories[1])
        self._loaded = loaded
        self._asked.clear()
        for key in [k for k in self._fetched if k in self._hosts]:
            del self._fetched[key]

    def update_challenges(self, http01: dict[str, str], alpn: dict[str, list[str]]) -> None:
        store = ChallengeStore()
        for token, value in http01.items():
            store.add_http01(token, value)
        for domain, pem in alpn.items():
            cert = self._load(pem)
            if cert is not None:
                store.add_tls_alpn01(domain, cert)
        with self.challenges._lock:
            self.challenges._http01 = store._http01
            self.challenges._alpn = store._alpn

    def select(self, server_name: str | None) -> CertifiedKey | None:
        """
        The certificate for a handshake, as C{CertificateService.select}
        chooses it.
        """
        if server_name is None:
            return self._default
        found = self.lookup(server_name)
        if found is None:
            return None
        service, options = found
        if not options.tls_enabled:
            return None
        static = self._static.get(service)
        if static is not None:
            return static
        if options.tls_certificate_path:
            return None
        directory = self._directories[1] if options.tls_staging else self._directories[0]
        cert = self._hosts.get((directory, server_name)) or self._fetched.get(
            (directory, server_name))
        if cert is not None:
            return cert
        if options.tls_on_demand_url:
            now = self.now()
            if now - self._asked.get(server_name, -ASK_AGAIN_AFTER) >= ASK_AGAIN_AFTER:
                self._asked[server_name] = now
                self.ask(server_name)
        return None

    # on-demand names, before their handshake

    def _on_demand_key(self, server_name: str) -> tuple[str, str] | None:
        """
        C{(directory, name)} when C{server_name} is served by an on-demand
        service and has no certificate here.
        """
        found = self.lookup(server_name)
        if found is None:
            return None
        service, options = found
        if not options.tls_enabled or not options.tls_on_demand_url:
            return None
        if service in self._static or options.tls_certificate_path:
            return None
        directory = self._directories[1] if options.tls_staging else self._directories[0]
        key = (directory, server_name)
        if key in self._hosts or key in self._fetched:
            return None
        return key

    def wait_for(self, server_name: str | None) -> Deferred[None] | None:
        """
        Before the handshake for C{server_name}: C{None} when it can go on
        now, else a Deferred that fires once the supervisor said whether it
        has a certificate for it (held here if so).  A name the supervisor
        had none for is asked again only after L{ASK_AGAIN_AFTER} seconds.
        """
        if server_name is None or self._fetch is None:
            return None
        key = self._on_demand_key(server_name)
        if key is None:
            return None
        waiting = self._fetching.get(server_name)
        if waiting is None:
            now = self.now()
            if now - self._asked.get(server_name, -ASK_AGAIN_AFTER) < ASK_AGAIN_AFTER:
                return None
            self._asked[server_name] = now
            waiting = self._fetching[server_name] = []

            def answered(pem: Any) -> None:
                cert = self._load(pem) if pem else None
                if cert is not None:
                    self._fetched[key] = cert

            def done(_: object) -> None:
                for d in self._fetching.pop(server_name, []):
                    d.callback(None)

            self._fetch(server_name).addCallback(answered).addBoth(done)
            if server_name not in self._fetching:
                return None  # answered at once
        d: Deferred[None] = Deferred()
        waiting.append(d)
        return d


def client_hello_server_name(data: bytes) -> tuple[bool, str | None]:
    """
    The server name a TLS ClientHello's first record asks for:
    C{(False, None)} while more bytes are needed, else C{(True, name)}
    (C{name} lower-case without a trailing dot, or C{None}: no name, or
    not a ClientHello this can read).
    """
    if len(data) < 5:
        return False, None
    if data[0] != 0x16:  # not a handshake record
        return True, None
    (length,) = struct.unpack_from("!H", data, 3)
    if len(data) < 5 + length:
        return (len(data) >= MAX_HELLO), None
    body = data[5:5 + length]
    try:
        if body[0] != 0x01:  # not a ClientHello
            return True, None
        end = 4 + int.from_bytes(body[1:4], "big")
        if end > len(body):
            return True, None  # spans records: leave it to TLS
        i = 4 + 2 + 32
        i += 1 + body[i]  # session id
        i += 2 + int.from_bytes(body[i:i + 2], "big")  # cipher suites
        i += 1 + body[i]  # compression methods
        extensions_end = i + 2 + int.from_bytes(body[i:i + 2], "big")
        i += 2
        while i + 4 <= min(extensions_end, end):
            kind = int.from_bytes(body[i:i + 2], "big")
            size = int.from_bytes(body[i + 2:i + 4], "big")
            i += 4
            if kind == 0:  # server_name: a list of (type, name)
                j = i + 2
                while j + 3 <= i + size:
                    name_type = body[j]
                    name_len = int.from_bytes(body[j + 1:j + 3], "big")
                    name = body[j + 3:j + 3 + name_len]
                    if name_type == 0:
                        return True, normalise_server_name(bytes(name))
                    j += 3 + name_len
                return True, None
            i += size
    except IndexError:
        pass
    return True, None


class _HelloWaiting(Protocol):
    """
    Holds a connection's first bytes until its ClientHello's server name is
    known and L{CertificateMirror.wait_for} let it go on, then hands the
    connection to the TLS protocol (which takes the transport over).
    """

    def __init__(self, gate: "HelloGate", inner: Any) -> None:
        self.gate = gate
        self.inner = inner
        self.buffer = b""
        self.waiting = False
        self.passed = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting:
            return
        complete, name = client_hello_server_name(self.buffer)
        if not complete:
            return
        d = self.gate.wait_for(name)
        if d is None:
            self._pass()
            return
        self.waiting = True
        self._timer = self.gate.clock.callLater(FETCH_TIMEOUT, self._pass)
        d.addCallback(lambda _: self._pass())

    def _pass(self) -> None:
        if self.passed:
            return
        self.passed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.transport.protocol is self:
            self.transport.protocol = self.inner
        if not getattr(self.transport, "disconnected", False):
            data, self.buffer = self.buffer, b""
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.passed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.inner.connectionLost(reason)


class HelloGate(Factory):
    """
    The HTTPS factory C{wrapped} (a TLS factory), each connection's
    ClientHello first held until C{wait_for(server_name)} (the mirror's
    L{CertificateMirror.wait_for}) says its certificate is here or will not
    be; at most L{FETCH_TIMEOUT} seconds.  Once let go, the connection is
    the TLS protocol's alone.
    """

    noisy = False

    def __init__(self, wrapped: Any, wait_for: Callable[[str | None], Deferred[None] | None],
                 clock: Any, needed: Callable[[], bool] = lambda: True) -> None:
        """
        @param needed: whether any name may need waiting for (some service
            has on-demand TLS); when not, connections go to C{wrapped} as
            they are.
        """
        self.wrapped = wrapped
        self.wait_for = wait_for
        self.clock = clock
        self.needed = needed

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrapped.buildProtocol(addr)
        if inner is None or not self.needed():
            return inner
        return _HelloWaiting(self, inner)
