"""
A reusable fixture that runs Debian's C{pebble} ACME test server on loopback.

    from tests.pebble import PEBBLE_SKIP, Pebble, LoopbackDNS, free_port

    class T(TestCase):
        skip = PEBBLE_SKIP           # a clear reason when /usr/bin/pebble is absent

        def setUp(self):
            dns = LoopbackDNS(reactor)          # answers A 127.0.0.1 for every name
            self.addCleanup(dns.stop)
            self.pebble = Pebble(self.mktemp(), http_port=..., tls_port=...,
                                 dns_port=dns.port)
            self.pebble.start()                 # blocks until /dir answers
            self.addCleanup(self.pebble.stop)
            self.pebble.directory_url           # https://127.0.0.1:<port>/dir
            self.pebble.ca_bundle               # PEM path: pebble's own HTTPS CA
            self.pebble.root_pem()              # PEM of the root that signs issued certs

Pebble runs with PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0 and
PEBBLE_AUTHZREUSE=0 (deterministic), listens only on 127.0.0.1, and validates
HTTP-01 on C{http_port} and TLS-ALPN-01 on C{tls_port} of 127.0.0.1 (names
resolved through C{dns_port}).  Everything lives in a temporary directory.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEBBLE = shutil.which("pebble") or ("/usr/bin/pebble" if os.path.exists("/usr/bin/pebble") else None)
PEBBLE_SKIP = (
    None
    if PEBBLE
    else "Debian's pebble ACME test server is not installed (apt-get install -y pebble)"
)

__all__ = ["PEBBLE", "PEBBLE_SKIP", "Pebble", "LoopbackDNS", "free_port"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _pem(obj: Any) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_tls_files(directory: str) -> tuple[str, str, str]:
    """
    A throwaway CA and a cert for localhost/127.0.0.1 for pebble's own HTTPS.
    """
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble-wfe-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    for path, data in zip(paths, (_pem(ca), _pem(cert), _key_pem(key))):
        with open(path, "wb") as f:
            f.write(data)
    return paths  # type: ignore[return-value]


class Pebble:
    def __init__(
        self,
        workdir: str,
        http_port: int,
        tls_port: int,
        dns_port: int | None = None,
        validity: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.http_port = http_port
        self.tls_port = tls_port
        self.dns_port = dns_port
        self.validity = validity
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.acme_port = free_port()
        self.management_port = free_port()
        self.directory_url = f"https://127.0.0.1:{self.acme_port}/dir"
        self.management_url = f"https://127.0.0.1:{self.management_port}"
        self.ca_bundle = os.path.join(self.workdir, "ca.pem")

    def start(self, timeout: float = 15.0) -> None:
        if PEBBLE is None:
            raise RuntimeError(PEBBLE_SKIP)
        os.makedirs(self.workdir, exist_ok=True)
        ca, cert, key = _write_tls_files(self.workdir)
        config: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": cert,
            "privateKey": key,
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            config["certificateValidityPeriod"] = self.validity
        cfg = os.path.join(self.workdir, "pebble-config.json")
        with open(cfg, "w") as f:
            json.dump({"pebble": config}, f)
        env = dict(os.environ)
        env.update(
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_WFE_NONCEREJECT="0",
            PEBBLE_AUTHZREUSE="0",
        )
        env.update(self.extra_env)
        args = [PEBBLE, "-config", cfg]
        if self.dns_port is not None:
            args += ["-dnsserver", f"127.0.0.1:{self.dns_port}"]
        self.log_path = os.path.join(self.workdir, "pebble.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            args, cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        context = ssl.create_default_context(cafile=self.ca_bundle)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pebble exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.directory_url, context=context, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pebble did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def _get(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=self.ca_bundle)
        with urllib.request.urlopen(self.management_url + path, context=context, timeout=5) as r:
            return r.read()

    def root_pem(self) -> bytes:
        """
        The root that signs issued certificates (blocking).
        """
        return self._get("/roots/0")

    def intermediate_pem(self) -> bytes:
        return self._get("/intermediates/0")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


class LoopbackDNS:
    """
    A twisted.names server on 127.0.0.1 (UDP and TCP) answering
    C{A 127.0.0.1} for every name and an empty NOERROR for anything else.
    """

    def __init__(self, reactor: Any) -> None:
        from twisted.internet import defer
        from twisted.names import dns, server

        class Everything:
            def query(self, query: Any, timeout: Any = None) -> Any:
                if query.type == dns.A:
                    answer = dns.RRHeader(
                        name=query.name.name,
                        type=dns.A,
                        ttl=0,
                        payload=dns.Record_A("127.0.0.1", ttl=0),
                    )
                    return defer.succeed(([answer], [], []))
                return defer.succeed(([], [], []))

        from twisted.internet.error import CannotListenError

        factory = server.DNSServerFactory(clients=[Everything()])
        for attempt in range(20):
            # the UDP port is free, but a TCP connection may hold the same
            # ephemeral port number: then try another one
            protocol = dns.DNSDatagramProtocol(controller=factory)
            self.udp = reactor.listenUDP(0, protocol, interface="127.0.0.1")
            self.port = self.udp.getHost().port
            try:
                self.tcp = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
                break
            except CannotListenError:
                self.udp.stopListening()
                if attempt == 19:
                    raise

    def stop(self) -> Any:
        from twisted.internet.defer import gatherResults, maybeDeferred

        return gatherResults(
            [maybeDeferred(self.udp.stopListening), maybeDeferred(self.tcp.stopListening)]
        )
