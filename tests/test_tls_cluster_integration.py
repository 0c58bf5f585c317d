"""
Certificates shared through Redis, end to end: two or three real C{mproxy
run} nodes on 127.0.0.1 (different ports) naming the same Debian
C{redis-server}, a real upstream, and Debian's pebble validating challenges
against one chosen node's port.  Clients connect to each node with SNI
app1.test and trust only pebble's root.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from mproxy.testing import MproxyProcess, listen_upstream
from tests.pebble import PEBBLE_SKIP, LoopbackDNS, Pebble, free_port
from tests.redisserver import REDIS_SKIP, RedisServer
from tests.test_tls_integration import https_get, sleep


def serial_within(port: int, cafile: str, timeout: float, differs_from: int | None = None) -> tuple[float, int]:
    """
    Blocking: poll node C{port} with new connections until it serves a
    verifying certificate for app1.test (other than C{differs_from}).
    Returns (seconds waited, serial).
    """
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < timeout:
        try:
            status, body, serial, _ = https_get(port, "app1.test", cafile)
            if status == 200 and serial != differs_from:
                return time.monotonic() - started, serial
            last = serial
        except (ssl.SSLError, OSError) as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"node on {port}: no new verifying certificate within {timeout}s: {last!r}")


class Prober:
    """
    A thread making new HTTPS connections to every node in turn, counting
    failures and recording the serials each node served.
    """

    def __init__(self, ports: list[int], cafile: str) -> None:
        self.ports = ports
        self.cafile = cafile
        self.requests = 0
        self.failures: list[str] = []
        self.serials: dict[int, list[int]] = {p: [] for p in ports}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for port in self.ports:
                self.requests += 1
                try:
                    status, body, serial, _ = https_get(port, "app1.test", self.cafile)
                    if status != 200 or body != b"app1":
                        self.failures.append(f"{port}: {status} {body[:40]!r}")
                    elif serial not in self.serials[port]:
                        self.serials[port].append(serial)
                except (ssl.SSLError, OSError) as e:
                    self.failures.append(f"{port}: {e!r}")
            time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


class ClusterIntegration(TestCase):
    """
    Per test: redis-server, an upstream, a loopback DNS server and pebble;
    C{node(name)} starts an mproxy node on its own fixed ports.
    """

    skip = PEBBLE_SKIP or REDIS_SKIP
    timeout = 120
    validity: int | None = None
    nodes = ("a", "b", "c")

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        self.redis = RedisServer(os.path.join(self.work, "redis"), password="s3cret")
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.ports = {n: (free_port(), free_port()) for n in self.nodes}
        self.app, port = listen_upstream(reactor, "app1")
        self.addCleanup(port.stopListening)
        self.upstream = f"127.0.0.1:{port.getHost().port}"
        self.procs: dict[str, MproxyProcess] = {}

    def start_pebble(self, http_port: int, tls_port: int) -> None:
        dns = LoopbackDNS(reactor)
        self.addCleanup(dns.stop)
        self.pebble = Pebble(
            os.path.join(self.work, "pebble"),
            http_port=http_port,
            tls_port=tls_port,
            dns_port=dns.port,
            validity=self.validity,
        )
        self.pebble.start()
        self.addCleanup(self.pebble.stop)
        self.root = os.path.join(self.work, "root.pem")
        with open(self.root, "wb") as f:
            f.write(self.pebble.root_pem())

    @inlineCallbacks
    def node(self, name: str) -> Any:
        http_port, https_port = self.ports[name]
        p = MproxyProcess(
            reactor,
            os.path.join(self.work, name),
            http_port=http_port,
            https_port=https_port,
            extra_args=(
                "--acme-directory", self.pebble.directory_url,
                "--acme-ca-bundle", self.pebble.ca_bundle,
                "--cluster", self.redis.url,
                "--cluster-node", name,
            ),
        )  # fmt: skip
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        self.procs[name] = p
        return p

    @inlineCallbacks
    def deploy(self, name: str) -> Any:
        r = yield self.procs[name].command("deploy", self.upstream, "--host", "app1.test", "--tls")
        self.assertEqual(r.status, 0, r.err)

    def https(self, name: str) -> int:
        return self.ports[name][1]

    def http(self, name: str) -> int:
        return self.ports[name][0]

    def pebble_log(self) -> bytes:
        with open(self.pebble.log_path, "rb") as f:
            return f.read()

    def orders(self) -> int:
        return self.pebble_log().count(b"Added order")

    def order_story(self) -> str:
        """
        What each node said about its certificate orders, and pebble's
        order and validation lines: the account of a run with an
        unexpected number of orders.
        """
        lines = []
        for name, p in sorted(self.procs.items()):
            for r in p.records:
                text = repr(r)
                if any(w in text.lower() for w in ("order", "certificate", "challenge", "lock")):
                    lines.append(f"{name}: {text[:400]}")
        for line in self.pebble_log().splitlines():
            if any(w in line for w in (b"order", b"Order", b"validat", b"challenge")):
                lines.append("pebble: " + line.decode(errors="replace")[:300])
        return "\n".join(lines[-200:])

    def issued(self) -> int:
        return self.pebble_log().count(b"Issued certificate serial")

    def shared_issuer(self) -> str | None:
        """
        The node named in the store as having ordered app1.test's certificate.
        """
        client = self.redis.client()
        for key in client.scan_iter(match="mproxy:dir:*:cert:app1.test"):
            node = client.hget(key, "node")
            return node.decode() if node else None
        return None

    @inlineCallbacks
    def listing(self, name: str) -> Any:
        r = yield self.procs[name].command("list")
        self.assertEqual(r.status, 0, r.err)
        return r.out


class SharedIssuanceTests(ClusterIntegration):
    @inlineCallbacks
    def test_http01_at_one_node_both_serve_then_a_third_joins(self) -> Any:
        """
        Pebble's HTTP-01 validation reaches node B only: the certificate
        issues with one order (placed by whichever node took the lock), both
        nodes serve the same serial within 15 s, list names the issuing
        node; a third node joining later serves it without a new order.
        """
        self.start_pebble(http_port=self.http("b"), tls_port=free_port())
        yield self.node("a")
        yield self.node("b")
        started = time.monotonic()
        yield self.deploy("a")
        yield self.deploy("b")
        _, serial_a = yield deferToThread(serial_within, self.https("a"), self.root, 15)
        _, serial_b = yield deferToThread(serial_within, self.https("b"), self.root, 15)
        both = time.monotonic() - started
        print(f"MEASURED cluster HTTP-01: both nodes serve one serial after {both:.2f}s")
        self.assertEqual(serial_a, serial_b)
        self.assertLess(both, 15)
        self.assertEqual((self.orders(), self.issued()), (1, 1))
        issuer = self.shared_issuer()
        self.assertIn(issuer, ("a", "b"))
        for name in ("a", "b"):
            out = yield self.listing(name)
            self.assertIn(f"issued by {issuer}", out)

        yield self.node("c")
        yield self.deploy("c")
        waited, serial_c = yield deferToThread(serial_within, self.https("c"), self.root, 15)
        print(f"MEASURED cluster: a joining node serves the shared serial after {waited:.2f}s")
        self.assertEqual(serial_c, serial_a)
        yield sleep(1)
        self.assertEqual(self.orders(), 1)


class SharedTLSALPNTests(ClusterIntegration):
    nodes = ("a", "b")

    @inlineCallbacks
    def test_tls_alpn01_answered_by_the_other_node(self) -> Any:
        """
        HTTP-01 blocked, pebble's TLS-ALPN-01 validation reaches node B
        only, node A orders: B answers with the challenge certificate A
        published, the certificate issues once, both serve it.
        """
        self.start_pebble(http_port=free_port(), tls_port=self.https("b"))
        yield self.node("a")
        yield self.node("b")
        started = time.monotonic()
        yield self.deploy("a")
        _, serial_a = yield deferToThread(serial_within, self.https("a"), self.root, 15)
        yield self.deploy("b")
        _, serial_b = yield deferToThread(serial_within, self.https("b"), self.root, 15)
        both = time.monotonic() - started
        print(f"MEASURED cluster TLS-ALPN-01 at the other node: both serve after {both:.2f}s,"
              f" pebble orders {self.orders()} (the first, HTTP-01, fails), issued {self.issued()}")
        self.assertEqual(serial_a, serial_b)
        self.assertEqual((self.issued(), self.shared_issuer()), (1, "a"))
        self.assertLessEqual(self.orders(), 2)


class ClusterRenewalTests(ClusterIntegration):
    nodes = ("a", "b")
    validity = 10

    @inlineCallbacks
    def test_renewed_once_per_cycle_both_serve_every_serial(self) -> Any:
        """
        10-second certificates: over about three renewal cycles each
        renewal is one order cluster-wide, both nodes serve every new
        serial, and new HTTPS connections to both nodes never fail.
        """
        self.start_pebble(http_port=self.http("b"), tls_port=self.https("a"))
        yield self.node("a")
        yield self.node("b")
        yield self.deploy("a")
        yield self.deploy("b")
        yield deferToThread(serial_within, self.https("a"), self.root, 15)
        yield deferToThread(serial_within, self.https("b"), self.root, 15)
        prober = Prober([self.https("a"), self.https("b")], self.root)
        prober.start()
        yield sleep(22)
        yield deferToThread(prober.stop)
        for _ in range(50):  # an order placed just before the end completes
            if self.orders() == self.issued():
                break
            yield sleep(0.1)
        seen = set(prober.serials[self.https("a")]) | set(prober.serials[self.https("b")])
        print(f"MEASURED cluster renewal: {prober.requests} requests, {len(prober.failures)} failed,"
              f" {len(seen)} serials seen, pebble orders {self.orders()}, issued {self.issued()}")
        self.assertEqual(prober.failures, [])
        self.assertGreaterEqual(len(seen), 3)
        self.assertEqual(self.orders(), self.issued())
        # every serial but perhaps the one issued last was served by both
        self.assertLessEqual(self.issued(), len(seen) + 1)
        a, b = prober.serials[self.https("a")], prober.serials[self.https("b")]
        self.assertEqual(set(a[:-1]) - set(b), set())
        self.assertEqual(set(b[:-1]) - set(a), set())


class Blackhole:
    """
    A TCP listener that accepts and never answers (an HTTP-01 validation
    that hangs), until closed.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class LockHolderDiesTests(ClusterIntegration):
    nodes = ("a", "b")

    def lock_holder(self) -> str | None:
        client = self.redis.client()
        for key in client.scan_iter(match="mproxy:dir:*:lock:app1.test"):
            value = client.get(key)
            return value.decode() if value else None
        return None

    @inlineCallbacks
    def test_kill_lock_holder_mid_order(self) -> Any:
        """
        Node A takes the lock and orders, its validation hangs, A is killed
        with SIGKILL: after the lock expires node B completes issuance.
        """
        hole = Blackhole()
        self.addCleanup(hole.close)
        self.start_pebble(http_port=hole.port, tls_port=self.https("b"))
        a = yield self.node("a")
        yield self.node("b")
        yield self.deploy("a")
        for _ in range(100):
            if self.lock_holder() == "a" and hole.accepted:
                break
            yield sleep(0.05)
        self.assertEqual(self.lock_holder(), "a")
        out = yield self.listing("a")
        self.assertIn("ordering on a", out)
        yield self.deploy("b")
        out = yield self.listing("b")
        self.assertIn("ordering on a", out)
        a.process.signalProcess("KILL")
        killed = time.monotonic()
        hole.close()
        waited, _ = yield deferToThread(serial_within, self.https("b"), self.root, 45)
        print(f"MEASURED cluster: node B issued {time.monotonic() - killed:.2f}s after the lock"
              f" holder was killed (lock TTL 15 s), pebble orders {self.orders()}")
        self.assertEqual((self.issued(), self.shared_issuer()), (1, "b"))


class StoreDownTests(ClusterIntegration):
    nodes = ("a", "b")
    validity = 45

    @inlineCallbacks
    def test_redis_down(self) -> Any:
        """
        Redis stopped: both nodes serve with zero failures, list says the
        store is unreachable, deploys work, a restarted node serves its local
        copy; the renewal that fell due meanwhile completes once Redis is
        back, and both nodes serve the new serial.
        """
        self.start_pebble(http_port=self.http("b"), tls_port=self.https("a"))
        a = yield self.node("a")
        yield self.node("b")
        yield self.deploy("a")
        yield self.deploy("b")
        _, first = yield deferToThread(serial_within, self.https("a"), self.root, 15)
        yield deferToThread(serial_within, self.https("b"), self.root, 15)
        self.redis.stop()
        prober = Prober([self.https("a"), self.https("b")], self.root)
        prober.start()
        yield sleep(6)
        out = yield self.listing("b")
        self.assertIn("cluster store unreachable", out)
        yield self.deploy("b")
        yield deferToThread(prober.stop)
        print(f"MEASURED cluster, Redis down: {prober.requests} requests, {len(prober.failures)} failed")
        self.assertEqual(prober.failures, [])
        yield a.stop()
        yield a.start()
        _, again = yield deferToThread(serial_within, self.https("a"), self.root, 10)
        self.assertEqual(again, first)
        # wait for the renewal to fall due and find the store unreachable
        for _ in range(600):
            if any(str(r.get("msg", "")).startswith("Certificate for app1.test not ordered")
                   for p in self.procs.values() for r in p.records):
                break
            yield sleep(0.1)
        else:
            self.fail("the renewal never fell due")
        self.redis.start()
        back = time.monotonic()
        _, new_a = yield deferToThread(serial_within, self.https("a"), self.root, 30, first)
        _, new_b = yield deferToThread(serial_within, self.https("b"), self.root, 30, first)
        print(f"MEASURED cluster: renewal done and served by both {time.monotonic() - back:.2f}s"
              f" after Redis came back, issued {self.issued()}")
        self.assertEqual(new_a, new_b)
        self.assertEqual(self.issued(), 2)


class ClusterOnDemandTests(ClusterIntegration):
    nodes = ("a", "b")

    @inlineCallbacks
    def test_on_demand_decisions_shared(self) -> Any:
        """
        On-demand TLS on two nodes: a name approved and issued through node
        A is served by node B without asking the application again; a name
        denied through A is refused by B without asking again.
        """
        from tests.test_tls_integration import HostPolicy, handshake_refused, wait_for_https

        self.start_pebble(http_port=self.http("b"), tls_port=self.https("a"))
        policy = HostPolicy({"allowed.test"})
        port = reactor.listenTCP(0, Site(policy), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for name in ("a", "b"):
            yield self.node(name)
            r = yield self.procs[name].command(
                "deploy", "ondemand", "--target", f"127.0.0.1:{port.getHost().port}",
                "--tls", "--tls-on-demand-url", "/allow", "--health-check-path", "/",
            )  # fmt: skip
            self.assertEqual(r.status, 0, r.err)
        _, (status, _, serial_a, _) = yield deferToThread(wait_for_https, self.https("a"), "allowed.test", self.root)
        self.assertEqual(status, 200)
        waited, (_, _, serial_b, _) = yield deferToThread(
            wait_for_https, self.https("b"), "allowed.test", self.root, 5.0
        )
        print(f"MEASURED cluster on-demand: node B serves the name approved through A after {waited:.2f}s")
        self.assertEqual(serial_b, serial_a)
        refused = yield deferToThread(handshake_refused, self.https("a"), "denied.test")
        self.assertTrue(refused)
        yield sleep(1)
        refused = yield deferToThread(handshake_refused, self.https("b"), "denied.test")
        self.assertTrue(refused)
        yield sleep(1)
        asked = [host for host, _, _ in policy.checks]
        self.assertEqual((asked.count("allowed.test"), asked.count("denied.test")), (1, 1))
        self.assertEqual(self.issued(), 1)


class FailingNameTests(ClusterIntegration):
    nodes = ("a", "b")

    @inlineCallbacks
    def test_failing_name_backs_off_cluster_wide(self) -> Any:
        """
        Neither challenge can succeed (pebble reaches no node): the cluster
        tries HTTP-01 and TLS-ALPN-01 once each and then both nodes wait out
        one backoff, instead of each node ordering on its own; list on both
        says why.
        """
        self.start_pebble(http_port=free_port(), tls_port=free_port())
        yield self.node("a")
        yield self.node("b")
        yield self.deploy("a")
        yield self.deploy("b")
        # long enough for a node told "a is ordering" to look again (lock TTL 15 s)
        yield sleep(20)
        print(f"MEASURED cluster, failing name: pebble orders in 20 s: {self.orders()}")
        self.assertEqual(self.orders(), 2, self.order_story())
        outs = []
        for name in ("a", "b"):
            out = yield self.listing(name)
            outs.append(out)
        self.assertTrue(any("the last order on " in out for out in outs), outs)
        self.assertTrue(all("pending (" in out for out in outs), outs)
