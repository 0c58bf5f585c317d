"""
Tests for L{mproxy.tls.wiring}.
"""

import os

from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mproxy.logging import ListLogger
from mproxy.spec import ServiceOptions
from mproxy.tls.acme import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
from mproxy.tls.service import CertificateService
from mproxy.tls.wiring import build_certificate_service, https_server_factory, router_lookup


class FakeService:
    def __init__(self, name, options):
        self.name = name
        self.options = options


class FakeRouter:
    def __init__(self, services):
        self.services = services

    def root_service_for(self, host):
        return self.services.get(host)


class Config:
    def __init__(self, state_dir, **kw):
        self.state_dir = state_dir
        self.acme_directory = kw.get("acme_directory", LETS_ENCRYPT)
        self.acme_email = kw.get("acme_email", "")
        self.acme_ca_bundle = kw.get("acme_ca_bundle", "")
        self.cluster = kw.get("cluster", "")
        self.cluster_ca_bundle = ""
        self.cluster_node = kw.get("cluster_node", "")


class WiringTests(SynchronousTestCase):
    def test_routerLookup(self) -> None:
        """
        The router's root service becomes (name, options).
        """
        opts = ServiceOptions(hosts=["a.test"], tls_enabled=True)
        lookup = router_lookup(FakeRouter({"a.test": FakeService("web", opts)}))
        self.assertEqual(lookup("a.test"), ("web", opts))
        self.assertIsNone(lookup("b.test"))

    def test_build(self) -> None:
        """
        The service is built from the server config without side effects;
        staging maps to Let's Encrypt staging only for Let's Encrypt.
        """
        state = self.mktemp()
        logger = ListLogger()
        certs = build_certificate_service(Clock(), Config(state), FakeRouter({}), logger)
        self.assertIsInstance(certs, CertificateService)
        self.assertIs(certs.logger, logger)
        self.assertEqual(certs.directories.production, LETS_ENCRYPT)
        self.assertEqual(certs.directories.staging, LETS_ENCRYPT_STAGING)
        self.assertFalse(os.path.exists(state))
        custom = build_certificate_service(
            Clock(), Config(state, acme_directory="https://ca.internal/dir"), FakeRouter({}), logger
        )
        self.assertEqual(custom.directories.staging, "https://ca.internal/dir")
        staging = ServiceOptions(hosts=["a.test"], tls_enabled=True, tls_staging=True)
        self.assertEqual(custom.directories.for_options(staging), "https://ca.internal/dir")

    def test_httpsFactory(self) -> None:
        """
        The HTTPS factory is a TLS wrapper around the site.
        """
        certs = build_certificate_service(Clock(), Config(self.mktemp()), FakeRouter({}), ListLogger())
        self.assertIsInstance(https_server_factory(certs, Site(Resource())), TLSMemoryBIOFactory)


class ClusterWiringTests(SynchronousTestCase):
    def test_cluster(self) -> None:
        """
        With C{--cluster} the service shares through Redis: the store, the
        challenges, an order guard and the listener hooks; building it does
        not connect; the node defaults to the host name.
        """
        import socket

        from mproxy.tls.clusterstore import ClusterCertificateStore, ClusterChallenges, ClusterGuard

        config = Config(self.mktemp(), cluster="redis://:pw@127.0.0.1:1/0", cluster_node="web-1")
        certs = build_certificate_service(Clock(), config, FakeRouter({}), ListLogger())
        self.assertEqual((certs.cluster.node, certs.cluster.reachable), ("web-1", None))
        self.assertIsInstance(certs.store, ClusterCertificateStore)
        self.assertIsInstance(certs.challenges, ClusterChallenges)
        self.assertIsInstance(certs.orders.guard, ClusterGuard)
        self.assertEqual(len(certs.start_hooks), 1)
        default = build_certificate_service(
            Clock(), Config(self.mktemp(), cluster="redis://127.0.0.1:1/0"), FakeRouter({}), ListLogger()
        )
        self.assertEqual(default.cluster.node, socket.gethostname())
        plain = build_certificate_service(Clock(), Config(self.mktemp()), FakeRouter({}), ListLogger())
        self.assertIsNone(plain.cluster)
        self.assertIsNone(plain.orders.guard)
