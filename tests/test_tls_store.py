"""
Tests for L{mproxy.tls.store} and L{mproxy.tls.certs}.
"""

import hashlib
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from mproxy.tls.certs import format_time, generate_key_pem, load_certified_key
from mproxy.tls.store import CertificateStore, atomic_write, valid_host_name
from mproxy.tls.testing import make_ca, make_certificate, pem_pair


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.store = CertificateStore(self.state).for_directory("https://ca.test/dir")

    def test_pathIsHashOfDirectoryURL(self) -> None:
        """
        Files live in certs/<sha256 hex of the directory URL>.
        """
        digest = hashlib.sha256(b"https://ca.test/dir").hexdigest()
        self.assertEqual(self.store.path, os.path.join(self.state, "certs", digest))

    def test_accountRoundTrip(self) -> None:
        """
        The account key is stored with mode 0600 and read back.
        """
        self.assertIsNone(self.store.load_account_key())
        self.store.save_account_key(b"KEY")
        self.store.save_account('{"uri": "x"}')
        self.assertEqual(self.store.load_account_key(), b"KEY")
        self.assertEqual(self.store.load_account(), '{"uri": "x"}')
        mode = stat.S_IMODE(os.stat(os.path.join(self.store.path, "account.key")).st_mode)
        self.assertEqual(mode, 0o600)
        dmode = stat.S_IMODE(os.stat(self.store.path).st_mode)
        self.assertEqual(dmode, 0o700)
        self.store.forget_account()
        self.assertIsNone(self.store.load_account())

    def test_certificateRoundTrip(self) -> None:
        """
        A certificate and key are stored (key 0600) and loaded back; hosts()
        lists them.
        """
        ca = make_ca()
        chain, key = pem_pair(make_certificate(["a.test"], issuer=ca))
        saved = self.store.save_certificate("a.test", key, chain)
        loaded = self.store.load_certificate("a.test")
        self.assertEqual(loaded.chain, saved.chain)
        self.assertEqual(len(loaded.chain), 2)
        mode = stat.S_IMODE(os.stat(os.path.join(self.store.path, "a.test.key")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(self.store.hosts(), ["a.test"])
        self.assertEqual(os.listdir(self.store.path).count("a.test.crt"), 1)
        self.assertFalse([n for n in os.listdir(self.store.path) if n.startswith(".tmp")])

    def test_saveRejectsMismatch(self) -> None:
        """
        A key that does not belong to the certificate is not stored.
        """
        chain, _ = pem_pair(make_certificate(["a.test"]))
        self.assertRaises(ValueError, self.store.save_certificate, "a.test", generate_key_pem(), chain)
        self.assertIsNone(self.store.load_certificate("a.test"))

    def test_invalidHostRefused(self) -> None:
        """
        Names that could escape the directory are refused.
        """
        self.assertRaises(ValueError, self.store.load_certificate, "../x.test")

    def test_missingCertificate(self) -> None:
        """
        Absent certificates load as None; an empty store lists no hosts.
        """
        self.assertIsNone(self.store.load_certificate("a.test"))
        self.assertEqual(self.store.hosts(), [])

    def test_atomicWriteReplaces(self) -> None:
        """
        atomic_write replaces the file and applies the mode.
        """
        p = os.path.join(self.state, "f")
        atomic_write(p, b"one", 0o600)
        atomic_write(p, b"two", 0o640)
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"two")
        self.assertEqual(stat.S_IMODE(os.stat(p).st_mode), 0o640)
        self.assertEqual(os.listdir(self.state), ["f"])

    def test_validHostName(self) -> None:
        """
        Only dotted DNS names qualify.
        """
        for ok in ["a.test", "app1.example.com", "x-y.z"]:
            self.assertTrue(valid_host_name(ok), ok)
        for bad in ["localhost", "*.a.test", "1.2.3.4", "a..b", "-a.b", "A.b", "a.b/c", ""]:
            self.assertFalse(valid_host_name(bad), bad)


class CertifiedKeyTests(SynchronousTestCase):
    def test_renewAt(self) -> None:
        """
        Renewal is due when a third of the lifetime is left.
        """
        c = make_certificate(["a.test"], not_before=0, not_after=90 * 86400)
        self.assertEqual(c.renew_at(), 60 * 86400)
        self.assertEqual(c.dns_names(), ["a.test"])

    def test_loadErrors(self) -> None:
        """
        Bad PEM and mismatched keys have short reasons.
        """
        chain, key = pem_pair(make_certificate(["a.test"]))
        with self.assertRaises(ValueError) as e:
            load_certified_key(b"junk", key)
        self.assertEqual(str(e.exception), "no valid PEM certificate found")
        with self.assertRaises(ValueError) as e:
            load_certified_key(chain, b"junk")
        self.assertEqual(str(e.exception), "no valid PEM private key found")
        with self.assertRaises(ValueError) as e:
            load_certified_key(chain, generate_key_pem())
        self.assertEqual(str(e.exception), "private key does not match certificate")

    def test_formatTime(self) -> None:
        """
        Times are shown in UTC ISO form.
        """
        self.assertEqual(format_time(0), "1970-01-01T00:00:00Z")
