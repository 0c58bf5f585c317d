# -*- test-case-name: tests.test_tls_redisstore -*-
"""
L{RedisCluster}: what mproxy nodes share through Redis (certificates, the
ACME account, per-name order locks, challenge responses, on-demand decisions
and on-demand order counts) and the notification channel between them.

The client is redis-py.  Every method here blocks on the network, so it is
called from worker threads (the ACME order thread, the cluster thread pool,
the listener thread), never from the reactor thread: nothing a request or a
handshake does waits on Redis.  Any Redis or socket error becomes
L{StoreUnavailable} and marks the store unreachable until a call succeeds.

Keys (C{<d>}: the first 16 hex digits of SHA-256 of the ACME directory URL)::

    mproxy:dir:<d>:account-key          account private key PEM (first writer wins)
    mproxy:dir:<d>:account              registration JSON
    mproxy:dir:<d>:cert:<host>          hash: chain, key, node, not_after, directory
    mproxy:dir:<d>:lock:<host>          name of the node ordering <host>; expires
                                        unless its holder keeps extending it; after
                                        a failed order held for the backoff
    mproxy:dir:<d>:failed:<host>        why the last order failed (expires with it)
    mproxy:dir:<d>:failures:<host>      failed orders in a row, cluster-wide
    mproxy:dir:<d>:ondemand-orders      sorted set: recent on-demand orders
    mproxy:challenge:<type>:<name>      a pending challenge response (expires)
    mproxy:ack:<id>                     nodes that applied a challenge message
    mproxy:ondemand:<u>:<host>          "approved" or "denied <reason>" (expires)

Channel C{mproxy:events}: JSON messages C{{"kind": "certificate",
"directory": url, "host": h}} and C{{"kind": "challenge", "op": "add" |
"remove", "type": t, "name": n, "value": ..., "id": ...}}.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, Iterator

__all__ = ["RedisCluster", "StoreUnavailable", "CHANNEL"]

CHANNEL = "mproxy:events"

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RESERVE = """
local now, window, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - window)
if redis.call('zcard', KEYS[1]) < rate then
  redis.call('zadd', KEYS[1], now, ARGV[4])
  redis.call('expire', KEYS[1], math.ceil(window))
  return '0'
end
local oldest = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


class StoreUnavailable(Exception):
    """
    The cluster store could not be reached (or answered with an error).
    """


def directory_key(directory_url: str) -> str:
    return hashlib.sha256(directory_url.encode()).hexdigest()[:16]


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisCluster:
    """
    @ivar node: this node's name (lock values, "issued by").
    @ivar reachable: None until the first call, then whether the last call
        reached the store.
    """

    def __init__(
        self,
        url: str,
        node: str,
        ca_bundle: str | None = None,
        lock_ttl: float = 15.0,
        client: Any = None,
    ) -> None:
        self.url = url
        self.node = node
        self.lock_ttl = lock_ttl
        self.reachable: bool | None = None
        if client is None:
            import redis

            options: dict[str, Any] = {}
            if url.startswith("rediss:") and ca_bundle:
                options["ssl_ca_certs"] = ca_bundle
            client = redis.Redis.from_url(
                url, socket_timeout=3, socket_connect_timeout=3, health_check_interval=5, **options
            )
        self.client = client
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._reserve = client.register_script(_RESERVE)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            result = getattr(self.client, method)(*args, **kwargs)
        except (redis.RedisError, OSError) as e:
            self.reachable = False
            raise StoreUnavailable(str(e) or type(e).__name__) from None
        self.reachable = True
        return result

    def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        import redis

        try:
            result = script(keys=keys, args=args)
        except (redis.RedisError, OSError) as e:
            self.reachable = False
            raise StoreUnavailable(str(e) or type(e).__name__) from None
        self.reachable = True
        return result

    def _scan(self, pattern: str) -> list[Any]:
        keys: list[Any] = []
        cursor = 0
        while True:
            cursor, batch = self._call("scan", cursor, match=pattern, count=500)
            keys.extend(batch)
            if not cursor:
                return keys

    def mark(self, reachable: bool) -> None:
        self.reachable = reachable

    @staticmethod
    def _dir(directory_url: str, rest: str) -> str:
        return f"mproxy:dir:{directory_key(directory_url)}:{rest}"

    # -- order locks ----------------------------------------------------------

    def acquire(self, directory_url: str, host: str) -> str | None:
        """
        Take the order lock for C{host}: None when taken, else the holder.
        A lock held under this node's own name (left by a previous run that
        died) is taken over.
        """
        key = self._dir(directory_url, f"lock:{host}")
        ttl = int(self.lock_ttl * 1000)
        if self._call("set", key, self.node, nx=True, px=ttl):
            return None
        holder = _text(self._call("get", key))
        if holder == self.node:
            self._call("set", key, self.node, px=ttl)
            return None
        return holder or "another node"

    def holder(self, directory_url: str, host: str) -> str | None:
        return _text(self._call("get", self._dir(directory_url, f"lock:{host}")))

    def lock_left(self, directory_url: str, host: str) -> float:
        """
        Seconds until the lock for C{host} expires (0 when free).
        """
        ms = self._call("pttl", self._dir(directory_url, f"lock:{host}"))
        return max(0.0, ms / 1000.0)

    def extend(self, directory_url: str, host: str) -> bool:
        key = self._dir(directory_url, f"lock:{host}")
        return bool(self._script(self._extend, [key], [self.node, int(self.lock_ttl * 1000)]))

    def release(self, directory_url: str, host: str) -> None:
        self._script(self._release, [self._dir(directory_url, f"lock:{host}")], [self.node])

    def count_failure(self, directory_url: str, host: str) -> int:
        """
        One more failed order for C{host} in a row; returns how many.
        """
        key = self._dir(directory_url, f"failures:{host}")
        count = int(self._call("incr", key))
        self._call("expire", key, 7 * 86400)
        return count

    def clear_failures(self, directory_url: str, host: str) -> None:
        self._call("delete", self._dir(directory_url, f"failures:{host}"))

    def hold(self, directory_url: str, host: str, seconds: float, reason: str) -> None:
        """
        Keep the lock for C{seconds} after a failed order (the backoff),
        saying why, so that no other node orders meanwhile.
        """
        ms = max(1, int(seconds * 1000))
        self._call("set", self._dir(directory_url, f"failed:{host}"), reason, px=ms)
        self._script(self._extend, [self._dir(directory_url, f"lock:{host}")], [self.node, ms])

    def last_failure(self, directory_url: str, host: str) -> str | None:
        return _text(self._call("get", self._dir(directory_url, f"failed:{host}")))

    # -- certificates and the account -------------------------------------------

    def get_certificate(self, directory_url: str, host: str) -> dict[str, str] | None:
        found = self._call("hgetall", self._dir(directory_url, f"cert:{host}"))
        if not found:
            return None
        return {_text(k): _text(v) for k, v in found.items()}  # type: ignore[misc]

    def put_certificate(
        self, directory_url: str, host: str, key_pem: bytes, chain_pem: bytes, node: str, not_after: float
    ) -> None:
        mapping = {
            "chain": chain_pem, "key": key_pem, "node": node,
            "not_after": repr(not_after), "directory": directory_url, "host": host,
        }  # fmt: skip
        self._call("hset", self._dir(directory_url, f"cert:{host}"), mapping=mapping)

    def certificates(self) -> Iterator[tuple[str, str]]:
        """
        (directory URL, host) of every certificate in the store.
        """
        for key in self._scan("mproxy:dir:*:cert:*"):
            found = self._call("hmget", key, "directory", "host")
            if found[0] and found[1]:
                yield _text(found[0]), _text(found[1])  # type: ignore[misc]

    def account_key(self, directory_url: str, candidate: bytes | None) -> bytes | None:
        """
        The shared account key; C{candidate} becomes it if there is none yet.
        """
        key = self._dir(directory_url, "account-key")
        if candidate is not None:
            self._call("set", key, candidate, nx=True)
        return self._call("get", key)

    def account(self, directory_url: str) -> str | None:
        return _text(self._call("get", self._dir(directory_url, "account")))

    def set_account(self, directory_url: str, json_text: str | None) -> None:
        key = self._dir(directory_url, "account")
        if json_text is None:
            self._call("delete", key)
        else:
            self._call("set", key, json_text)

    # -- notifications and challenges ---------------------------------------------

    def publish(self, message: dict[str, Any]) -> int:
        """
        Send C{message} to every node; returns how many received it.
        """
        return int(self._call("publish", CHANNEL, json.dumps(message)))

    def put_challenge(self, type_: str, name: str, value: Any, ttl: float = 600.0) -> None:
        self._call("set", f"mproxy:challenge:{type_}:{name}", json.dumps(value), px=int(ttl * 1000))

    def delete_challenge(self, type_: str, name: str) -> None:
        self._call("delete", f"mproxy:challenge:{type_}:{name}")

    def challenges(self) -> Iterator[tuple[str, str, Any]]:
        """
        (type, name, value) of every pending challenge response.
        """
        for key in self._scan("mproxy:challenge:*"):
            _, _, type_, name = _text(key).split(":", 3)  # type: ignore[union-attr]
            raw = self._call("get", key)
            if raw is not None:
                yield type_, name, json.loads(raw)

    def ack(self, message_id: str) -> None:
        key = f"mproxy:ack:{message_id}"
        self._call("sadd", key, self.node)
        self._call("expire", key, 60)

    def wait_acks(self, message_id: str, count: int, timeout: float = 3.0) -> int:
        """
        Block until C{count} nodes acknowledged C{message_id} or C{timeout}
        passes; returns how many did.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = int(self._call("scard", f"mproxy:ack:{message_id}"))
            if got >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    # -- on-demand ------------------------------------------------------------------

    def decision(self, url: str, host: str) -> str | None:
        return _text(self._call("get", self._decision_key(url, host)))

    def set_decision(self, url: str, host: str, value: str, ttl: float) -> None:
        self._call("set", self._decision_key(url, host), value, px=max(1, int(ttl * 1000)))

    @staticmethod
    def _decision_key(url: str, host: str) -> str:
        return f"mproxy:ondemand:{hashlib.sha256(url.encode()).hexdigest()[:16]}:{host}"

    def reserve_order(self, directory_url: str, rate: int, window: float) -> float:
        """
        Count a new on-demand order cluster-wide: 0 when it may start now,
        else the seconds until the window has room (nothing is counted).
        """
        key = self._dir(directory_url, "ondemand-orders")
        args = [repr(time.time()), repr(window), rate, self.new_id()]
        return float(self._script(self._reserve, [key], args))
