"""
A reusable fixture that runs Debian's C{redis-server} on a free loopback port.

    from tests.redisserver import REDIS_SKIP, RedisServer

    class T(TestCase):
        skip = REDIS_SKIP          # a clear reason when redis-server is absent

        def setUp(self):
            self.redis = RedisServer(self.mktemp(), password="secret")
            self.redis.start()     # blocks until it answers PING
            self.addCleanup(self.redis.stop)
            self.redis.url         # redis://:secret@127.0.0.1:<port>/0
            self.redis.stop(); self.redis.start()   # same port, empty again

Nothing is saved to disk (no RDB, no AOF); it listens on 127.0.0.1 only.
With C{tls=True} it speaks only TLS (C{rediss://}), with a certificate for
127.0.0.1 from a throwaway CA in C{self.ca_bundle}.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Any

REDIS = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
try:
    import redis as _redis_client  # noqa: F401
except ImportError:  # pragma: no cover
    _redis_client = None

REDIS_SKIP = (
    "Debian's redis-server is not installed (apt-get install -y redis-server)"
    if REDIS is None
    else "the redis Python client is not installed" if _redis_client is None else None
)

__all__ = ["REDIS", "REDIS_SKIP", "RedisServer"]


def _free_port() -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class RedisServer:
    def __init__(
        self, directory: str, password: str | None = None, port: int | None = None, tls: bool = False
    ) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.password = password
        self.tls = tls
        self.ca_bundle: str | None = None
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        extra = {"ssl_ca_certs": self.ca_bundle} if self.tls else {}
        return redis.Redis.from_url(self.url, socket_timeout=5, **extra)

    def start(self, timeout: float = 10.0) -> None:
        args = [
            REDIS or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.directory,
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            from tests.pebble import _write_tls_files

            self.ca_bundle, cert, key = _write_tls_files(self.directory)
            args[2] = "0"  # no plain port
            args += [
                "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                "--tls-ca-cert-file", self.ca_bundle, "--tls-auth-clients", "no",
            ]  # fmt: skip
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""
