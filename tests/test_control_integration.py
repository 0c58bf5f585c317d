"""
End-to-end tests of the control plane: the real C{mproxy} commands against a
real server in a child process (L{MproxyProcess}), real upstreams and real
sockets on 127.0.0.1.  Each covers what only the whole program shows: exit
statuses, signals, time limits, what the server logs, what keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable

import treq
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from mproxy.testing import (
    CommandProtocol, CommandResult, MproxyProcess, child_env, listen_upstream,
)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class ControlIntegrationTests(TestCase):
    timeout = 120

    def upstream(self, name: str) -> Any:
        app, port = listen_upstream(reactor, name)
        self.addCleanup(port.stopListening)
        return app, f"127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def proxy(self, *extra: str) -> Any:
        p = MproxyProcess(reactor, self.mktemp(), extra_args=extra)
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        return p

    @inlineCallbacks
    def get(self, url: str) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        r = yield treq.get(url, pool=pool, timeout=20)
        body = yield r.content()
        return r.code, body

    @inlineCallbacks
    def until(self, condition: Callable[[], Any], what: str, limit: float = 30) -> Any:
        """
        Poll C{condition} until it is true (integration tests only).
        """
        for _ in range(int(limit / 0.05)):
            if condition():
                return
            yield sleep(0.05)
        self.fail(f"timed out waiting for {what}")

    def logged(self, p: MproxyProcess, msg: str) -> list[dict[str, Any]]:
        return [r for r in p.records if r.get("msg") == msg]

    def spawn(
        self, p: MproxyProcess, *args: str, socket_path: str = ""
    ) -> tuple[Any, Deferred[CommandResult]]:
        """
        Start C{mproxy <args>} against C{p} (or the socket C{socket_path});
        returns the process and a Deferred of its result.
        """
        done: Deferred[CommandResult] = Deferred()
        argv = p.argv(*args, "--socket", socket_path or p.socket)
        process = reactor.spawnProcess(CommandProtocol(done), sys.executable, argv,
                                       env=child_env())
        return process, done

    @inlineCallbacks
    def test_kamal_buffering_flags(self) -> Any:
        """
        C{--buffer-requests=false --max-request-body=N}, as Kamal sends it, is
        accepted; nothing is buffered, so a larger body still reaches the
        target.
        """
        app, addr = self.upstream("web")
        p = yield self.proxy()
        r = yield p.command("deploy", "app", "--target", addr, "--buffer-requests=false",
                            "--max-request-body=10", "--buffer-responses=false",
                            "--max-response-body=10")
        self.assertEqual(r.status, 0, r.err)
        pool = HTTPConnectionPool(reactor, persistent=False)
        resp = yield treq.post(p.url("/echo"), data=b"x" * 1000, pool=pool, timeout=20)
        body = yield resp.content()
        self.assertEqual((resp.code, body), (200, b"x" * 1000))

    @inlineCallbacks
    def test_failed_save_keeps_old_routing(self) -> Any:
        """
        When the state file cannot be written, C{deploy} exits 1 saying so and
        nothing switched: the old target serves and is what C{list} shows.
        Once the file can be written again, deploys work.
        """
        a, addr_a = self.upstream("a")
        b, addr_b = self.upstream("b")
        p = yield self.proxy()
        self.assertEqual((yield p.command("deploy", addr_a)).status, 0)
        state = os.path.join(p.state_dir, "mproxy.state")
        os.remove(state)
        os.makedirs(state)
        r = yield p.command("deploy", addr_b)
        self.assertEqual(r.status, 1)
        self.assertIn(f"Error: cannot write state file {state}", r.err)
        self.assertIn("nothing was changed", r.err)
        self.assertEqual((yield self.get(p.url())), (200, b"a"))
        r = yield p.command("list", "--json")
        self.assertIn(addr_a, r.out)
        self.assertNotIn(addr_b, r.out)
        self.assertEqual(b.health_checks, 1)
        os.rmdir(state)
        self.assertEqual((yield p.command("deploy", addr_b)).status, 0)
        self.assertEqual((yield self.get(p.url())), (200, b"b"))

    @inlineCallbacks
    def test_silent_socket(self) -> Any:
        """
        A socket that accepts and never answers gives C{Error:} after the
        handshake time limit, not a hang.
        """
        p = MproxyProcess(reactor, self.mktemp())
        port = reactor.listenUNIX(p.socket, protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(port.stopListening)
        r = yield p.command("list")
        self.assertEqual(r.status, 1)
        self.assertEqual(
            r.err,
            f"Error: mproxy at {p.socket} did not answer within 5s (is it an mproxy "
            "control socket? is the server stuck?)\n",
        )

    @inlineCallbacks
    def test_socket_path_too_long(self) -> Any:
        """
        A socket path longer than a UNIX address holds is an error at once.
        """
        p = MproxyProcess(reactor, self.mktemp())
        long_path = "/tmp/" + "s" * 120
        r = yield self.spawn(p, "list", socket_path=long_path)[1]
        self.assertEqual(r.status, 1)
        self.assertIn(f"Error: control socket path {long_path} is too long", r.err)
        self.assertNotIn("Traceback", r.err)

    @inlineCallbacks
    def test_deploy_ends_when_server_goes_away(self) -> Any:
        """
        A deploy waiting for health ends with C{Error:} when the server dies.
        """
        app, addr = self.upstream("sick")
        app.healthy = False
        p = yield self.proxy()
        process, done = self.spawn(p, "deploy", addr, "--deploy-timeout", "10m")
        yield self.until(lambda: self.logged(p, "Healthcheck failed"), "a health check")
        p.send_signal(signal.SIGKILL)
        r = yield done
        self.assertEqual(r.status, 1)
        self.assertEqual(
            r.err, "Error: connection to mproxy lost: the server closed it (stopped or crashed?)\n"
        )

    @inlineCallbacks
    def test_interrupted_deploy_is_cancelled(self) -> Any:
        """
        Ctrl-C on a deploy waiting for health: the CLI says interrupted and
        exits 130; the server cancels the deploy (one log line), stops
        checking the new target and keeps serving the old one.
        """
        old, addr_old = self.upstream("old")
        new, addr_new = self.upstream("new")
        new.healthy = False
        p = yield self.proxy()
        self.assertEqual((yield p.command("deploy", addr_old)).status, 0)
        process, done = self.spawn(p, "deploy", addr_new, "--health-check-interval", "100ms")
        yield self.until(lambda: new.health_checks >= 2, "health checks of the new target")
        process.signalProcess("INT")
        r = yield done
        self.assertEqual(r.status, 130)
        self.assertTrue(r.err.startswith("interrupted"), r.err)
        self.assertNotIn("Traceback", r.err)
        yield self.until(lambda: self.logged(p, "Deploy cancelled"), "the cancellation")
        checks = new.health_checks
        yield sleep(0.5)
        self.assertEqual(new.health_checks, checks)
        self.assertEqual((yield self.get(p.url())), (200, b"old"))
        self.assertEqual(self.logged(p, "Deploy cancelled")[0]["targets"], [addr_new])

    @inlineCallbacks
    def test_bad_control_input_logged_in_one_line(self) -> Any:
        """
        Garbage on the control socket is logged in one line without a
        traceback, and the server still answers.
        """
        p = yield self.proxy()

        def send() -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(p.socket)
            s.sendall(b"\x00\x03foo\x00\x03bar\x00\x00")
            try:
                s.recv(4096)
            except OSError:
                pass
            finally:
                s.close()

        from twisted.internet.threads import deferToThread

        yield deferToThread(send)
        self.assertEqual((yield p.command("list")).status, 0)
        bad = self.logged(p, "Bad control input")
        self.assertEqual(bad[0]["what"], "box without a command")
        self.assertFalse([r for r in p.records if "traceback" in r or "Traceback" in r["msg"]])
        self.assertNotIn(b"Traceback", p.protocol.stderr)

    @inlineCallbacks
    def test_outcomes_logged_counted_and_summarised(self) -> Any:
        """
        A successful deploy prints its summary line; a failed one is logged
        by the server with service, targets and reason; both are counted in
        C{mproxy_deploys_total}; C{list} shows the health of each target and
        an empty list says so.
        """
        app, addr = self.upstream("web")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        p = yield self.proxy("--metrics-port", str(metrics_port))
        r = yield p.command("list")
        self.assertEqual(r.out, "No services deployed (deploy one with `mproxy deploy HOST:PORT`)\n")
        r = yield p.command("deploy", addr)
        self.assertEqual(r.status, 0, r.err)
        self.assertTrue(r.out.splitlines()[-1].startswith(f"default: now serving {addr} (took "),
                        r.out)
        r = yield p.command("deploy", "app", "--target", "127.0.0.1:1", "--host", "app.test",
                            "--deploy-timeout", "1s")
        self.assertEqual(r.status, 1)
        failed = self.logged(p, "Deploy failed")
        self.assertEqual((failed[0]["service"], failed[0]["targets"]), ("app", ["127.0.0.1:1"]))
        self.assertIn("failed to become healthy within configured timeout (1s)",
                      failed[0]["error"])
        r = yield p.command("list")
        self.assertIn(f"{addr} (healthy since ", r.out)
        code, body = yield self.get(f"http://127.0.0.1:{metrics_port}/metrics")
        self.assertIn(b'mproxy_deploys_total{outcome="success",service="default"} 1.0', body)
        self.assertIn(b'mproxy_deploys_total{outcome="failure",service="app"} 1.0', body)
