# -*- test-case-name: tests.test_tls_cluster -*-
"""
The cluster's side of each L{mproxy.tls.interfaces} contract, layered on the
local implementations and a L{RedisCluster}:

  - L{ClusterCertificateStore}: reads are local (the handshake path never
    waits on Redis); a new certificate is saved locally, then shared and
    announced; the ACME account is shared (first writer wins).
  - L{ClusterChallenges}: a challenge response is published to every node,
    and the order waits (briefly) until they all hold it, so whichever node
    the CA reaches answers.  Answers come from local memory.
  - L{ClusterGuard}: one order per name cluster-wide (a lock with expiry
    that its holder keeps extending while the order runs; a node that dies
    mid-order lets it expire; after a failed order it is held for the
    backoff, counted cluster-wide, so the cluster retries a failing name as
    often as one node would), a current shared certificate instead of a new
    order, and the on-demand order limit counted cluster-wide.
  - L{ClusterPolicy}: on-demand approvals and denials shared by the nodes.

When Redis cannot be reached everything falls back to the local behaviour,
except that no order is placed (L{ClusterGuard} says the store is
unavailable and the host retries soon).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mproxy.tls.issuing import IssueError
from mproxy.tls.certs import CertifiedKey, certified_pem, load_certified_key
from mproxy.tls.interfaces import (
    ICertificateStore,
    IChallengeResponder,
    IDirectoryStore,
    IOnDemandPolicy,
    IOrderGuard,
)
from mproxy.tls.ondemand import OnDemandDenied
from mproxy.tls.redisstore import RedisCluster, StoreUnavailable
from mproxy.tls.store import CertificateStore, DirectoryStore

__all__ = ["ClusterCertificateStore", "ClusterChallenges", "ClusterGuard", "ClusterPolicy", "shared_certificate"]


def shared_certificate(found: dict[str, str] | None) -> CertifiedKey | None:
    """
    The L{CertifiedKey} of a certificate hash from the store, if usable.
    """
    if not found or not found.get("chain") or not found.get("key"):
        return None
    try:
        certified = load_certified_key(found["chain"].encode(), found["key"].encode())
    except ValueError:
        return None
    certified.issued_by = found.get("node") or None
    return certified


@implementer(IDirectoryStore)
class ClusterDirectoryStore:
    def __init__(self, local: DirectoryStore, cluster: RedisCluster) -> None:
        self.local = local
        self.cluster = cluster
        self.directory_url = local.directory_url

    def load_account_key(self) -> bytes | None:
        local = self.local.load_account_key()
        try:
            shared = self.cluster.account_key(self.directory_url, local)
        except StoreUnavailable:
            return local
        if shared is not None and shared != local:
            self.local.save_account_key(shared)
        return shared

    def save_account_key(self, pem: bytes) -> None:
        try:
            pem = self.cluster.account_key(self.directory_url, pem) or pem
        except StoreUnavailable:
            pass
        self.local.save_account_key(pem)

    def load_account(self) -> str | None:
        try:
            shared = self.cluster.account(self.directory_url)
        except StoreUnavailable:
            shared = None
        return shared or self.local.load_account()

    def save_account(self, json_text: str) -> None:
        self.local.save_account(json_text)
        try:
            self.cluster.set_account(self.directory_url, json_text)
        except StoreUnavailable:
            pass

    def forget_account(self) -> None:
        self.local.forget_account()
        try:
            self.cluster.set_account(self.directory_url, None)
        except StoreUnavailable:
            pass

    def load_certificate(self, host: str) -> CertifiedKey | None:
        return self.local.load_certificate(host)

    def save_certificate(self, host: str, key_pem: bytes, chain_pem: bytes) -> CertifiedKey:
        """
        Keep locally, then share and announce (a store that cannot be
        reached gets it when the listener reconnects).
        """
        certified = self.local.save_certificate(host, key_pem, chain_pem)
        certified.issued_by = self.cluster.node
        try:
            self.cluster.put_certificate(
                self.directory_url, host, key_pem, chain_pem, self.cluster.node, certified.not_after
            )
            self.cluster.publish({"kind": "certificate", "directory": self.directory_url, "host": host})
        except StoreUnavailable:
            pass
        return certified

    def hosts(self) -> list[str]:
        return self.local.hosts()


@implementer(ICertificateStore)
class ClusterCertificateStore:
    def __init__(self, local: CertificateStore, cluster: RedisCluster) -> None:
        self.local = local
        self.cluster = cluster

    def for_directory(self, directory_url: str) -> ClusterDirectoryStore:
        return ClusterDirectoryStore(self.local.for_directory(directory_url), self.cluster)


@implementer(IChallengeResponder)
class ClusterChallenges:
    """
    Writers run in the ACME worker thread; readers are the local store's.
    """

    def __init__(self, local: Any, cluster: RedisCluster, ack_timeout: float = 3.0) -> None:
        self.local = local
        self.cluster = cluster
        self.ack_timeout = ack_timeout

    def _share(self, op: str, type_: str, name: str, value: Any = None) -> None:
        message_id = self.cluster.new_id()
        message = {"kind": "challenge", "op": op, "type": type_, "name": name, "value": value, "id": message_id}
        try:
            if op == "add":
                self.cluster.put_challenge(type_, name, value)
            else:
                self.cluster.delete_challenge(type_, name)
            receivers = self.cluster.publish(message)
            if op == "add":
                self.cluster.wait_acks(message_id, receivers, self.ack_timeout)
        except StoreUnavailable:
            pass  # only this node answers; the CA may reach it

    def add_http01(self, token: str, key_authorization: str) -> None:
        self.local.add_http01(token, key_authorization)
        self._share("add", "http-01", token, key_authorization)

    def remove_http01(self, token: str) -> None:
        self.local.remove_http01(token)
        self._share("remove", "http-01", token)

    def add_tls_alpn01(self, domain: str, certificate: CertifiedKey) -> None:
        self.local.add_tls_alpn01(domain, certificate)
        chain, key = certified_pem(certificate)
        self._share("add", "tls-alpn-01", domain.lower(), {"chain": chain.decode(), "key": key.decode()})

    def remove_tls_alpn01(self, domain: str) -> None:
        self.local.remove_tls_alpn01(domain)
        self._share("remove", "tls-alpn-01", domain.lower())

    def key_authorization(self, token: str) -> bytes | None:
        return self.local.key_authorization(token)  # type: ignore[no-any-return]

    def http01_response(self, path: bytes) -> bytes | None:
        return self.local.http01_response(path)  # type: ignore[no-any-return]

    def alpn_certificate(self, server_name: str | None) -> CertifiedKey | None:
        return self.local.alpn_certificate(server_name)  # type: ignore[no-any-return]


def apply_challenge(local: Any, op: str, type_: str, name: str, value: Any) -> None:
    """
    Apply a challenge message from another node to the local responder.
    """
    if type_ == "http-01":
        if op == "add":
            local.add_http01(name, value)
        else:
            local.remove_http01(name)
    elif type_ == "tls-alpn-01":
        if op == "add":
            local.add_tls_alpn01(name, load_certified_key(value["chain"].encode(), value["key"].encode()))
        else:
            local.remove_tls_alpn01(name)


@implementer(IOrderGuard)
class ClusterGuard:
    """
    @param renew_at: C{CertifiedKey -> POSIX time} of its renewal; a shared
        certificate not yet due is used instead of ordering.
    @param local: the local store, for a copy of a shared certificate.
    @param backoff: C{(failures in a row, IssueError) -> seconds} the lock
        stays held after a failed order (L{RetryPolicy.delay}).
    """

    def __init__(
        self,
        cluster: RedisCluster,
        local: CertificateStore,
        renew_at: Callable[[CertifiedKey], float],
        backoff: Callable[[int, IssueError], float] = lambda failures, error: 0.0,
        on_demand_rate: int = 10,
        on_demand_window: float = 3600.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.local = local
        self.renew_at = renew_at
        self.backoff = backoff
        self.on_demand_rate = on_demand_rate
        self.on_demand_window = on_demand_window
        self.now = now

    def run(self, directory_url: str, host: str, on_demand: bool, issue: Callable[[], CertifiedKey]) -> CertifiedKey:
        try:
            holder = self.cluster.acquire(directory_url, host)
            if holder is not None:
                self._held(directory_url, host, holder)
        except StoreUnavailable as e:
            raise IssueError(f"cluster store unreachable ({e})", store_unavailable=True) from None
        done = threading.Event()
        keeper = threading.Thread(target=self._keep, args=(directory_url, host, done), daemon=True)
        keeper.start()
        failed: list[IssueError] = []
        try:
            return self._order(directory_url, host, on_demand, issue, failed)
        finally:
            done.set()
            keeper.join(5)
            try:
                if not (failed and self._hold(directory_url, host, failed[0])):
                    self.cluster.release(directory_url, host)
            except StoreUnavailable:
                pass  # it expires

    def _held(self, directory_url: str, host: str, holder: str) -> None:
        left = self.cluster.lock_left(directory_url, host) + 0.5
        reason = self.cluster.last_failure(directory_url, host)
        if reason is not None:
            raise IssueError(
                f"the last order on {holder} failed: {reason}",
                held_by=holder, retry_after=left, cooling_down=True,
            )  # fmt: skip
        raise IssueError(f"{holder} is ordering it", held_by=holder, retry_after=left)

    def _hold(self, directory_url: str, host: str, error: IssueError) -> bool:
        """
        After a failed order: keep the lock for the backoff; False when the
        next attempt may start at once.
        """
        delay = self.backoff(self.cluster.count_failure(directory_url, host), error)
        if delay <= 0:
            return False
        self.cluster.hold(directory_url, host, delay, str(error))
        return True

    def _keep(self, directory_url: str, host: str, done: threading.Event) -> None:
        while not done.wait(self.cluster.lock_ttl / 3):
            try:
                self.cluster.extend(directory_url, host)
            except StoreUnavailable:
                pass

    def _order(
        self,
        directory_url: str,
        host: str,
        on_demand: bool,
        issue: Callable[[], CertifiedKey],
        failed: list[IssueError],
    ) -> CertifiedKey:
        try:
            shared = shared_certificate(self.cluster.get_certificate(directory_url, host))
            if shared is not None and self.renew_at(shared) > self.now():
                chain, key = certified_pem(shared)
                self.local.for_directory(directory_url).save_certificate(host, key, chain)
                return shared
            if on_demand:
                wait = self.cluster.reserve_order(directory_url, self.on_demand_rate, self.on_demand_window)
                if wait > 0:
                    raise IssueError("the cluster's on-demand order limit is reached", retry_after=wait, rate_limited=True)
        except StoreUnavailable as e:
            raise IssueError(f"cluster store unreachable ({e})", store_unavailable=True) from None
        try:
            certified = issue()
        except IssueError as error:
            failed.append(error)
            raise
        try:
            self.cluster.clear_failures(directory_url, host)
        except StoreUnavailable:
            pass
        return certified


@implementer(IOnDemandPolicy)
class ClusterPolicy:
    """
    Asks the store for another node's decision first (in a worker thread),
    else the wrapped policy, whose answer is then shared.
    """

    def __init__(
        self,
        policy: IOnDemandPolicy,
        cluster: RedisCluster,
        run_in_thread: Callable[..., Deferred],
        approve_ttl: float = 3600.0,
        deny_ttl: float = 60.0,
    ) -> None:
        self.policy = policy
        self.cluster = cluster
        self.run_in_thread = run_in_thread
        self.approve_ttl = approve_ttl
        self.deny_ttl = deny_ttl

    def _lookup(self, url: str, host: str) -> str | None:
        try:
            return self.cluster.decision(url, host)
        except StoreUnavailable:
            return None

    def _record(self, url: str, host: str, value: str, ttl: float) -> None:
        try:
            self.cluster.set_decision(url, host, value, ttl)
        except StoreUnavailable:
            pass

    def check(self, service: str, url: str, host: str) -> Deferred:
        d = self.run_in_thread(lambda: self._lookup(url, host))

        def decided(found: str | None) -> Any:
            if found == "approved":
                return None
            if found and found.startswith("denied "):
                raise OnDemandDenied(found[len("denied ") :])
            asked = self.policy.check(service, url, host)
            asked.addCallbacks(approved, denied)
            return asked

        def approved(_: Any) -> None:
            self.run_in_thread(lambda: self._record(url, host, "approved", self.approve_ttl))

        def denied(failure: Any) -> Any:
            if failure.check(OnDemandDenied):
                reason = str(failure.value)
                self.run_in_thread(lambda: self._record(url, host, "denied " + reason, self.deny_ttl))
            return failure

        return d.addCallback(decided)
