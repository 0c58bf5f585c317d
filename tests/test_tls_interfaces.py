"""
The real L{mproxy.tls} classes and the fakes in L{mproxy.tls.testing} provide
the interfaces in L{mproxy.tls.interfaces}.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mproxy.tls.acme import AcmeIssuer
from mproxy.tls.challenges import ChallengeStore
from mproxy.tls.interfaces import (
    IChallengeResponder,
    ICertificateStore,
    IDirectoryStore,
    IIssuer,
    IOnDemandPolicy,
)
from mproxy.tls.ondemand import OnDemandChecker
from mproxy.tls.store import CertificateStore
from mproxy.tls.testing import FakeIssuer


class ProvidesTests(SynchronousTestCase):
    def test_issuers(self) -> None:
        """
        L{AcmeIssuer} and the test L{FakeIssuer} are L{IIssuer}s.
        """
        store = CertificateStore(self.mktemp()).for_directory("https://ca.test/dir")
        self.assertTrue(verifyObject(IIssuer, AcmeIssuer("https://ca.test/dir", store, ChallengeStore())))
        self.assertTrue(verifyObject(IIssuer, FakeIssuer(Clock())))

    def test_stores(self) -> None:
        """
        The on-disk store and its per-directory stores provide the store
        interfaces.
        """
        store = CertificateStore(self.mktemp())
        self.assertTrue(verifyObject(ICertificateStore, store))
        self.assertTrue(verifyObject(IDirectoryStore, store.for_directory("https://ca.test/dir")))

    def test_challengesAndPolicy(self) -> None:
        """
        L{ChallengeStore} answers challenges; L{OnDemandChecker} is the
        on-demand policy.
        """
        self.assertTrue(verifyObject(IChallengeResponder, ChallengeStore()))
        self.assertTrue(verifyObject(IOnDemandPolicy, OnDemandChecker(Clock())))
