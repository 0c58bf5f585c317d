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
    worker's router; a name of an on-demand service without a certificate
    is refused for this handshake and asked of the supervisor
    (L{mproxy.workers.commands.AskCertificate}), which runs the on-demand
    policy and issues; its certificate arrives with the next snapshot.
  - L{NotifyingChallenges} (supervisor): the challenge store the ACME
    issuer writes into; adding a challenge returns only once every worker
    holds it (the issuer tells the ACME server to validate right after),
    so HTTP-01 and TLS-ALPN-01 are answered by whichever worker the
    validation reaches.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python import threadable

from mproxy.tls.certs import CertifiedKey, certified_pem, load_certified_key
from mproxy.tls.challenges import ChallengeStore

#: How long a worker waits before asking again for an on-demand name.
ASK_AGAIN_AFTER = 2.0

#: How long an ACME thread waits for the workers to hold a new challenge.
CHALLENGE_PUSH_TIMEOUT = 5.0


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
                 now: Callable[[], float] = time.monotonic) -> None:
        self.lookup = lookup
        self.ask = ask
        self.now = now
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
        cert = self._hosts.get((directory, server_name))
        if cert is not None:
            return cert
        if options.tls_on_demand_url:
            now = self.now()
            if now - self._asked.get(server_name, -ASK_AGAIN_AFTER) >= ASK_AGAIN_AFTER:
                self._asked[server_name] = now
                self.ask(server_name)
        return None
