"""
Tests for L{mproxy.tls.static}.
"""

import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from mproxy.errors import CertificateError
from mproxy.logging import ListLogger
from mproxy.tls.static import StaticCertificate, install_sighup_reload, load_static
from mproxy.tls.testing import make_certificate, pem_pair


class StaticTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logger = ListLogger()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")

    def write(self, names=("a.test",), key=None):
        certified = make_certificate(list(names))
        chain, k = pem_pair(certified)
        with open(self.cert, "wb") as f:
            f.write(chain)
        with open(self.key, "wb") as f:
            f.write(key if key is not None else k)
        return certified

    def test_load(self) -> None:
        """
        A valid pair loads.
        """
        c = self.write()
        self.assertEqual(load_static(self.cert, self.key).leaf, c.leaf)

    def test_missing(self) -> None:
        """
        A missing key file is named in the error.
        """
        self.write()
        e = self.assertRaises(CertificateError, load_static, self.cert, self.key + ".x")
        self.assertEqual(str(e), f"unable to load certificate: open {self.key}.x: no such file or directory")

    def test_badPem(self) -> None:
        """
        Garbage is not a certificate.
        """
        self.write()
        with open(self.cert, "wb") as f:
            f.write(b"nope")
        e = self.assertRaises(CertificateError, load_static, self.cert, self.key)
        self.assertEqual(str(e), "unable to load certificate: no valid PEM certificate found")

    def test_swapped(self) -> None:
        """
        Certificate and key swapped fail.
        """
        self.write()
        self.assertRaises(CertificateError, load_static, self.key, self.cert)

    def test_checkReloadsOnChange(self) -> None:
        """
        check() reloads when the files change and not otherwise.
        """
        self.write()
        s = StaticCertificate(self.cert, self.key, self.logger)
        first = s.certificate
        self.assertFalse(s.check())
        second = self.write()
        os.utime(self.cert, ns=(5, 5))
        self.assertTrue(s.check())
        self.assertEqual(s.certificate.leaf, second.leaf)
        self.assertIsNot(s.certificate, first)

    def test_brokenUpdateKeepsOld(self) -> None:
        """
        A half-written replacement keeps the old certificate and records the
        error; a later good write is picked up.
        """
        first = self.write()
        s = StaticCertificate(self.cert, self.key, self.logger)
        with open(self.key, "wb") as f:
            f.write(b"")
        self.assertFalse(s.check())
        self.assertEqual(s.certificate.leaf, first.leaf)
        self.assertIn("unable to load certificate", s.last_error)
        [warning] = self.logger.records
        self.assertEqual(warning["level"], "WARN")
        self.assertTrue(warning["msg"].startswith(f"Keeping the current certificate for {self.cert}: "))
        third = self.write()
        self.assertTrue(s.check())
        self.assertEqual(self.logger.records[-1]["msg"], f"Reloaded certificate {self.cert}")
        self.assertEqual(s.certificate.leaf, third.leaf)
        self.assertIsNone(s.last_error)

    def test_reloadSameContent(self) -> None:
        """
        reload() of unchanged files keeps the same object (and its context).
        """
        self.write()
        s = StaticCertificate(self.cert, self.key, self.logger)
        first = s.certificate
        self.assertFalse(s.reload())
        self.assertIs(s.certificate, first)

    def test_sighup(self) -> None:
        """
        SIGHUP schedules the reload on the reactor thread.
        """
        calls = []

        class FakeReactor:
            def callFromThread(self, f, *a):
                calls.append(f)

        marker = object()
        uninstall = install_sighup_reload(FakeReactor(), lambda: marker)
        self.addCleanup(uninstall)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual([c() for c in calls], [marker])
