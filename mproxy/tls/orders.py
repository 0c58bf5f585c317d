# -*- test-case-name: tests.test_tls_service -*-
"""
L{OrderRunner}: runs ACME orders off the reactor thread, one at a time per
ACME directory (= account), and stores what they bring back.

    runner = OrderRunner(store, issuer_factory, run_in_thread)
    d = runner.order(directory_url, host, challenge_type, on_demand=False)
        # -> Deferred[CertifiedKey]
    runner.cancel()        # tell every issuer to give up (service stopping)
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock

from mproxy.tls.certs import CertifiedKey
from mproxy.tls.interfaces import ICertificateStore, IIssuer, IOrderGuard

__all__ = ["OrderRunner", "IssuerFactory", "RunInThread"]

IssuerFactory = Callable[[str], IIssuer]
RunInThread = Callable[[Callable[[], Any]], Deferred]


class OrderRunner:
    """
    @param store: where issued certificates are saved (from the worker
        thread, before the Deferred fires).
    @param issuer_factory: C{directory_url -> IIssuer}, called once per
        directory.
    @param run_in_thread: C{job -> Deferred}: runs a blocking job off the
        reactor thread.
    @param guard: decides, in the worker thread, whether an order happens
        (a cluster's lock); None: always.
    """

    def __init__(
        self,
        store: ICertificateStore,
        issuer_factory: IssuerFactory,
        run_in_thread: RunInThread,
        guard: IOrderGuard | None = None,
    ) -> None:
        self.store = store
        self.guard = guard
        self.issuer_factory = issuer_factory
        self.run_in_thread = run_in_thread
        self._issuers: dict[str, IIssuer] = {}
        self._locks: dict[str, DeferredLock] = {}

    def issuer(self, directory: str) -> IIssuer:
        issuer = self._issuers.get(directory)
        if issuer is None:
            issuer = self._issuers[directory] = self.issuer_factory(directory)
        return issuer

    def order(self, directory: str, host: str, challenge_type: str, on_demand: bool = False) -> Deferred:
        """
        Order and store a certificate for C{host} (through the guard, if
        any); fires with the L{CertifiedKey} or fails with the error.
        """
        issuer = self.issuer(directory)
        dstore = self.store.for_directory(directory)

        def issue() -> CertifiedKey:
            key_pem, chain_pem = issuer.issue(host, challenge_type)
            return dstore.save_certificate(host, key_pem, chain_pem)  # type: ignore[no-any-return]

        def job() -> CertifiedKey:
            if self.guard is None:
                return issue()
            return self.guard.run(directory, host, on_demand, issue)  # type: ignore[no-any-return]

        lock = self._locks.setdefault(directory, DeferredLock())
        return lock.run(self.run_in_thread, job)

    def cancel(self) -> None:
        """
        Make orders in progress give up; later orders get new issuers.
        """
        issuers, self._issuers = self._issuers, {}
        for issuer in issuers.values():
            issuer.cancel()
