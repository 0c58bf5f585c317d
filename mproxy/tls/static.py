# -*- test-case-name: tests.test_tls_static -*-
"""
Custom certificates (C{--tls-certificate-path}, C{--tls-private-key-path}).

API::

    certified = load_static(cert_path, key_path)
        # -> CertifiedKey; raises CertificateError("unable to load certificate: <reason>")
    static = StaticCertificate(cert_path, key_path, logger)   # loads at once (raises)
    static.certificate                                  # current CertifiedKey
    static.check() -> bool                              # reload if either file changed;
                                                        # True when a new certificate
                                                        # is in use; a broken new file
                                                        # keeps the old one (logged)
    static.reload() -> bool                             # reload unconditionally (SIGHUP)

    certs = StaticCertificates(logger)      # every service's, by service name
    certs.update(name, options); certs.remove(name); certs.get(name)
    certs.check(); certs.reload(); certs.rows(name, hosts) -> [HostStatus]
    certs.start_polling(clock, interval); certs.stop_polling()

Reloading swaps the object used for new handshakes; established connections
keep their session and are not touched.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from mproxy.errors import CertificateError
from mproxy.logging import JSONLogger
from mproxy.tls.certs import CertifiedKey, load_certified_key
from mproxy.tls.status import HostStatus

__all__ = ["load_static", "StaticCertificate", "StaticCertificates", "install_sighup_reload"]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise CertificateError(f"unable to load certificate: open {path}: {reason}") from None


def load_static(cert_path: str, key_path: str) -> CertifiedKey:
    """
    Load and check a PEM certificate chain and its private key.

    @raise CertificateError: C{unable to load certificate: <reason>}.
    """
    if not cert_path or not key_path:
        raise CertificateError(
            "unable to load certificate: both a certificate and a private key path are required"
        )
    chain = _read(cert_path)
    key = _read(key_path)
    try:
        return load_certified_key(chain, key)
    except ValueError as e:
        raise CertificateError(f"unable to load certificate: {e}") from None


def _fingerprint(path: str, stat: Callable[[str], Any]) -> tuple[Any, ...] | None:
    try:
        st = stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class StaticCertificate:
    """
    A custom certificate that follows changes to its files.
    """

    certificate: CertifiedKey | None

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        logger: Any = None,
        stat: Callable[[str], Any] = os.stat,
        strict: bool = True,
    ) -> None:
        """
        @param strict: raise L{CertificateError} when the files cannot be
            loaded; otherwise start without a certificate (C{certificate} is
            None, C{last_error} says why) and load it once the files change.
        """
        self.cert_path = cert_path
        self.key_path = key_path
        self.logger = logger if logger is not None else JSONLogger()
        self._stat = stat
        self._seen = self._fingerprints()
        self.last_error: str | None = None
        try:
            self.certificate = load_static(cert_path, key_path)
        except CertificateError as e:
            if strict:
                raise
            self.certificate = None
            self.last_error = str(e)

    @property
    def paths(self) -> tuple[str, str]:
        return (self.cert_path, self.key_path)

    def _fingerprints(self) -> tuple[Any, ...]:
        return (_fingerprint(self.cert_path, self._stat), _fingerprint(self.key_path, self._stat))

    def check(self) -> bool:
        """
        Reload when either file's mtime, size or inode changed.
        """
        now = self._fingerprints()
        if now == self._seen:
            return False
        self._seen = now
        return self.reload()

    def reload(self) -> bool:
        """
        Load the files again; keep the current certificate when they are
        broken (for example half-way through being replaced).
        """
        try:
            new = load_static(self.cert_path, self.key_path)
        except CertificateError as e:
            self.last_error = str(e)
            self.logger.warn(
                f"Keeping the current certificate for {self.cert_path}: {e}",
                path=self.cert_path,
                error=str(e),
            )
            return False
        self.last_error = None
        if self.certificate is not None and _same(new, self.certificate):
            return False
        self.certificate = new
        self.logger.info(f"Reloaded certificate {self.cert_path}", path=self.cert_path)
        return True


class StaticCertificates:
    """
    The custom certificates of every service that has them, by service name.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._by_service: dict[str, StaticCertificate] = {}
        self._poll: Any = None

    def start_polling(self, clock: Any, interval: float) -> None:
        """
        L{check} every C{interval} seconds on C{clock}.
        """
        from twisted.internet.task import LoopingCall

        self._poll = LoopingCall(self.check)
        self._poll.clock = clock
        self._poll.start(interval, now=False)

    def stop_polling(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def __contains__(self, name: str) -> bool:
        return name in self._by_service

    def get(self, name: str) -> StaticCertificate | None:
        return self._by_service.get(name)

    def update(self, name: str, options: Any) -> None:
        """
        Follow a deployed (or restored) service's certificate paths.  Never
        raises: files that cannot be loaded (refused at deploy time; on state
        restore they may have vanished) leave the service without a
        certificate, reported as failed, until the files are fixed.
        """
        if not (options.tls_enabled and options.tls_certificate_path):
            self._by_service.pop(name, None)
            return
        current = self._by_service.get(name)
        paths = (options.tls_certificate_path, options.tls_private_key_path)
        if current is not None and current.paths == paths:
            current.reload()  # a redeploy picks up replaced files at once
            return
        try:
            self._by_service[name] = StaticCertificate(*paths, self.logger)
        except CertificateError as e:
            self.logger.error(
                f"Custom certificate for {name} not loaded: {e}", service=name, error=str(e)
            )
            self._by_service[name] = StaticCertificate(*paths, self.logger, strict=False)

    def remove(self, name: str) -> None:
        self._by_service.pop(name, None)

    def check(self) -> None:
        """
        Reload the certificates whose files changed (run on a timer).
        """
        for static in list(self._by_service.values()):
            static.check()

    def reload(self) -> None:
        """
        Reload every custom certificate now (SIGHUP).
        """
        for static in list(self._by_service.values()):
            static.reload()

    def rows(self, name: str, hosts: Any) -> list[HostStatus]:
        static = self._by_service[name]
        if static.certificate is None:
            return [HostStatus(name, h, "failed", None, static.last_error) for h in hosts]
        not_after = static.certificate.not_after
        return [HostStatus(name, h, "static", not_after, static.last_error) for h in hosts]


def _same(a: CertifiedKey, b: CertifiedKey) -> bool:
    return a.chain == b.chain and _key_der(a.key) == _key_der(b.key)


def _key_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def install_sighup_reload(reactor: Any, reload: Callable[[], Any]) -> Callable[[], None]:
    """
    Call C{reload} on the reactor thread whenever the process gets SIGHUP.
    Returns a function that restores the previous handler.
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    previous = signal.signal(signal.SIGHUP, handler)

    def uninstall() -> None:
        signal.signal(signal.SIGHUP, previous)

    return uninstall
