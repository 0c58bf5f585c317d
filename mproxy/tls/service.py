# -*- test-case-name: tests.test_tls_service -*-
"""
L{CertificateService}: which certificate each TLS handshake gets, and the
background work of obtaining and renewing ACME certificates.

Wiring (tap.py)::

    certs = CertificateService.create(
        reactor, state_dir,
        directory_url=config.acme_directory,      # default LETS_ENCRYPT
        email=config.acme_email, ca_bundle=config.acme_ca_bundle,
        lookup=lookup,              # server_name -> (service_name, ServiceOptions) | None
        local_get=local_get)        # optional, for on-demand URLs that are paths
    certs.setName("certs"); certs.setServiceParent(top)

    http:   certs.challenges.http01_response(request.path) before redirects/routing
            (or wrap the root: ACMEChallengeResource(certs.challenges, root))
    https:  StreamServerEndpointService(TCP4ServerEndpoint(reactor, https_port,
                interface=bind), https_factory(ServerTLS(certs.select,
                certs.challenges), site))
    SIGHUP: install_sighup_reload(reactor, certs.reload_static)

Deploy integration::

    certs.validate(options)           # before switching; raises CertificateError
                                      # ("unable to load certificate: ..." or
                                      # "automatic TLS does not support wildcards")
    certs.update_service(name, options)   # after the switch (and on state restore)
    certs.remove_service(name)
    certs.status()                    # -> {host: "valid until 2026-...Z" | "pending (error)"
                                      #     | "failed (error)"}
    certs.host_status()               # -> list[HostStatus] (service, host, state,
                                      #     not_after, error, next_attempt)
    certs.service_status(name)        # -> str for the TLS column of `mproxy list`

Rules:
  - ACME is used for a service with TLS on and no certificate paths; every
    listed host gets a certificate, issuance starts at once in the background
    and never fails a deploy.  Orders run in a worker thread, one at a time
    per ACME directory (= account).
  - Failed orders are retried with exponential backoff (C{retry_initial}
    doubling up to C{retry_max}), never sooner than the CA's Retry-After; a
    rateLimited error without Retry-After waits C{rate_limit_wait}.  The
    challenge type alternates between attempts (http-01, tls-alpn-01, ...);
    when a challenge fails validation and the next type has not been tried
    since, the next order starts at once (port 80 firewalled: a certificate
    through TLS-ALPN-01 in seconds, not after the first backoff).
  - Renewal starts when a third of the lifetime is left.
  - Hosts no longer deployed are forgotten: no renewal, no retries.
  - A host's status is C{valid} (until X), C{pending} (with the last error) or
    C{failed} (after C{failed_after} consecutive failures, or an error the CA
    calls permanent; retries continue at the backoff cap).
  - On-demand services: an unknown SNI name triggers the policy check; a
    name with a certificate in the store is approved without asking;
    approvals and denials are cached; new on-demand orders are limited to
    C{on_demand_rate} per C{on_demand_window} seconds; at most
    C{on_demand_max_checks} policy requests are in flight at once.
  - Custom certificates are polled for changes every C{static_poll_interval}
    seconds on the clock, and reloaded by C{reload_static()}.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mproxy.errors import CertificateError
from mproxy.tls.acme import HTTP_01, LETS_ENCRYPT, LETS_ENCRYPT_STAGING, TLS_ALPN_01, IssueError
from mproxy.tls.certs import CertifiedKey, format_time
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.ondemand import OnDemandChecker, OnDemandDenied
from mproxy.tls.static import StaticCertificate, load_static
from mproxy.tls.store import CertificateStore, valid_host_name

__all__ = ["CertificateService", "HostStatus"]

log = Logger()

Lookup = Callable[[str], "tuple[str, Any] | None"]


@define(frozen=True)
class HostStatus:
    """
    One row of certificate status.

    @ivar state: C{"valid"}, C{"pending"}, C{"failed"} or C{"static"}.
    @ivar not_after: expiry (POSIX time) of the certificate in use, if any.
    @ivar error: the last error, if the last attempt failed.
    @ivar next_attempt: when the next order or renewal is scheduled.
    """

    service: str
    host: str
    state: str
    not_after: float | None = None
    error: str | None = None
    next_attempt: float | None = None

    def describe(self) -> str:
        if self.state in ("valid", "static"):
            text = f"valid until {format_time(self.not_after)}" if self.not_after else "valid"
            if self.error:
                text += f" (renewal failing: {self.error})"
            return text
        if self.error:
            return f"{self.state} ({self.error})"
        return self.state


@define(eq=False)
class _Host:
    directory: str
    name: str
    service: str
    on_demand: bool = False
    certificate: CertifiedKey | None = None
    error: str | None = None
    failures: int = 0
    permanent: bool = False
    call: Any = None
    next_attempt: float | None = None
    running: bool = False
    dropped: bool = False


def _is_acme(options: Any) -> bool:
    return bool(
        options.tls_enabled and not options.tls_certificate_path and not options.tls_on_demand_url
    )


class CertificateService(Service):
    """
    See the module docstring.

    @param clock: L{IReactorTime} for every timer.
    @param store: the L{CertificateStore} under the state directory.
    @param issuer_factory: C{directory_url -> issuer}; C{issuer.issue(host,
        challenge_type) -> (key_pem, chain_pem)} is blocking and raises
        L{IssueError}.
    @param run_in_thread: C{job -> Deferred}: runs a blocking job off the
        reactor thread.
    @param lookup: C{server_name -> (service_name, ServiceOptions) | None},
        the router's answer for path C{/}; the default matches the services
        given to L{update_service} (exact, then C{*.} wildcard, then default).
    """

    def __init__(
        self,
        clock: Any,
        store: CertificateStore,
        issuer_factory: Callable[[str], Any],
        run_in_thread: Callable[[Callable[[], Any]], Deferred],
        challenges: ChallengeStore | None = None,
        lookup: Lookup | None = None,
        on_demand: OnDemandChecker | None = None,
        directory_url: str = LETS_ENCRYPT,
        staging_directory_url: str = LETS_ENCRYPT_STAGING,
        challenge_types: Iterable[str] = (HTTP_01, TLS_ALPN_01),
        retry_initial: float = 60.0,
        retry_max: float = 6 * 3600.0,
        rate_limit_wait: float = 3600.0,
        failed_after: int = 5,
        renew_fraction: float = 1 / 3,
        static_poll_interval: float = 5.0,
        on_demand_rate: int = 10,
        on_demand_window: float = 3600.0,
        on_demand_deny_ttl: float = 60.0,
        on_demand_max_checks: int = 16,
        static_loader: Callable[[str, str], StaticCertificate] = StaticCertificate,
    ) -> None:
        self.clock = clock
        self.store = store
        self.issuer_factory = issuer_factory
        self.run_in_thread = run_in_thread
        self.challenges = challenges if challenges is not None else ChallengeStore()
        self.lookup: Lookup = lookup if lookup is not None else self._default_lookup
        self.on_demand = on_demand
        self.directory_url = directory_url or LETS_ENCRYPT
        self.staging_directory_url = staging_directory_url
        self.challenge_types = tuple(challenge_types)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.rate_limit_wait = rate_limit_wait
        self.failed_after = failed_after
        self.renew_fraction = renew_fraction
        self.static_poll_interval = static_poll_interval
        self.on_demand_rate = on_demand_rate
        self.on_demand_window = on_demand_window
        self.on_demand_deny_ttl = on_demand_deny_ttl
        self.on_demand_max_checks = on_demand_max_checks
        self.static_loader = static_loader

        self._services: dict[str, Any] = {}
        self._static: dict[str, StaticCertificate] = {}
        self._hosts: dict[tuple[str, str], _Host] = {}
        self._issuers: dict[str, Any] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._on_demand_hosts: dict[str, set[str]] = {}
        self._on_demand_checks: set[tuple[str, str]] = set()
        self._on_demand_denied: dict[tuple[str, str], float] = {}
        self._on_demand_orders: deque[float] = deque()
        self._poll: LoopingCall | None = None
        self._stop_hooks: list[Callable[[], Any]] = []

    # -- construction for production ---------------------------------------

    @classmethod
    def create(
        cls,
        reactor: Any,
        state_dir: Any,
        directory_url: str = LETS_ENCRYPT,
        email: str | None = None,
        ca_bundle: str | None = None,
        lookup: Lookup | None = None,
        local_get: Callable[[str, str, str], Deferred] | None = None,
        staging_directory_url: str | None = None,
        **kwargs: Any,
    ) -> "CertificateService":
        """
        The real thing: a one-thread pool for ACME calls (created on first
        use, stopped with the service), L{AcmeIssuer}s and a treq-based
        on-demand checker.

        C{--tls-staging} means Let's Encrypt staging when the directory is
        Let's Encrypt production; with any other directory (a private CA, a
        test server) there is no separate staging server and the same
        directory is used.
        """
        directory_url = directory_url or LETS_ENCRYPT
        if staging_directory_url is None:
            staging_directory_url = (
                LETS_ENCRYPT_STAGING if directory_url == LETS_ENCRYPT else directory_url
            )
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        from mproxy.tls.acme import AcmeIssuer
        from mproxy.tls.ondemand import treq_http_get

        store = CertificateStore(state_dir)
        challenges = ChallengeStore()
        pools: list[ThreadPool] = []

        def issuer_factory(url: str) -> AcmeIssuer:
            return AcmeIssuer(url, store.for_directory(url), challenges, email=email, ca_bundle=ca_bundle)

        def run_in_thread(job: Callable[[], Any]) -> Deferred:
            if not pools:
                pool = ThreadPool(minthreads=0, maxthreads=1, name="mproxy-acme")
                pool.start()
                pools.append(pool)
            return deferToThreadPool(reactor, pools[0], job)

        def stop_pool() -> Deferred:
            from twisted.internet.threads import deferToThread

            if not pools:
                return succeed(None)
            # joining may wait for an order in progress; keep the reactor free
            return deferToThread(pools.pop().stop)

        checker = OnDemandChecker(reactor, http_get=treq_http_get(reactor), local_get=local_get)
        service = cls(
            reactor,
            store,
            issuer_factory,
            run_in_thread,
            challenges=challenges,
            lookup=lookup,
            on_demand=checker,
            directory_url=directory_url or LETS_ENCRYPT,
            staging_directory_url=staging_directory_url,
            **kwargs,
        )
        service._stop_hooks.append(stop_pool)
        return service

    # -- IService -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._poll = LoopingCall(self.check_static)
        self._poll.clock = self.clock
        self._poll.start(self.static_poll_interval, now=False)
        for host in list(self._hosts.values()):
            if host.call is None and not host.running:
                self._schedule_initial(host)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        for host in self._hosts.values():
            if host.call is not None and host.call.active():
                host.call.cancel()
            host.call = None
        from twisted.internet.defer import gatherResults

        issuers, self._issuers = self._issuers, {}
        for issuer in issuers.values():
            cancel = getattr(issuer, "cancel", None)
            if cancel is not None:
                cancel()
        return gatherResults([maybeDeferred(hook) for hook in self._stop_hooks]).addCallback(
            lambda _: None
        )

    # -- deploy integration -------------------------------------------------

    def directory_for(self, options: Any) -> str:
        return self.staging_directory_url if options.tls_staging else self.directory_url

    def validate(self, options: Any) -> None:
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

    validate_static = validate

    def update_service(self, name: str, options: Any) -> None:
        """
        Record a deployed (or restored) service's options and start whatever
        certificate work they need.  Never raises: custom certificate files
        that cannot be loaded (validate() catches that at deploy time; on
        state restore they may have vanished) leave the service without a
        certificate, reported as failed, until the files are fixed.
        """
        self._services[name] = options
        if options.tls_enabled and options.tls_certificate_path:
            current = self._static.get(name)
            paths = (options.tls_certificate_path, options.tls_private_key_path)
            if current is not None and current.paths == paths:
                current.reload()  # a redeploy picks up replaced files at once
            else:
                try:
                    self._static[name] = self.static_loader(*paths)
                except CertificateError as e:
                    # validate() refuses this at deploy time; here we are
                    # restoring state or the files vanished meanwhile: keep
                    # the service, refuse its handshakes, load when fixed.
                    log.error(
                        "Custom certificate for {service} not loaded: {error}",
                        service=name,
                        error=str(e),
                    )
                    self._static[name] = StaticCertificate(*paths, strict=False)
        else:
            self._static.pop(name, None)
        if not (options.tls_enabled and options.tls_on_demand_url):
            self._on_demand_hosts.pop(name, None)
        self._reconcile()

    def remove_service(self, name: str) -> None:
        self._services.pop(name, None)
        self._static.pop(name, None)
        self._on_demand_hosts.pop(name, None)
        self._reconcile()

    # -- status -------------------------------------------------------------

    def status(self) -> dict[str, str]:
        """
        Host -> one-line certificate status (C{valid until X}, C{pending
        (last error)}, C{failed (error)}) for every TLS host with a
        certificate managed here, as L{mproxy.controller.Certificates} wants.
        """
        return {row.host: row.describe() for row in self.host_status() if row.host}

    def host_status(self) -> list[HostStatus]:
        """
        The detailed rows behind L{status}, sorted by service and host.
        """
        rows = []
        for name, options in self._services.items():
            if not options.tls_enabled:
                continue
            static = self._static.get(name)
            if static is not None:
                for h in options.hosts:
                    if static.certificate is None:
                        rows.append(HostStatus(name, h, "failed", None, static.last_error))
                    else:
                        rows.append(
                            HostStatus(
                                name, h, "static", static.certificate.not_after, static.last_error
                            )
                        )
                continue
        for host in self._hosts.values():
            rows.append(self._host_status(host))
        return sorted(rows, key=lambda r: (r.service, r.host))

    def _host_status(self, host: _Host) -> HostStatus:
        if host.certificate is not None:
            state = "valid"
        elif host.permanent or host.failures >= self.failed_after:
            state = "failed"
        else:
            state = "pending"
        return HostStatus(
            host.service,
            host.name,
            state,
            host.certificate.not_after if host.certificate else None,
            host.error,
            host.next_attempt,
        )

    def service_status(self, name: str) -> str:
        """
        A one-line summary for C{mproxy list}: C{""} without TLS.
        """
        options = self._services.get(name)
        if options is None or not options.tls_enabled:
            return ""
        rows = [r for r in self.host_status() if r.service == name]
        if name in self._static:
            return rows[0].describe() if rows else "static"
        if options.tls_on_demand_url and not rows:
            return "on demand"
        return "; ".join(f"{r.host}: {r.describe()}" for r in rows)

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
        static = self._static.get(service)
        if static is not None:
            return static.certificate
        if options.tls_certificate_path:
            return None
        directory = self.directory_for(options)
        host = self._hosts.get((directory, server_name))
        if host is not None:
            return host.certificate
        if options.tls_on_demand_url:
            return self._on_demand(service, options, server_name)
        return None

    def _default_certificate(self) -> CertifiedKey | None:
        for name in sorted(self._services):
            options = self._services[name]
            if not options.tls_enabled or options.tls_on_demand_url:
                continue
            if "/" not in getattr(options, "path_prefixes", ("/",)):
                continue
            if not options.hosts or not options.hosts[0]:
                continue
            static = self._static.get(name)
            if static is not None:
                return static.certificate
            host = self._hosts.get((self.directory_for(options), options.hosts[0]))
            return host.certificate if host is not None else None
        return None

    def _default_lookup(self, server_name: str) -> tuple[str, Any] | None:
        best: tuple[int, str, Any] | None = None
        for name, options in self._services.items():
            if "/" not in getattr(options, "path_prefixes", ("/",)):
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

    # -- static certificates ---------------------------------------------------

    def check_static(self) -> None:
        """
        Reload custom certificates whose files changed (run on a timer).
        """
        for static in list(self._static.values()):
            static.check()

    def reload_static(self) -> None:
        """
        Reload every custom certificate now (SIGHUP).
        """
        for static in list(self._static.values()):
            static.reload()

    # -- ACME bookkeeping ------------------------------------------------------

    def _wanted(self) -> dict[tuple[str, str], tuple[str, bool]]:
        wanted: dict[tuple[str, str], tuple[str, bool]] = {}
        for name in sorted(self._services):
            options = self._services[name]
            if "/" not in getattr(options, "path_prefixes", ("/",)):
                # path services inherit TLS from their host's root service,
                # which owns the certificates (reference 2.5)
                continue
            if _is_acme(options):
                d = self.directory_for(options)
                for h in options.hosts:
                    if h and "*" not in h:
                        wanted.setdefault((d, h), (name, False))
            elif options.tls_enabled and options.tls_on_demand_url:
                d = self.directory_for(options)
                for h in self._on_demand_hosts.get(name, ()):
                    wanted.setdefault((d, h), (name, True))
        return wanted

    def _reconcile(self) -> None:
        wanted = self._wanted()
        for key in list(self._hosts):
            host = self._hosts[key]
            if key not in wanted or wanted[key][0] != host.service:
                self._drop(key)
        for key, (service, on_demand) in wanted.items():
            if key not in self._hosts:
                self._track(key, service, on_demand)

    def _drop(self, key: tuple[str, str]) -> None:
        host = self._hosts.pop(key)
        host.dropped = True
        if host.call is not None and host.call.active():
            host.call.cancel()
        host.call = None
        log.info("No longer managing a certificate for {host}", host=host.name)

    def _track(
        self,
        key: tuple[str, str],
        service: str,
        on_demand: bool,
        certificate: CertifiedKey | None = None,
        first_attempt: float | None = None,
    ) -> _Host:
        directory, name = key
        host = _Host(directory, name, service, on_demand)
        if certificate is None and valid_host_name(name):
            certificate = self.store.for_directory(directory).load_certificate(name)
        host.certificate = certificate
        self._hosts[key] = host
        if not valid_host_name(name):
            host.permanent = True
            host.error = "not a name a public CA can issue for"
            return host
        if self.running:
            self._schedule_initial(host, first_attempt)
        return host

    def _schedule_initial(self, host: _Host, at: float | None = None) -> None:
        now = self.clock.seconds()
        if at is None:
            at = now
            if host.certificate is not None:
                at = max(now, host.certificate.renew_at(self.renew_fraction))
        self._schedule(host, at - now)

    def _schedule(self, host: _Host, delay: float) -> None:
        if host.call is not None and host.call.active():
            host.call.cancel()
        delay = max(0.0, delay)
        host.next_attempt = self.clock.seconds() + delay
        host.call = self.clock.callLater(delay, self._attempt, host)

    def _issuer(self, directory: str) -> Any:
        issuer = self._issuers.get(directory)
        if issuer is None:
            issuer = self._issuers[directory] = self.issuer_factory(directory)
        return issuer

    def _attempt(self, host: _Host) -> Deferred:
        host.call = None
        host.next_attempt = None
        if host.dropped or host.running:
            return succeed(None)
        host.running = True
        challenge_type = self.challenge_types[host.failures % len(self.challenge_types)]
        issuer = self._issuer(host.directory)
        dstore = self.store.for_directory(host.directory)
        name = host.name

        def job() -> CertifiedKey:
            key_pem, chain_pem = issuer.issue(name, challenge_type)
            return dstore.save_certificate(name, key_pem, chain_pem)

        lock = self._locks.setdefault(host.directory, DeferredLock())
        log.info(
            "Requesting a certificate for {host} ({challenge})", host=name, challenge=challenge_type
        )
        d = lock.run(self.run_in_thread, job)
        d.addCallbacks(self._issued, self._failed, callbackArgs=(host,), errbackArgs=(host,))
        return d

    def _issued(self, certificate: CertifiedKey, host: _Host) -> None:
        host.running = False
        if host.dropped:
            return
        host.certificate = certificate
        host.failures = 0
        host.error = None
        host.permanent = False
        log.info(
            "Certificate for {host} valid until {until}",
            host=host.name,
            until=format_time(certificate.not_after),
        )
        if self.running:
            self._schedule(host, certificate.renew_at(self.renew_fraction) - self.clock.seconds())

    def _failed(self, failure: Failure, host: _Host) -> None:
        host.running = False
        if host.dropped:
            return
        error = failure.value
        if not isinstance(error, IssueError):
            if isinstance(error, ValueError):
                error = IssueError(f"the CA sent an unusable certificate: {error}")
            else:
                log.failure("Certificate order for {host} crashed", failure, host=host.name)
                error = IssueError(f"{type(error).__name__}: {error}")
        host.failures += 1
        host.error = str(error)
        host.permanent = error.permanent
        delay = min(self.retry_initial * 2 ** (host.failures - 1), self.retry_max)
        if error.challenge_failed and host.failures % len(self.challenge_types):
            delay = 0.0  # try the next challenge type now
        if error.permanent:
            delay = self.retry_max
        if error.rate_limited and error.retry_after is None:
            delay = max(delay, self.rate_limit_wait)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        log.warn(
            "Certificate order for {host} failed (attempt {n}), retrying in {delay:.0f}s: {error}",
            host=host.name,
            n=host.failures,
            delay=delay,
            error=str(error),
        )
        if self.running:
            self._schedule(host, delay)

    # -- on-demand ----------------------------------------------------------

    def _on_demand(self, service: str, options: Any, name: str) -> CertifiedKey | None:
        if not valid_host_name(name):
            return None
        check = (service, name)
        denied_until = self._on_demand_denied.get(check)
        if denied_until is not None and denied_until > self.clock.seconds():
            return None
        directory = self.directory_for(options)
        key = (directory, name)
        cached = self.store.for_directory(directory).load_certificate(name)
        if cached is not None:
            self._on_demand_hosts.setdefault(service, set()).add(name)
            self._drop_if_other(key, service)
            self._track(key, service, True, certificate=cached)
            return cached
        if check in self._on_demand_checks:
            return None
        if self.on_demand is None:
            return None
        if len(self._on_demand_checks) >= self.on_demand_max_checks:
            # a flood of unknown names (scanners): don't hammer the policy
            # endpoint; these handshakes fail and clients may retry later
            return None
        self._on_demand_checks.add(check)
        d = self.on_demand.check(service, options.tls_on_demand_url, name)
        d.addCallbacks(
            self._on_demand_approved,
            self._on_demand_refused,
            callbackArgs=(service, options, name),
            errbackArgs=(service, name),
        )
        return None

    def _drop_if_other(self, key: tuple[str, str], service: str) -> None:
        host = self._hosts.get(key)
        if host is not None:
            self._drop(key)

    def _on_demand_approved(self, _: Any, service: str, options: Any, name: str) -> None:
        self._on_demand_checks.discard((service, name))
        self._on_demand_denied.pop((service, name), None)
        current = self._services.get(service)
        if current is None or not (current.tls_enabled and current.tls_on_demand_url):
            return
        key = (self.directory_for(current), name)
        if key in self._hosts:
            return
        self._on_demand_hosts.setdefault(service, set()).add(name)
        start = self._reserve_on_demand_slot()
        log.info("TLS on-demand check approved {host}", host=name)
        self._track(key, service, True, first_attempt=start)

    def _on_demand_refused(self, failure: Failure, service: str, name: str) -> None:
        self._on_demand_checks.discard((service, name))
        now = self.clock.seconds()
        if len(self._on_demand_denied) >= 10000:
            for key, until in list(self._on_demand_denied.items()):
                if until <= now:
                    del self._on_demand_denied[key]
        self._on_demand_denied[(service, name)] = now + self.on_demand_deny_ttl
        if failure.check(OnDemandDenied):
            log.warn("TLS on-demand check denied host {host}: {error}", host=name, error=str(failure.value))
        else:
            log.failure("TLS on-demand check for {host} crashed", failure, host=name)

    def _reserve_on_demand_slot(self) -> float:
        now = self.clock.seconds()
        orders = self._on_demand_orders
        while orders and orders[0] <= now - self.on_demand_window:
            orders.popleft()
        if len(orders) < self.on_demand_rate:
            at = now
        else:
            at = orders[len(orders) - self.on_demand_rate] + self.on_demand_window
        orders.append(at)
        return at
