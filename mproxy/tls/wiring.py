# -*- test-case-name: tests.test_tls_wiring -*-
"""
Glue between L{mproxy.tls} and the rest of mproxy, for C{tap.py}: the
production L{CertificateService} (a one-thread pool for ACME orders,
L{AcmeIssuer}s, the treq-based on-demand policy) and the HTTPS factory.

    certs = build_certificate_service(reactor, config, router, logger, local_get=None)
    certs.setName("certs"); certs.setServiceParent(top)     # before the listeners
    controller = Controller(..., certificates=certs)

    # plain HTTP front, first thing for every request:
    body = certs.challenges.http01_response(path_bytes_without_query)
    if body is not None: answer 200 text/plain with body (no redirect, no routing)

    # HTTPS listener:
    factory = https_server_factory(certs, https_site)
    TCP4ServerEndpoint(reactor, config.https_port, interface=...).listen(factory)

    # SIGHUP reloads custom certificates:
    install_sighup_reload(reactor, certs.reload_static)
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mproxy.tls.interfaces import IIssuer
from mproxy.tls.issuing import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, IssueError
from mproxy.tls.backoff import RetryPolicy
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.clusterstore import ClusterCertificateStore, ClusterChallenges, ClusterGuard, ClusterPolicy
from mproxy.tls.listener import ClusterListener
from mproxy.tls.gate import OnDemandGate
from mproxy.tls.ondemand import OnDemandChecker
from mproxy.tls.orders import OrderRunner
from mproxy.tls.service import CertificateService, Directories, Lookup
from mproxy.tls.sni import ServerTLS, https_factory
from mproxy.tls.static import install_sighup_reload
from mproxy.tls.store import CertificateStore

__all__ = [
    "router_lookup",
    "directories_for",
    "certificate_service",
    "build_certificate_service",
    "https_server_factory",
    "install_sighup_reload",
]


def router_lookup(router: Any) -> Lookup:
    """
    C{server_name -> (service_name, ServiceOptions) | None} from
    L{mproxy.router.Router.root_service_for} (the service serving C{/} for
    that name, with the router's exact / wildcard / default precedence).
    """

    def lookup(server_name: str) -> tuple[str, Any] | None:
        service = router.root_service_for(server_name)
        if service is None:
            return None
        return service.name, service.options

    return lookup


def directories_for(directory_url: str | None) -> Directories:
    """
    C{--tls-staging} means Let's Encrypt staging when the directory is Let's
    Encrypt production; with any other directory (a private CA, a test
    server) there is no separate staging server and the same one is used.
    """
    url = directory_url or LETS_ENCRYPT
    return Directories(url, LETS_ENCRYPT_STAGING if url == LETS_ENCRYPT else url)


@implementer(IIssuer)
class LazyIssuer:
    """
    An issuer made by C{make} at its first order, in the thread the order
    runs in: the ACME client (C{acme}, C{josepy}, C{requests}) is a large
    share of a server's start-up to import, and most servers order nothing
    for a while, if ever.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._issuer: Any = None
        self._making = threading.Lock()
        self._cancelled = False

    def issue(self, host: str, challenge_type: str) -> tuple[bytes, bytes]:
        with self._making:
            if self._issuer is None:
                if self._cancelled:
                    raise IssueError("stopped")
                self._issuer = self._make()
                if self._cancelled:  # cancelled while it was made
                    self._issuer.cancel()
        return self._issuer.issue(host, challenge_type)  # type: ignore[no-any-return]

    def cancel(self) -> None:
        self._cancelled = True
        issuer = self._issuer
        if issuer is not None:
            issuer.cancel()


def _worker_thread(
    reactor: Any, name: str = "mproxy-acme", threads: int = 1
) -> tuple[Callable[[Callable[[], Any]], Deferred], Callable[[], Deferred]]:
    """
    C{(run_in_thread, stop)}: worker threads (for ACME orders: one), created
    on first use; C{stop} joins them off the reactor thread.
    """
    from twisted.internet.threads import deferToThread, deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    pools: list[ThreadPool] = []

    def run_in_thread(job: Callable[[], Any]) -> Deferred:
        if not pools:
            pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
            pool.start()
            pools.append(pool)
        return deferToThreadPool(reactor, pools[0], job)

    def stop() -> Deferred:
        if not pools:
            return succeed(None)
        # joining may wait for an order in progress; keep the reactor free
        return deferToThread(pools.pop().stop)

    return run_in_thread, stop


def certificate_service(
    reactor: Any,
    state_dir: Any,
    logger: Any,
    directory_url: str | None = None,
    email: str | None = None,
    ca_bundle: str | None = None,
    lookup: Lookup | None = None,
    local_get: Callable[[str, str, str], Deferred] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    issuer_factory: Callable[[str, Any, Any], Any] | None = None,
    cluster: Any = None,
    challenges: ChallengeStore | None = None,
) -> CertificateService:
    """
    The real thing on the state directory's C{certs/}; C{challenges} is the
    store pending ACME challenges are kept in (default: a new
    L{ChallengeStore}); C{issuer_factory}
    (default: L{AcmeIssuer} with C{email} and C{ca_bundle}) is called with
    the directory URL, the store and the challenges.  With a
    L{RedisCluster}, certificates, challenges, locks and on-demand decisions
    are shared through it (L{cluster_parts}).
    """
    from mproxy.tls.ondemand import treq_http_get

    local_store = CertificateStore(state_dir)
    local_challenges = challenges if challenges is not None else ChallengeStore()
    store: Any = local_store
    challenges: Any = local_challenges
    guard = None
    checker: Any = OnDemandChecker(reactor, http_get=treq_http_get(reactor), local_get=local_get)
    if cluster is not None:
        store, challenges, guard, checker, hooks = cluster_parts(
            reactor, cluster, local_store, local_challenges, checker, policy
        )

    def acme_issuer(url: str) -> Any:
        if issuer_factory is not None:
            return issuer_factory(url, store.for_directory(url), challenges)

        def make() -> Any:
            from mproxy.tls.acme import AcmeIssuer

            return AcmeIssuer(url, store.for_directory(url), challenges, email=email,
                              ca_bundle=ca_bundle)

        return LazyIssuer(make)

    run_in_thread, stop_thread = _worker_thread(reactor)
    orders = OrderRunner(store, acme_issuer, run_in_thread, guard)
    service = CertificateService(
        reactor,
        store,
        orders,
        logger,
        challenges=challenges,
        lookup=lookup,
        gate=OnDemandGate(reactor, checker, logger),
        directories=directories_for(directory_url),
        policy=policy,
        cluster=cluster,
    )
    service.stop_hooks.append(stop_thread)
    if cluster is not None:
        listener = ClusterListener(reactor, cluster, local_store, local_challenges, service.adopt, logger)
        service.start_hooks.append(listener.start)
        service.stop_hooks.append(lambda: deferToThread(listener.stop))
        service.stop_hooks.extend(hooks)
    return service


def cluster_parts(
    reactor: Any, cluster: Any, local_store: Any, local_challenges: Any, checker: Any, policy: RetryPolicy
) -> tuple[Any, Any, Any, Any, list[Callable[[], Any]]]:
    """
    The shared store, challenges, order guard and on-demand policy over the
    local ones, and the stop hooks of the thread pool they use.
    """
    run_cluster, stop_cluster = _worker_thread(reactor, "mproxy-cluster", 2)
    return (
        ClusterCertificateStore(local_store, cluster),
        ClusterChallenges(local_challenges, cluster),
        ClusterGuard(cluster, local_store, policy.renew_at, policy.delay),
        ClusterPolicy(checker, cluster, run_cluster),
        [stop_cluster],
    )


def build_certificate_service(
    reactor: Any,
    config: Any,
    router: Any,
    logger: Any,
    local_get: Callable[[str, str, str], Deferred] | None = None,
    challenges: ChallengeStore | None = None,
) -> CertificateService:
    """
    The production L{CertificateService} from a L{mproxy.config.ServerConfig}
    (C{state_dir}, C{acme_directory}, C{acme_email}, C{acme_ca_bundle},
    C{cluster}, C{cluster_ca_bundle}, C{cluster_node}); C{challenges} as
    for L{certificate_service}.
    """
    cluster = None
    if config.cluster:
        import socket

        from mproxy.tls.redisstore import RedisCluster

        node = config.cluster_node or socket.gethostname()
        cluster = RedisCluster(config.cluster, node, ca_bundle=config.cluster_ca_bundle or None)
    return certificate_service(
        reactor,
        config.state_dir,
        logger,
        directory_url=config.acme_directory or None,
        email=config.acme_email or None,
        ca_bundle=config.acme_ca_bundle or None,
        lookup=router_lookup(router),
        local_get=local_get,
        cluster=cluster,
        challenges=challenges,
    )


def https_server_factory(
    certs: CertificateService,
    site: Any,
    protocol_for_alpn: Callable[[bytes | None, Any], Any] | None = None,
) -> TLSMemoryBIOFactory:
    """
    The HTTPS port's factory: certificates chosen by C{certs.select} per SNI,
    TLS-ALPN-01 answered from C{certs.challenges}, then C{site}'s protocol
    (or C{protocol_for_alpn(negotiated, addr)}).
    """
    tls = ServerTLS(certs.select, certs.challenges, logger=certs.logger)
    return https_factory(tls, site, protocol_for_alpn)
