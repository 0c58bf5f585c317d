"""
Tests for L{mproxy.testing}, the testing kit itself: its public names, the
in-memory harness (control plane, data plane, network, time), the upstream
app, and the child-process helpers.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

import mproxy.testing
from mproxy.errors import DeployTimedOut
from mproxy.spec import HealthCheckConfig, TargetOptions
from mproxy.testing import (
    MemoryNetwork,
    MemoryTransport,
    ProxyHarness,
    UpstreamApp,
    child_env,
    run_mproxy,
)


# The README's example, word for word.
class DeployTests(SynchronousTestCase):
    def test_switch_drains_the_request_in_flight(self) -> None:
        harness = ProxyHarness()
        web1, web2 = harness.upstream("web-1"), harness.upstream("web-2")
        self.successResultOf(harness.deploy("app", web1, host="app.example"))

        web1.hold()  # web-1 leaves its next requests unanswered
        slow = harness.request(b"GET", b"/report", host="app.example")
        self.assertEqual(len(web1.held), 1)

        deploy = harness.deploy("app", web2, host="app.example")
        self.assertNoResult(deploy)  # switched, and draining web-1
        fresh = harness.request(b"GET", b"/", host="app.example")
        self.assertEqual(self.successResultOf(fresh).body, b"web-2")
        self.assertNoResult(slow)

        web1.release()
        self.assertEqual(self.successResultOf(slow).body, b"web-1")
        self.assertEqual(self.successResultOf(deploy).drained.requests, 1)


class ExportTests(SynchronousTestCase):
    def test_all(self) -> None:
        """
        The public names are pinned, and each one is there.
        """
        self.assertEqual(sorted(mproxy.testing.__all__), [
            "CommandProtocol", "CommandResult", "H3Client", "H3ConnectionLost", "H3Response",
            "LoadClient", "LoadReport", "MemoryNetwork",
            "MemoryTransport", "MemoryUpstream", "MproxyProcess", "ProxyHarness", "Response",
            "ServerProtocol", "UpstreamApp", "WebSocketClient", "WebSocketUpstream",
            "child_env", "decode_websocket_frames", "encode_websocket_frame", "listen_upstream",
            "listen_websocket_upstream", "open_websocket", "run_mproxy", "websocket_accept_key",
        ])
        for name in mproxy.testing.__all__:
            self.assertTrue(hasattr(mproxy.testing, name), name)

    def test_tests_use_public_names(self) -> None:
        """
        No test module imports a private name of the kit, nor from one of
        its private modules (except the kit's own tests).
        """
        here = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(os.listdir(here)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(here, name), encoding="utf-8") as f:
                for line in f:
                    if not name.startswith("test_testing"):
                        # the kit's own tests may test its private helpers
                        self.assertNotIn("from mproxy.testing._", line, name)
                    if "from mproxy.testing" in line and "import" in line:
                        names = line.split("import", 1)[1].replace("(", "").split(",")
                        private = [n.strip() for n in names if n.strip().startswith("_")]
                        self.assertEqual(private, [], f"{name}: {line.strip()}")


class ReadmeTests(SynchronousTestCase):
    def test_example_is_this_test(self) -> None:
        """
        The README's example is L{DeployTests} above, line for line, and
        imports only L{mproxy.testing} (and trial).
        """
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(os.path.dirname(here), "README.md"), encoding="utf-8") as f:
            readme = f.read()
        section = readme.split("## Testing your deploy tooling", 1)[1].split("\n## ", 1)[0]
        block = section.split("\n\n    ", 1)[1].split("\n\n`", 1)[0]
        example = "\n".join(line[4:] for line in ("    " + block).splitlines())
        with open(__file__.replace(".pyc", ".py"), encoding="utf-8") as f:
            source = f.read()
        ours = source.split("# The README's example, word for word.\n", 1)[1]
        ours = ours.split("\n\n\nclass ", 1)[0]
        self.assertIn(ours, example)
        imports = [line for line in example.splitlines() if "import" in line]
        self.assertEqual(imports, [
            "from twisted.trial.unittest import SynchronousTestCase",
            "from mproxy.testing import ProxyHarness",
        ])
        self.assertLess(len(example.splitlines()), 40)


class HarnessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = ProxyHarness()
        self.web = self.harness.upstream("web-1")

    def test_deploy_health_checks_the_upstream(self) -> None:
        """
        A deploy checks the upstream's health endpoint over the network, and
        the proxy then forwards to it, with the forwarding headers.
        """
        result = self.successResultOf(self.harness.deploy("app", self.web))
        self.assertEqual(result.targets, ("web-1:3000",))
        self.assertGreaterEqual(self.web.app.health_checks, 1)
        response = self.successResultOf(
            self.harness.request(b"GET", b"/x", host="anything.example")
        )
        self.assertEqual((response.code, response.body), (200, b"web-1"))
        self.assertEqual(response.header(b"x-upstream"), b"web-1")
        self.assertEqual(self.web.requests, 1)
        self.assertEqual(self.web.app.last_headers[b"x-forwarded-for"], [b"192.0.2.10"])
        self.assertEqual(self.web.app.last_headers[b"x-forwarded-host"], [b"anything.example"])

    def test_unrouted_host(self) -> None:
        """
        A host no service answers gets the proxy's 404.
        """
        self.successResultOf(self.harness.deploy("app", self.web, host="app.example"))
        response = self.successResultOf(self.harness.request(b"GET", b"/", host="other.example"))
        self.assertEqual(response.code, 404)
        self.assertEqual(self.web.requests, 0)

    def test_request_body_and_headers(self) -> None:
        """
        A request's body and headers reach the upstream.
        """
        self.successResultOf(self.harness.deploy("app", self.web))
        response = self.successResultOf(self.harness.request(
            b"POST", b"/echo", headers={b"x-token": b"t", b"x-many": [b"1", b"2"]},
            body=b"payload",
        ))
        self.assertEqual(response.body, b"payload")
        self.assertEqual(self.web.app.last_headers[b"x-token"], [b"t"])
        self.assertEqual(self.web.app.last_headers[b"x-many"], [b"1", b"2"])

    def test_unhealthy_upstream_times_out_and_old_keeps_serving(self) -> None:
        """
        A deploy to an unhealthy upstream waits for it, fails at its deploy
        timeout once that much time has passed, and the old upstream keeps
        serving.
        """
        self.successResultOf(self.harness.deploy("app", self.web))
        bad = self.harness.upstream("web-2")
        bad.healthy = False
        deploy = self.harness.deploy("app", bad, deploy_timeout=5)
        self.harness.advance(4)
        self.assertNoResult(deploy)
        self.assertGreaterEqual(bad.app.health_checks, 4)
        self.harness.advance(1)
        self.failureResultOf(deploy, DeployTimedOut)
        response = self.successResultOf(self.harness.request(b"GET", b"/"))
        self.assertEqual(response.body, b"web-1")

    def test_becomes_healthy_later(self) -> None:
        """
        Health checks repeat at their interval as time passes; the deploy
        fires once the upstream answers healthy.
        """
        self.web.healthy = False
        options = TargetOptions(health_check=HealthCheckConfig(interval=2))
        deploy = self.harness.deploy("app", self.web, target_options=options)
        self.harness.advance(3)
        self.assertEqual(self.web.app.health_checks, 2)
        self.web.healthy = True
        self.assertNoResult(deploy)
        self.harness.advance(1)
        self.successResultOf(deploy)
        self.assertEqual(self.web.app.health_checks, 3)

    def test_drain_deadline_cuts(self) -> None:
        """
        A request still held at the drain timeout is cut (504), and the
        deploy says so.
        """
        self.successResultOf(self.harness.deploy("app", self.web))
        self.web.hold()
        slow = self.harness.request(b"GET", b"/")
        deploy = self.harness.deploy("app", self.harness.upstream("web-2"), drain_timeout=3)
        self.harness.advance(2)
        self.assertNoResult(deploy)
        self.harness.advance(1)
        self.assertEqual(self.successResultOf(slow).code, 504)
        drained = self.successResultOf(deploy).drained
        self.assertEqual((drained.requests, drained.cut), (1, 1))
        self.assertEqual(self.web.held, ())

    def test_stopped_upstream(self) -> None:
        """
        An upstream that stopped listening refuses connections: the refusal
        ejects the lone target, and with no healthy target left the proxy
        answers 503 at once.
        """
        self.successResultOf(self.harness.deploy("app", self.web))
        self.web.stop()
        response = self.successResultOf(self.harness.request(b"GET", b"/"))
        self.assertEqual(response.code, 503)

    def test_unknown_target_fails_health(self) -> None:
        """
        A target address that names no host on the network never becomes
        healthy: its health error says the lookup failed.
        """
        deploy = self.harness.deploy("app", "nowhere:3000", deploy_timeout=2)
        self.harness.advance(2)
        failure = self.failureResultOf(deploy, DeployTimedOut)
        self.assertIn("DNS lookup failed", str(failure.value))

    def test_custom_app(self) -> None:
        """
        An upstream can serve any resource (which answers the health check
        itself).
        """

        class App(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"custom " + request.path

        custom = self.harness.upstream("custom", port=8080, app=App())
        self.assertEqual(custom.address, "custom:8080")
        self.successResultOf(self.harness.deploy("app", custom))
        response = self.successResultOf(self.harness.request(b"GET", b"/page"))
        self.assertEqual(response.body, b"custom /page")

    def test_restore(self) -> None:
        """
        With a state file, a second harness restores what the first one
        deployed and serves it at once.
        """
        path = self.mktemp()
        first = ProxyHarness(state_path=path)
        self.successResultOf(first.deploy("app", first.upstream("web-1"), host="a.example"))
        second = ProxyHarness(state_path=path)
        second.upstream("web-1")
        self.assertEqual(second.restore(), 1)
        response = self.successResultOf(second.request(b"GET", b"/", host="a.example"))
        self.assertEqual(response.body, b"web-1")

    def test_flush_gives_up(self) -> None:
        """
        Something that keeps busy without time passing (here two protocols
        echoing each other forever) is an error, not a hang.
        """

        class Echo(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"x")

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data)

        self.harness.network.listen("web-1", 9, Factory.forProtocol(Echo))
        factory = ClientFactory.forProtocol(Echo)
        self.harness.reactor.connectTCP("web-1", 9, factory)
        self.assertRaises(RuntimeError, self.harness.flush)

    def test_advance_stops_at_each_timer(self) -> None:
        """
        Advancing runs each timer at its own time, delivering what it
        started before the next one.
        """
        seen: list[tuple[float, int]] = []
        clock = self.harness.reactor
        self.successResultOf(self.harness.deploy("app", self.web))
        for t in (1, 2):
            clock.callLater(t, lambda: self.harness.request(b"GET", b"/"))
            clock.callLater(t + 0.5, lambda: seen.append((clock.seconds(), self.web.requests)))
        start = clock.seconds()
        self.harness.advance(3)
        self.assertEqual([(when - start, n) for when, n in seen], [(1.5, 1), (2.5, 2)])
        self.assertEqual(clock.seconds(), start + 3)


class UpstreamAppTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = ProxyHarness()
        self.web = self.harness.upstream("web-1")
        self.successResultOf(self.harness.deploy("app", self.web))

    def test_hold_leaves_health_checks(self) -> None:
        """
        Held, an app still answers its health checks: a deploy to it passes.
        """
        web2 = self.harness.upstream("web-2")
        web2.hold()
        self.successResultOf(self.harness.deploy("app", web2))
        self.assertGreaterEqual(web2.app.health_checks, 1)
        slow = self.harness.request(b"GET", b"/")
        self.assertEqual(len(web2.held), 1)
        self.assertNoResult(slow)

    def test_release_answers_each(self) -> None:
        """
        Release answers every held request as it would have been, echo
        bodies included, and stops holding.
        """
        self.web.hold()
        one = self.harness.request(b"GET", b"/a")
        two = self.harness.request(b"POST", b"/echo", body=b"hi")
        self.assertEqual([r.path for r in self.web.held], [b"/a", b"/echo"])
        self.web.release()
        self.assertEqual(self.successResultOf(one).body, b"web-1")
        self.assertEqual(self.successResultOf(two).body, b"hi")
        self.assertEqual(self.successResultOf(self.harness.request(b"GET", b"/")).code, 200)

    def test_slow(self) -> None:
        """
        C{/slow?ms=N} answers after N milliseconds of the harness's clock.
        """
        slow = self.harness.request(b"GET", b"/slow?ms=1500")
        self.harness.advance(1)
        self.assertNoResult(slow)
        self.harness.advance(0.5)
        self.assertEqual(self.successResultOf(slow).body, b"web-1")

    def test_health_answer(self) -> None:
        """
        C{/up} answers 503 while the app is unhealthy; it is not counted as
        a request.
        """
        app = UpstreamApp(MemoryReactorClock(), "x")
        app.healthy = False
        other = self.harness.upstream("other", app=app)
        deploy = self.harness.deploy("other", other, host="o.example", deploy_timeout=1)
        self.harness.advance(1)
        failure = self.failureResultOf(deploy, DeployTimedOut)
        self.assertIn("unexpected status (503)", str(failure.value))
        self.assertEqual(app.requests, 0)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason


class _Client(ClientFactory):
    def __init__(self) -> None:
        self.protocol_instance = _Recorder()
        self.failed: Any = None
        self.lost: Any = None

    def buildProtocol(self, addr: Any) -> _Recorder:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.failed = reason

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        self.lost = reason


class NetworkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.network = MemoryNetwork(self.reactor)
        self.network.add_host("server", "10.9.9.9")
        self.servers: list[_Recorder] = []
        factory = Factory.forProtocol(_Recorder)
        build = factory.buildProtocol

        def record(addr: Any) -> Any:
            p = build(addr)
            self.servers.append(p)
            return p

        factory.buildProtocol = record  # type: ignore[method-assign]
        self.network.listen("server", 7, factory)

    def connect(self, host: str = "server", port: int = 7) -> _Client:
        client = _Client()
        self.reactor.connectTCP(host, port, client)
        self.network.pump()
        return client

    def test_transport_interfaces(self) -> None:
        """
        The transports are TCP transports, consumers and push producers.
        """
        client = self.connect()
        t = client.protocol_instance.transport
        for interface in (ITCPTransport, IConsumer, IPushProducer):
            self.assertTrue(verifyObject(interface, t))
        self.assertIsInstance(t, MemoryTransport)
        self.assertEqual((t.getHost().host, t.getPeer().host, t.getPeer().port),
                         ("10.0.0.1", "10.9.9.9", 7))

    def test_bytes_both_ways(self) -> None:
        client = self.connect()
        client.protocol_instance.transport.write(b"ping")
        self.network.pump()
        self.assertEqual(self.servers[0].data, b"ping")
        self.servers[0].transport.write(b"pong")
        self.network.pump()
        self.assertEqual(client.protocol_instance.data, b"pong")

    def test_refused_and_unknown(self) -> None:
        """
        A port nobody listens on refuses; an unknown name fails its lookup.
        """
        self.connect(port=8).failed.trap(ConnectionRefusedError)
        self.connect(host="nobody").failed.trap(DNSLookupError)

    def test_paused_reader(self) -> None:
        """
        A paused reader gets nothing until it resumes.
        """
        client = self.connect()
        self.servers[0].transport.pauseProducing()
        client.protocol_instance.transport.write(b"x")
        self.network.pump()
        self.assertEqual(self.servers[0].data, b"")
        self.servers[0].transport.resumeProducing()
        self.network.pump()
        self.assertEqual(self.servers[0].data, b"x")

    def test_lose_connection_delivers_first(self) -> None:
        client = self.connect()
        self.servers[0].transport.write(b"bye")
        self.servers[0].transport.loseConnection()
        self.network.pump()
        self.network.pump()
        self.assertEqual(client.protocol_instance.data, b"bye")
        client.protocol_instance.reason.trap(ConnectionDone)
        self.servers[0].reason.trap(ConnectionDone)
        client.lost.trap(ConnectionDone)

    def test_abort_drops(self) -> None:
        client = self.connect()
        client.protocol_instance.transport.write(b"lost")
        client.protocol_instance.transport.abortConnection()
        self.network.pump()
        self.assertEqual(self.servers[0].data, b"")
        client.protocol_instance.reason.trap(ConnectionAborted)
        self.servers[0].reason.trap(ConnectionLost)

    def test_producer_paused_while_full(self) -> None:
        """
        A streaming producer is paused while too much waits, and resumed
        once it was delivered.
        """
        calls: list[str] = []

        class Producer:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")

            def stopProducing(self) -> None:
                calls.append("stop")

        client = self.connect()
        t = client.protocol_instance.transport
        t.registerProducer(Producer(), True)
        t.write(b"x" * 70000)
        self.assertEqual(calls, ["pause"])
        self.network.pump()
        self.assertEqual(calls, ["pause", "resume"])
        self.assertEqual(len(self.servers[0].data), 70000)


class ProcessHelperTests(SynchronousTestCase):
    def test_child_env(self) -> None:
        """
        A child's environment drops C{MPROXY_*} variables and leads
        C{PYTHONPATH} to the mproxy under test.
        """
        os.environ["MPROXY_SOMETHING"] = "1"
        self.addCleanup(os.environ.pop, "MPROXY_SOMETHING")
        env = child_env({"EXTRA": "2"})
        self.assertNotIn("MPROXY_SOMETHING", env)
        self.assertEqual(env["EXTRA"], "2")
        root = env["PYTHONPATH"].split(os.pathsep)[0]
        self.assertEqual(
            os.path.join(root, "mproxy", "testing", "__init__.py"),
            os.path.abspath(mproxy.testing.__file__),
        )


class RunMproxyTests(TestCase):
    def test_version(self) -> Deferred[None]:
        """
        L{run_mproxy} runs the mproxy under test and collects its output.
        """
        d = run_mproxy(reactor, "--version")

        def check(result: Any) -> None:
            self.assertEqual(result.status, 0, result.err)
            self.assertIn("mproxy", result.out + result.err)

        return d.addCallback(check)

