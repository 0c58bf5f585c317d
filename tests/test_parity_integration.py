"""
End-to-end tests of the server with worker processes behaving as the
single process does: an upgrade during a deploy, a forced deploy's targets
before their first health check, the first handshake of an on-demand name,
HTTP/3 after its worker died.  The real C{mproxy run}, real upstreams and
clients on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mproxy.testing import LoadClient, MproxyProcess, listen_upstream


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def records(proxy: MproxyProcess, msg: str) -> list[dict[str, Any]]:
    return [r for r in proxy.records if r.get("msg") == msg]


class UpgradeDuringDeployTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def wait_until(self, check: Any, what: str, seconds: float = 30.0) -> Any:
        for _ in range(int(seconds / 0.05)):
            if check():
                return
            yield sleep(0.05)
        self.fail(f"timed out waiting for {what}: {getattr(self, 'proxy', None) and [r for r in self.proxy.records if r.get('msg') != 'Request'][-15:]}")

    @inlineCallbacks
    def test_upgrade_waits_for_a_draining_deploy(self) -> Any:
        """
        C{mproxy upgrade} started while a deploy drains a request waits for
        the deploy to end: the deploy exits 0 with its usual summary, a
        command sent meanwhile is held and carried out by the new server,
        the upgrade exits 0, and no request of the load fails.
        """
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        web1, port1 = listen_upstream(reactor, "web-1")
        self.addCleanup(port1.stopListening)
        web2, port2 = listen_upstream(reactor, "web-2")
        self.addCleanup(port2.stopListening)
        web3, port3 = listen_upstream(reactor, "web-3")
        self.addCleanup(port3.stopListening)
        proxy = MproxyProcess(reactor, self.mktemp(), extra_args=("--workers", "2"))
        yield proxy.start()
        self.addCleanup(proxy.stop)
        self.proxy = proxy
        pid = proxy.process.pid
        for service, port, host in (("app", port3, "example.com"), ("slow", port1, "slow.test")):
            result = yield proxy.command("deploy", service, "--target",
                                         f"127.0.0.1:{port.getHost().port}", "--host", host)
            self.assertEqual(result.status, 0, result.err)
        load = LoadClient(reactor, proxy.http_port, clients=10, interval=0.01)
        load.start()
        self.addCleanup(lambda: load.stop() if load._running else None)
        yield load.until(30)
        # one request in flight on the old target, for as long as the test wants
        web1.hold()
        self.addCleanup(web1.release)
        slow = Agent(reactor).request(b"GET", proxy.url("/").encode(),
                                      Headers({b"Host": [b"slow.test"]}))
        yield self.wait_until(lambda: len(web1.held) == 1, "the request on web-1")
        deploy = proxy.command("deploy", "slow", "--target", f"127.0.0.1:{port2.getHost().port}",
                               "--host", "slow.test", "--drain-timeout", "60s")
        yield self.wait_until(lambda: records(proxy, "Deploying"), "the deploy")
        upgrade = proxy.command("upgrade")
        yield self.wait_until(
            lambda: records(proxy, "Upgrade: waiting for control commands"),
            "the upgrade to wait for the deploy", 60)
        listing = proxy.command("list", "--json")
        yield self.wait_until(
            lambda: records(proxy, "Control command refused: an upgrade is in progress"),
            "the list to be held", 60)
        self.assertFalse(deploy.called)
        self.assertFalse(upgrade.called)
        web1.release()
        deployed = yield deploy
        self.assertEqual(deployed.status, 0, deployed.out + deployed.err)
        self.assertIn("drained 1 request", deployed.out)
        self.assertEqual(deployed.err, "")
        response = yield slow
        self.assertEqual(response.code, 200)
        self.assertEqual((yield readBody(response)), b"web-1")
        upgraded = yield upgrade
        self.assertEqual(upgraded.status, 0, upgraded.out + upgraded.err)
        self.assertIn("Waiting for the control commands in progress to finish: deploy slow",
                      upgraded.out)
        self.assertIn(f"(pid {pid})", upgraded.out)
        listed = yield listing
        self.assertEqual(listed.status, 0, listed.out + listed.err)
        self.assertIn("Waiting for the upgrade in progress to finish", listed.out)
        self.assertIn(f"127.0.0.1:{port2.getHost().port}", listed.out)
        ok = load.report().ok
        yield load.until(ok + 30)
        report = yield load.stop()
        self.assertEqual(report.failures, ())
        self.assertEqual(proxy.process.pid, pid)
        self.assertEqual(len(records(proxy, "Upgrade done")), 1)
        print(f"MEASURED upgrade during a deploy: {report.ok} requests, "
              f"{len(report.failures)} failed")


class OnDemandFirstHandshakeTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_first_handshake_gets_the_stored_certificate(self) -> Any:
        """
        An on-demand name whose certificate is in the supervisor's store:
        the very first handshake (in whichever worker) gets it, as with one
        process.
        """
        import os

        from twisted.internet.threads import deferToThread

        from mproxy.tls.store import CertificateStore
        from mproxy.tls.testing import make_ca, make_certificate, pem_pair
        from tests.test_tls_integration import https_get

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        ca_path = os.path.join(work, "ca.pem")
        with open(ca_path, "wb") as f:
            f.write(pem_pair(ca)[0])
        directory = "http://127.0.0.1:1/directory"
        app, port = listen_upstream(reactor, "shop")
        self.addCleanup(port.stopListening)
        proxy = MproxyProcess(reactor, os.path.join(work, "mproxy"),
                              extra_args=("--workers", "2", "--acme-directory", directory))
        certificates = {}
        for name in ("shop.test", "blog.test"):
            certificate = make_certificate([name], issuer=ca)
            certificates[name] = certificate.chain[0].serial_number
            chain, key = pem_pair(certificate)
            CertificateStore(proxy.state_dir).for_directory(directory).save_certificate(
                name, key, chain)
        yield proxy.start()
        self.addCleanup(proxy.stop)
        result = yield proxy.command(
            "deploy", "shop", "--target", f"127.0.0.1:{port.getHost().port}", "--tls",
            "--tls-on-demand-url", "http://127.0.0.1:1/allow")
        self.assertEqual(result.status, 0, result.err)
        for name in ("shop.test", "blog.test"):
            status, body, serial, _alpn = yield deferToThread(
                https_get, proxy.https_port, name, ca_path)
            self.assertEqual((status, body, serial), (200, b"shop", certificates[name]))


class HTTP3WorkerReplacedTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_replacement_serves_http3(self) -> Any:
        """
        The worker serving HTTP/3 is killed: its replacement serves the UDP
        socket, and new QUIC connections are answered again (those of the
        dead worker are lost).
        """
        import os
        import signal

        from mproxy.testing import H3Client
        from mproxy.tls.testing import make_ca, make_certificate, pem_pair

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        paths = {}
        chain, key = pem_pair(make_certificate(["h3.test"], issuer=ca))
        for name, data in (("ca.pem", pem_pair(ca)[0]), ("cert.pem", chain), ("key.pem", key)):
            paths[name] = os.path.join(work, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        app, port = listen_upstream(reactor, "h3-app")
        self.addCleanup(port.stopListening)
        proxy = MproxyProcess(reactor, os.path.join(work, "mproxy"),
                              extra_args=("--http3", "--workers", "2"))
        yield proxy.start()
        self.addCleanup(proxy.stop, signal.SIGKILL)
        result = yield proxy.command(
            "deploy", "app", "--target", f"127.0.0.1:{port.getHost().port}", "--host", "h3.test",
            "--tls", "--tls-certificate-path", paths["cert.pem"],
            "--tls-private-key-path", paths["key.pem"])
        self.assertEqual(result.status, 0, result.err)

        @inlineCallbacks
        def h3_get() -> Any:
            client = H3Client(reactor, "127.0.0.1", proxy.https_port, server_name="h3.test",
                              cafile=paths["ca.pem"])
            try:
                yield client.connect()
                response = yield client.request("GET", "/")
            finally:
                client.close()
            return response.status, response.body

        self.assertEqual((yield h3_get()), (200, b"h3-app"))
        [started] = records(proxy, "Workers started")
        serving = started["pids"][0]  # slot 0 serves HTTP/3
        # twice: the first replacement is the standby worker, the second
        # one (the standby not started again yet) may be a new process
        for n in (1, 2):
            os.kill(serving, signal.SIGKILL)
            for _ in range(200):
                if len(records(proxy, "Worker replaced")) >= n:
                    break
                yield sleep(0.05)
            replaced = records(proxy, "Worker replaced")[n - 1]
            self.assertEqual((replaced["slot"], replaced["was"]), (0, serving))
            serving = replaced["pid"]
            for _ in range(3):
                self.assertEqual((yield h3_get()), (200, b"h3-app"))
