"""
The first TLS handshake in a worker for an on-demand name whose certificate
the supervisor has but has not sent yet: the worker holds the ClientHello
(L{mproxy.workers.certs.HelloGate}), asks the supervisor
(L{mproxy.workers.certs.CertificateMirror.wait_for}) and answers the
handshake with that certificate.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport
from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.spec import ServiceOptions, TargetOptions
from mproxy.state import ServiceRecord, Slot
from mproxy.tls.certs import certified_pem
from mproxy.tls.testing import make_ca, make_certificate
from mproxy.workers.certs import (
    ASK_AGAIN_AFTER,
    CertificateMirror,
    client_hello_server_name,
)
from mproxy.workers.pool import WorkerPool
from tests.test_workers import MemorySpawner


def client_hello(server_name: str | None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO,
                                                    bytes]:
    """
    A TLS client (not verifying) and the ClientHello it sends first.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return client, incoming, outgoing, outgoing.read()


def pem(cert: Any) -> list[str]:
    return [x.decode() for x in certified_pem(cert)]


ON_DEMAND = ServiceOptions(tls_enabled=True, tls_on_demand_url="http://127.0.0.1:1/allow")


class ClientHelloTests(SynchronousTestCase):
    def test_server_name(self) -> None:
        *_, hello = client_hello("Shop.Example.TEST")
        self.assertEqual(client_hello_server_name(hello), (True, "shop.example.test"))
        for cut in (0, 3, 5, 40, len(hello) - 1):
            self.assertEqual(client_hello_server_name(hello[:cut]), (False, None))

    def test_no_name_or_not_tls(self) -> None:
        *_, hello = client_hello(None)
        self.assertEqual(client_hello_server_name(hello), (True, None))
        self.assertEqual(client_hello_server_name(b"GET / HTTP/1.1\r\n"), (True, None))
        self.assertEqual(client_hello_server_name(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
                         (True, None))
        self.assertEqual(client_hello_server_name(b"\x16\x03\x01\x00\x04\x01\x00\x00\xff"),
                         (True, None))


class WaitForTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 0.0
        self.fetches: list[tuple[str, Deferred[Any]]] = []
        self.services = {"shop.test": ("shop", ON_DEMAND),
                         "plain.test": ("plain", ServiceOptions(tls_enabled=True))}

        def fetch(name: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.fetches.append((name, d))
            return d

        self.mirror = CertificateMirror(self.services.get, lambda name: None,
                                        now=lambda: self.now, fetch=fetch)
        self.cert = make_certificate(["shop.test"], issuer=make_ca())

    def test_held_until_the_supervisor_answers(self) -> None:
        first = self.mirror.wait_for("shop.test")
        second = self.mirror.wait_for("shop.test")
        assert first is not None and second is not None
        self.assertEqual([n for n, _ in self.fetches], ["shop.test"])
        self.assertIsNone(self.mirror.select("shop.test"))  # not asked again meanwhile
        self.fetches[0][1].callback(pem(self.cert))
        self.successResultOf(first)
        self.successResultOf(second)
        found = self.mirror.select("shop.test")
        assert found is not None
        self.assertEqual(found.dns_names(), ["shop.test"])
        self.assertIsNone(self.mirror.wait_for("shop.test"))  # here now

    def test_none_not_asked_again_at_once(self) -> None:
        d = self.mirror.wait_for("shop.test")
        self.fetches[0][1].callback(None)
        self.successResultOf(d)
        self.assertIsNone(self.mirror.wait_for("shop.test"))
        self.now = ASK_AGAIN_AFTER
        self.assertIsNotNone(self.mirror.wait_for("shop.test"))
        self.assertEqual(len(self.fetches), 2)

    def test_only_on_demand_names_without_a_certificate(self) -> None:
        for name in ("plain.test", "unknown.test", None):
            self.assertIsNone(self.mirror.wait_for(name))
        self.mirror.update({"default": None, "static": {},
                            "hosts": [["", "shop.test", pem(self.cert)]],
                            "directories": ["", ""]})
        self.assertIsNone(self.mirror.wait_for("shop.test"))
        self.assertEqual(self.fetches, [])

    def test_fetched_kept_until_a_snapshot_has_it(self) -> None:
        d = self.mirror.wait_for("shop.test")
        self.fetches[0][1].callback(pem(self.cert))
        self.successResultOf(d)
        empty = {"default": None, "static": {}, "hosts": [], "directories": ["", ""]}
        self.mirror.update(empty)  # an older snapshot
        self.assertIsNotNone(self.mirror.select("shop.test"))
        self.mirror.update(dict(empty, hosts=[["", "shop.test", pem(self.cert)]]))
        self.assertEqual(self.mirror._fetched, {})


class FirstHandshakeTests(SynchronousTestCase):
    """
    A worker (in memory, with its real HTTPS factory) and a supervisor that
    has the certificate of an on-demand name it has not sent yet.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawner = MemorySpawner(self.reactor)
        self.cert = make_certificate(["shop.test"], issuer=make_ca())
        self.asked: list[str] = []

        def select(name: str) -> Any:
            self.asked.append(name)
            return self.cert if name == "shop.test" else None

        self.pool = WorkerPool(self.reactor, ListLogger(), self.spawner, 1,
                               on_ask_certificate=select)
        self.pool.startService()
        self.pool.apply([ServiceRecord("shop", ON_DEMAND, TargetOptions(),
                                       Slot(("app-1:3000",)))], 30.0)
        self.pool.start_generation()
        self.spawner.flush()
        [self.server] = self.spawner.servers.values()

    def handshake(self, name: str) -> ssl.SSLObject | Exception:
        client, incoming, outgoing, hello = client_hello(name)
        protocol = self.server.https.buildProtocol(None)
        transport = FakeTransport(protocol, isServer=True)
        protocol.makeConnection(transport)
        transport.protocol.dataReceived(hello)
        for _ in range(10):
            self.spawner.flush()
            sent = transport.stream
            transport.stream = []
            incoming.write(b"".join(sent))
            try:
                client.do_handshake()
                return client
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                return e
            more = outgoing.read()
            if more:
                transport.protocol.dataReceived(more)
        return AssertionError("the handshake did not end")

    def test_first_handshake_gets_the_supervisors_certificate(self) -> None:
        result = self.handshake("shop.test")
        self.assertIsInstance(result, ssl.SSLObject)
        assert isinstance(result, ssl.SSLObject)
        from cryptography import x509

        leaf = x509.load_der_x509_certificate(result.getpeercert(binary_form=True))
        self.assertEqual(leaf.serial_number, self.cert.chain[0].serial_number)
        self.assertEqual(self.asked, ["shop.test"])

    def test_name_the_supervisor_has_nothing_for_is_refused(self) -> None:
        self.assertIsInstance(self.handshake("other.test"), ssl.SSLError)
        self.assertEqual(self.asked, ["other.test"])
