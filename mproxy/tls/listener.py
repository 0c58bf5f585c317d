# -*- test-case-name: tests.test_tls_cluster -*-
"""
L{ClusterListener}: the thread that keeps a node in step with the cluster
store.  It subscribes to the notification channel and, on every (re)connect,
resynchronises:

  - certificates: a shared certificate newer than the local copy is saved
    locally and handed to C{on_certificate(directory_url, host, certified)}
    on the reactor thread; a local one newer than the shared copy (saved
    while the store was down) is shared and announced;
  - challenges: responses other nodes publish are applied to the local
    responder (and acknowledged, so the ordering node knows every node can
    answer the CA).

While Redis is unreachable it retries with backoff (0.5 s doubling to 5 s)
and the store is marked unreachable.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

from mproxy.tls.certs import CertifiedKey
from mproxy.tls.clusterstore import apply_challenge, shared_certificate
from mproxy.tls.redisstore import CHANNEL, RedisCluster, StoreUnavailable
from mproxy.tls.store import CertificateStore, DirectoryStore

__all__ = ["ClusterListener"]

OnCertificate = Callable[[str, str, CertifiedKey], None]


class ClusterListener:
    def __init__(
        self,
        reactor: Any,
        cluster: RedisCluster,
        local: CertificateStore,
        challenges: Any,
        on_certificate: OnCertificate,
        logger: Any,
    ) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self.local = local
        self.challenges = challenges
        self.on_certificate = on_certificate
        self.logger = logger
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mproxy-cluster-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """
        Stop and join the thread (blocking: call it off the reactor thread).
        """
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)

    def _log(self, level: str, msg: str, **attrs: Any) -> None:
        self.reactor.callFromThread(getattr(self.logger, level), msg, **attrs)

    def _run(self) -> None:
        import redis

        delay = 0.5
        while not self._stopped.is_set():
            pubsub = self.cluster.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                was = self.cluster.reachable
                self.cluster.mark(True)
                if was is False:
                    self._log("info", "Cluster store reachable again", store=self.cluster.url)
                self.resync()
                delay = 0.5
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._handle_safely(message["data"])
            except (redis.RedisError, OSError, StoreUnavailable) as e:
                if self.cluster.reachable is not False:
                    self._log("warn", f"Cluster store unreachable: {e}", store=self.cluster.url, error=str(e))
                self.cluster.mark(False)
                self._stopped.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    # -- messages (listener thread) -------------------------------------------

    def _handle_safely(self, data: bytes) -> None:
        try:
            self.handle(json.loads(data))
        except StoreUnavailable:
            raise
        except Exception as e:  # a bad message must not stop the listener
            self._log("error", f"Bad cluster message: {type(e).__name__}: {e}", error=str(e))

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "certificate":
            self.fetch(message["directory"], message["host"])
        elif kind == "challenge":
            apply_challenge(
                self.challenges, message["op"], message["type"], message["name"], message.get("value")
            )
            self.cluster.ack(message["id"])

    def fetch(self, directory_url: str, host: str) -> None:
        """
        Take the shared certificate for C{host} if it is newer than ours.
        """
        shared = shared_certificate(self.cluster.get_certificate(directory_url, host))
        if shared is None:
            return
        local = self.local.for_directory(directory_url)
        try:
            current = local.load_certificate(host)
        except ValueError:
            return  # not a host name we would store
        if current is None or shared.not_after > current.not_after:
            from mproxy.tls.certs import certified_pem

            chain, key = certified_pem(shared)
            local.save_certificate(host, key, chain)
        elif shared.not_after < current.not_after:
            return  # ours is newer: resync shares it
        self.reactor.callFromThread(self.on_certificate, directory_url, host, shared)

    def resync(self) -> None:
        shared = set()
        for directory_url, host in self.cluster.certificates():
            shared.add((directory_url, host))
            self.fetch(directory_url, host)
        for directory in self.local.directories():
            for host in directory.hosts():
                self._share_newer(directory, host, (directory.directory_url, host) in shared)
        for type_, name, value in self.cluster.challenges():
            apply_challenge(self.challenges, "add", type_, name, value)

    def _share_newer(self, directory: DirectoryStore, host: str, known: bool) -> None:
        mine = directory.load_certificate(host)
        if mine is None:
            return
        url = directory.directory_url
        if known:
            theirs = shared_certificate(self.cluster.get_certificate(url, host))
            if theirs is not None and theirs.not_after >= mine.not_after:
                return
        from mproxy.tls.certs import certified_pem

        chain, key = certified_pem(mine)
        self.cluster.put_certificate(url, host, key, chain, self.cluster.node, mine.not_after)
        self.cluster.publish({"kind": "certificate", "directory": url, "host": host})
