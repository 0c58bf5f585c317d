# -*- test-case-name: tests.test_tls_service -*-
"""
L{CertificateService}: which certificate each TLS handshake gets, and which
hosts need ACME certificates.  It owns the mapping from deployed services to
hosts; the work per host is a L{HostCertificate} state machine, orders run
through an L{OrderRunner}, when to retry is the L{RetryPolicy}'s decision,
unknown on-demand names pass the L{OnDemandGate}, custom certificates are
L{StaticCertificates}.  L{mproxy.tls.wiring} builds the production one.

Deploy integration (the controller)::

    certs.validate(options)            # before switching; raises CertificateError
    certs.update_service(name, options)    # after the switch (and on state restore)
    certs.remove_service(name)
    certs.status()                     # -> {host: "valid until 2026-...Z" | "pending (error)" ...}
    certs.host_status()                # -> list[HostStatus]

Handshakes: C{certs.select(server_name)}; challenges: C{certs.challenges}.

Rules:
  - ACME is used for a service with TLS on and no certificate paths; every
    listed host gets a certificate, issuance starts at once in the background
    and never fails a deploy.
  - Renewal starts when a third of the lifetime is left.
  - Hosts no longer deployed are forgotten: no renewal, no retries.
  - Path services inherit TLS from their host's root service, which owns
    the certificates.
  - On-demand services: an unknown SNI name triggers the policy check; a
    name with a certificate in the store is approved without asking.
  - Custom certificates are polled for changes every C{static_poll_interval}
    seconds on the clock, and reloaded by C{reload_static()}.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import evolve, frozen
from twisted.application.service import Service

from mproxy.errors import CertificateError
from mproxy.tls.issuing import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.certs import CertifiedKey
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.gate import OnDemandGate
from mproxy.tls.hostcert import ORDERING, HostCertificate
from mproxy.tls.interfaces import ICertificateStore, IChallengeResponder
from mproxy.tls.orders import OrderRunner
from mproxy.tls.static import StaticCertificates, load_static
from mproxy.tls.status import HostStatus
from mproxy.tls.store import valid_host_name

__all__ = ["CertificateService", "Directories", "HostStatus", "Lookup"]

Lookup = Callable[[str], "tuple[str, Any] | None"]
Key = tuple[str, str]  # (directory URL, host)


@frozen
class Directories:
    """
    The ACME directory for services without and with C{--tls-staging}.
    """

    production: str = LETS_ENCRYPT
    staging: str = LETS_ENCRYPT_STAGING

    def for_options(self, options: Any) -> str:
        return self.staging if options.tls_staging else self.production


def _is_root(options: Any) -> bool:
    return "/" in options.path_prefixes


def _is_acme(options: Any) -> bool:
    return bool(
        options.tls_enabled and not options.tls_certificate_path and not options.tls_on_demand_url
    )


def _is_on_demand(options: Any) -> bool:
    return bool(options.tls_enabled and options.tls_on_demand_url)


def validate_tls_options(options: Any) -> None:
    """
    Check a service's TLS options before a deploy switches traffic.

    @raise CertificateError: custom certificate files missing, unreadable,
        not PEM, or key not matching; or ACME with a wildcard host.
    """
    if not options.tls_enabled:
        return
    if options.tls_certificate_path or options.tls_private_key_path:
        load_static(options.tls_certificate_path, options.tls_private_key_path)
        return
    if options.tls_on_demand_url:
        return
    if any("*" in h for h in options.hosts):
        raise CertificateError("automatic TLS does not support wildcards")


def match_service(services: dict[str, Any], server_name: str) -> tuple[str, Any] | None:
    """
    The root service among C{services} (name -> options) for C{server_name}:
    an exact host, then a C{*.} wildcard, then a default service (host "").
    """
    best: tuple[int, str, Any] | None = None
    for name, options in services.items():
        if not _is_root(options):
            continue
        for h in options.hosts:
            if h == server_name:
                rank = 0
            elif h.startswith("*.") and server_name.partition(".")[2] == h[2:]:
                rank = 1
            elif h == "":
                rank = 2
            else:
                continue
            if best is None or rank < best[0]:
                best = (rank, name, options)
    return None if best is None else (best[1], best[2])


def wanted_hosts(
    services: dict[str, Any], on_demand_hosts: dict[str, set[str]], directories: Directories
) -> dict[Key, tuple[str, bool]]:
    """
    Every (directory, host) that needs an ACME certificate, with the service
    that owns it and whether it is on-demand.
    """
    wanted: dict[Key, tuple[str, bool]] = {}
    for name in sorted(services):
        options = services[name]
        if not _is_root(options):
            continue
        directory = directories.for_options(options)
        if _is_acme(options):
            for h in options.hosts:
                if h and "*" not in h:
                    wanted.setdefault((directory, h), (name, False))
        elif _is_on_demand(options):
            for h in on_demand_hosts.get(name, ()):
                wanted.setdefault((directory, h), (name, True))
    return wanted


def cluster_row(host: HostCertificate, cluster: Any) -> HostStatus:
    """
    C{host}'s status row; in a cluster with this node ordering now and
    whether the store is reachable.
    """
    row = host.status()
    if cluster is None:
        return row
    return evolve(
        row,
        ordering_on=cluster.node if host.state == ORDERING else row.ordering_on,
        store_unreachable=cluster.reachable is False,
    )


class CertificateService(Service):
    """
    See the module docstring.

    @param clock: L{IReactorTime} for every timer.
    @param store: the L{ICertificateStore} (read at deploy and handshake time).
    @param orders: runs and stores ACME orders.
    @param logger: a L{mproxy.logging.JSONLogger}.
    @param lookup: C{server_name -> (service_name, ServiceOptions) | None},
        the router's answer for path C{/}; the default matches the services
        given to L{update_service} (exact, then C{*.} wildcard, then default).
    @param gate: decides on-demand names; None refuses every unknown name.
    @param cluster: in a cluster, its C{node} name and whether its store is
        C{reachable}, for the status rows; certificates other nodes got
        arrive through L{adopt}.
    """

    def __init__(
        self,
        clock: Any,
        store: ICertificateStore,
        orders: OrderRunner,
        logger: Any,
        challenges: IChallengeResponder | None = None,
        lookup: Lookup | None = None,
        gate: OnDemandGate | None = None,
        directories: Directories = Directories(),
        policy: RetryPolicy = RetryPolicy(),
        static_poll_interval: float = 5.0,
        cluster: Any = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.orders = orders
        self.logger = logger
        self.challenges = challenges if challenges is not None else ChallengeStore()
        self.lookup: Lookup = lookup if lookup is not None else self._lookup_deployed
        self.gate = gate
        self.directories = directories
        self.policy = policy
        self.static_poll_interval = static_poll_interval
        self.cluster = cluster
        self.static = StaticCertificates(logger)
        self._services: dict[str, Any] = {}
        self._hosts: dict[Key, HostCertificate] = {}
        self._on_demand_hosts: dict[str, set[str]] = {}
        # who got the certificates other nodes announced: (not_after, node)
        self._issuers: dict[Key, tuple[float, str]] = {}
        self.start_hooks: list[Callable[[], Any]] = []
        self.stop_hooks: list[Callable[[], Any]] = []

    # -- IService -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.static.start_polling(self.clock, self.static_poll_interval)
        for host in list(self._hosts.values()):
            host.start()
        for hook in self.start_hooks:
            hook()

    def stopService(self) -> Any:
        from twisted.internet.defer import gatherResults, maybeDeferred

        super().stopService()
        self.static.stop_polling()
        for host in self._hosts.values():
            host.stop()
        self.orders.cancel()
        hooks = [maybeDeferred(hook) for hook in self.stop_hooks]
        return gatherResults(hooks).addCallback(lambda _: None)

    # -- deploy integration -------------------------------------------------

    validate = staticmethod(validate_tls_options)

    def update_service(self, name: str, options: Any) -> None:
        """
        Record a deployed (or restored) service's options and start whatever
        certificate work they need.  Never raises.
        """
        self._services[name] = options
        self.static.update(name, options)
        if not _is_on_demand(options):
            self._on_demand_hosts.pop(name, None)
        self._reconcile()

    def remove_service(self, name: str) -> None:
        self._services.pop(name, None)
        self.static.remove(name)
        self._on_demand_hosts.pop(name, None)
        self._reconcile()

    # -- status -------------------------------------------------------------

    def status(self) -> dict[str, str]:
        """
        Host -> one-line certificate status for every TLS host with a
        certificate managed here, as L{mproxy.controller.Certificates} wants.
        """
        return {row.host: row.describe() for row in self.host_status() if row.host}

    def host_status(self) -> list[HostStatus]:
        """
        The detailed rows behind L{status}, sorted by service and host.
        """
        rows = []
        for name, options in self._services.items():
            if options.tls_enabled and name in self.static:
                rows.extend(self.static.rows(name, options.hosts))
        rows.extend(cluster_row(host, self.cluster) for host in self._hosts.values())
        return sorted(rows, key=lambda r: (r.service, r.host))

    def adopt(self, directory: str, name: str, certificate: CertifiedKey) -> None:
        """
        Another cluster node stored a new certificate for C{name}: serve it
        for new handshakes (open connections keep theirs) and renew from it.
        """
        if certificate.issued_by:
            self._issuers[(directory, name)] = (certificate.not_after, certificate.issued_by)
        host = self._hosts.get((directory, name))
        if host is not None and host.adopt(certificate):
            self.logger.info(
                f"Certificate for {name} from {certificate.issued_by or 'the cluster store'}",
                host=name,
                node=certificate.issued_by,
            )

    # -- handshake-time selection (reactor thread) ----------------------------

    def select(self, server_name: str | None) -> CertifiedKey | None:
        """
        The certificate for a TLS handshake, or L{None} to refuse it.
        C{server_name} is lower-case without trailing dot, None without SNI.
        """
        if server_name is None:
            return self._default_certificate()
        found = self.lookup(server_name)
        if found is None:
            return None
        service, options = found
        if not options.tls_enabled:
            return None
        static = self.static.get(service)
        if static is not None:
            return static.certificate
        if options.tls_certificate_path:
            return None
        host = self._hosts.get((self.directories.for_options(options), server_name))
        if host is not None:
            return host.certificate
        if options.tls_on_demand_url:
            return self._on_demand(service, options, server_name)
        return None

    def _default_certificate(self) -> CertifiedKey | None:
        """
        Without SNI: the first TLS root service's (by name) first host's.
        """
        for name in sorted(self._services):
            options = self._services[name]
            if not options.tls_enabled or options.tls_on_demand_url or not _is_root(options):
                continue
            if not options.hosts or not options.hosts[0]:
                continue
            static = self.static.get(name)
            if static is not None:
                return static.certificate
            host = self._hosts.get((self.directories.for_options(options), options.hosts[0]))
            return host.certificate if host is not None else None
        return None

    def _lookup_deployed(self, server_name: str) -> tuple[str, Any] | None:
        return match_service(self._services, server_name)

    def reload_static(self) -> None:
        """
        Reload every custom certificate now (SIGHUP).
        """
        self.static.reload()

    # -- which hosts get ACME certificates ------------------------------------

    def _reconcile(self) -> None:
        wanted = wanted_hosts(self._services, self._on_demand_hosts, self.directories)
        for key in list(self._hosts):
            if key not in wanted or wanted[key][0] != self._hosts[key].service:
                self._drop(key)
        for key, (service, on_demand) in wanted.items():
            if key not in self._hosts:
                self._track(key, service, on_demand)

    def _drop(self, key: Key) -> None:
        host = self._hosts.pop(key)
        host.drop()
        self.logger.info(f"No longer managing a certificate for {host.name}", host=host.name)

    def _track(
        self,
        key: Key,
        service: str,
        on_demand: bool,
        certificate: CertifiedKey | None = None,
        first_attempt: float | None = None,
    ) -> HostCertificate:
        directory, name = key
        refused = None
        if not valid_host_name(name):
            refused = "not a name a public CA can issue for"
        elif certificate is None:
            certificate = self.store.for_directory(directory).load_certificate(name)
        if certificate is not None and certificate.issued_by is None:
            known = self._issuers.get(key)
            if known is not None and known[0] == certificate.not_after:
                certificate.issued_by = known[1]
        host = HostCertificate(
            self.clock, self.policy, self.orders.order, self.logger,
            directory, name, service, on_demand, certificate, refused,
        )  # fmt: skip
        self._hosts[key] = host
        if self.running:
            host.start(first_attempt)
        return host

    # -- on-demand ----------------------------------------------------------

    def _on_demand(self, service: str, options: Any, name: str) -> CertifiedKey | None:
        if not valid_host_name(name) or (self.gate is not None and self.gate.denied(service, name)):
            return None
        key = (self.directories.for_options(options), name)
        cached = self.store.for_directory(key[0]).load_certificate(name)
        if cached is not None:
            self._on_demand_hosts.setdefault(service, set()).add(name)
            self._track(key, service, True, certificate=cached)
            return cached
        if self.gate is None:
            return None
        self.gate.ask(service, options.tls_on_demand_url, name, self._on_demand_approved)
        return None

    def _on_demand_approved(self, service: str, name: str) -> None:
        current = self._services.get(service)
        if current is None or not _is_on_demand(current) or self.gate is None:
            return
        key = (self.directories.for_options(current), name)
        if key in self._hosts:
            return
        self._on_demand_hosts.setdefault(service, set()).add(name)
        self.logger.info(f"TLS on-demand check approved {name}", host=name)
        self._track(key, service, True, first_attempt=self.gate.reserve())
