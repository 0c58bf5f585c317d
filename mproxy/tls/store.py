# -*- test-case-name: tests.test_tls_store -*-
"""
On-disk storage of ACME accounts and certificates.

Layout, one directory per ACME directory URL so that staging, production and
test CAs never mix::

    <state dir>/certs/<sha256 hex of the directory URL>/
        directory.txt          the URL itself (informational)
        account.key            account private key, PEM, mode 0600
        account.json           the registration resource (kid etc.)
        <host>.crt             certificate chain (leaf first), PEM
        <host>.key             certificate private key, PEM, mode 0600

Every file is written atomically (temporary file in the same directory, fsync,
rename, fsync of the directory).  Methods are synchronous and do small file
I/O; L{mproxy.tls.orders.OrderRunner} calls the writers from its ACME worker thread and
the readers at start-up / deploy time.

API::

    store = CertificateStore(state_dir)            # str or FilePath-like path
    d = store.for_directory(directory_url)         # -> DirectoryStore
    d.load_account_key() -> bytes | None
    d.save_account_key(pem: bytes)
    d.load_account() -> str | None                 # JSON text
    d.save_account(json_text: str)
    d.load_certificate(host) -> CertifiedKey | None
    d.save_certificate(host, key_pem, chain_pem) -> CertifiedKey
    d.hosts() -> list[str]
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from zope.interface import implementer

from mproxy.fileutil import atomic_write
from mproxy.tls.certs import CertifiedKey, load_certified_key
from mproxy.tls.interfaces import ICertificateStore, IDirectoryStore

__all__ = ["CertificateStore", "DirectoryStore", "atomic_write", "valid_host_name"]

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)+$")


def valid_host_name(name: str) -> bool:
    """
    A host name that may get an ACME certificate and a file in the store:
    lower-case LDH labels, at least one dot, no wildcard, not an IP literal.
    """
    if not _HOST_NAME.match(name):
        return False
    if all(part.isdigit() for part in name.split(".")):
        return False
    return True


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@implementer(IDirectoryStore)
class DirectoryStore:
    """
    The files for one ACME directory URL.
    """

    def __init__(self, path: str, directory_url: str) -> None:
        self.path = path
        self.directory_url = directory_url

    def _ensure(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        marker = os.path.join(self.path, "directory.txt")
        if not os.path.exists(marker):
            atomic_write(marker, self.directory_url.encode() + b"\n")

    def _host_path(self, host: str, suffix: str) -> str:
        if not valid_host_name(host):
            raise ValueError(f"invalid host name {host!r}")
        return os.path.join(self.path, host + suffix)

    def load_account_key(self) -> bytes | None:
        return _read(os.path.join(self.path, "account.key"))

    def save_account_key(self, pem: bytes) -> None:
        self._ensure()
        atomic_write(os.path.join(self.path, "account.key"), pem, 0o600)

    def load_account(self) -> str | None:
        data = _read(os.path.join(self.path, "account.json"))
        return None if data is None else data.decode()

    def save_account(self, json_text: str) -> None:
        self._ensure()
        atomic_write(os.path.join(self.path, "account.json"), json_text.encode(), 0o600)

    def forget_account(self) -> None:
        try:
            os.unlink(os.path.join(self.path, "account.json"))
        except FileNotFoundError:
            pass

    def load_certificate(self, host: str) -> CertifiedKey | None:
        """
        The stored certificate for C{host}, or L{None} when absent or unreadable.
        """
        chain = _read(self._host_path(host, ".crt"))
        key = _read(self._host_path(host, ".key"))
        if chain is None or key is None:
            return None
        try:
            return load_certified_key(chain, key)
        except ValueError:
            return None

    def save_certificate(self, host: str, key_pem: bytes, chain_pem: bytes) -> CertifiedKey:
        """
        Validate and store a certificate; the key is written first so that a
        crash never leaves a certificate without its key.
        """
        certified = load_certified_key(chain_pem, key_pem)
        self._ensure()
        atomic_write(self._host_path(host, ".key"), key_pem, 0o600)
        atomic_write(self._host_path(host, ".crt"), chain_pem, 0o644)
        return certified

    def hosts(self) -> list[str]:
        """
        Hosts that have a stored certificate, sorted.
        """
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.endswith(".crt"):
                h = n[: -len(".crt")]
                if valid_host_name(h) and os.path.exists(os.path.join(self.path, h + ".key")):
                    out.append(h)
        return sorted(out)


@implementer(ICertificateStore)
class CertificateStore:
    """
    The C{certs/} directory inside the state directory.
    """

    def __init__(self, state_dir: Any) -> None:
        base = getattr(state_dir, "path", state_dir)
        self.path = os.path.join(os.fspath(base), "certs")

    def for_directory(self, directory_url: str) -> DirectoryStore:
        digest = hashlib.sha256(directory_url.encode()).hexdigest()
        return DirectoryStore(os.path.join(self.path, digest), directory_url)

    def directories(self) -> list[DirectoryStore]:
        """
        The stores of every directory URL with files here.
        """
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            url = _read(os.path.join(self.path, name, "directory.txt"))
            if url:
                out.append(self.for_directory(url.decode().strip()))
        return out
