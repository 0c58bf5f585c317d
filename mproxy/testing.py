"""
Public helpers for testing deploy tooling against a real mproxy with trial.

    from mproxy.testing import UpstreamApp, listen_upstream, MproxyProcess

    class DeployTests(TestCase):
        @inlineCallbacks
        def test_deploy(self):
            app, port = listen_upstream(reactor, "web-1")
            self.addCleanup(port.stopListening)
            proxy = MproxyProcess(reactor, self.mktemp())
            yield proxy.start()
            self.addCleanup(proxy.stop)
            result = yield proxy.command("deploy", f"127.0.0.1:{port.getHost().port}")
            self.assertEqual(result.status, 0)

L{UpstreamApp} is a small web application with a health endpoint whose answer
can be scripted; L{MproxyProcess} runs the real C{mproxy run} in a child
process on free loopback ports and runs C{mproxy} commands against it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from attrs import frozen
from twisted.internet import protocol
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

__all__ = ["UpstreamApp", "listen_upstream", "MproxyProcess", "CommandResult"]


class UpstreamApp(Resource):
    """
    A web app for tests.

      - C{/up}: 200 while C{healthy} is true, else 503.
      - C{/slow?ms=N}: answers after N milliseconds.
      - C{/echo}: answers with the request body.
      - anything else: 200 with the app's name.

    Every request is counted in C{requests}.
    """

    isLeaf = True

    def __init__(self, reactor: Any, name: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.name = name
        self.healthy = True
        self.requests = 0
        self.health_checks = 0
        self.last_headers: dict[bytes, list[bytes]] = {}

    def render(self, request: Any) -> Any:
        path = request.path
        if path == b"/up":
            self.health_checks += 1
            request.setResponseCode(200 if self.healthy else 503)
            return b"up" if self.healthy else b"down"
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"x-upstream", self.name.encode())
        if path == b"/slow":
            ms = int(request.args.get(b"ms", [b"1000"])[0])
            call = self.reactor.callLater(ms / 1000.0, self._finish_slow, request)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return NOT_DONE_YET
        if path == b"/echo":
            return request.content.read()
        return self.name.encode()

    def _finish_slow(self, request: Any) -> None:
        request.write(self.name.encode())
        request.finish()


def listen_upstream(reactor: Any, name: str, port: int = 0) -> tuple[UpstreamApp, Any]:
    """
    Serve a new L{UpstreamApp} on 127.0.0.1; returns it and the listening port.
    """
    app = UpstreamApp(reactor, name)
    site = Site(app)
    site.displayTracebacks = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    return app, listening


@frozen
class CommandResult:
    status: int
    out: str
    err: str


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPROXY_")}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: Deferred[CommandResult]) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        if code is None:
            code = -(reason.value.signal or 1)
        self.done.callback(
            CommandResult(code, b"".join(self.out).decode(), b"".join(self.err).decode())
        )


class _ServerProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.started: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.buffer = b""
        self.records: list[dict[str, Any]] = []
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.records.append(record)
            if record.get("msg") == "Server started" and not self.started.called:
                self.started.callback(record)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        if code is None:
            code = -(reason.value.signal or 1)
        if not self.started.called:
            self.started.errback(
                RuntimeError(f"mproxy exited with {code}: {self.stderr.decode()!r}")
            )
        self.ended.callback(code)


class MproxyProcess:
    """
    The real C{mproxy run} in a child process, on 127.0.0.1, with its socket
    and state directory under C{directory}.
    """

    def __init__(
        self,
        reactor: Any,
        directory: str,
        http_port: int = 0,
        extra_args: tuple[str, ...] = (),
        https_port: int = 0,
    ) -> None:
        self.reactor = reactor
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.socket = os.path.join(self.directory, "mproxy.sock")
        if len(self.socket.encode()) > 100:
            # AF_UNIX paths are limited to about 107 bytes.
            import tempfile

            self.socket = os.path.join(tempfile.mkdtemp(prefix="mproxy-"), "mproxy.sock")
        self.state_dir = os.path.join(self.directory, "state")
        self.requested_port = http_port
        self.requested_https_port = https_port
        self.extra_args = extra_args
        self.http_port: int | None = None
        self.https_port: int | None = None
        self.process: Any = None
        self.protocol: _ServerProtocol | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.protocol.records if self.protocol else []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mproxy", *args]

    @inlineCallbacks
    def start(self) -> Any:
        """
        Start the server; fires with the "Server started" log record.
        A restart listens on the ports the first start got.
        """
        self.protocol = _ServerProtocol()
        args = self.argv(
            "run",
            "--http-port", str(self.http_port or self.requested_port),
            "--https-port", str(self.https_port or self.requested_https_port),
            "--bind", "127.0.0.1",
            "--socket", self.socket,
            "--state-dir", self.state_dir,
            *self.extra_args,
        )
        self.process = self.reactor.spawnProcess(
            self.protocol, sys.executable, args, env=_child_env()
        )
        record = yield self.protocol.started
        self.http_port = int(record["http"])
        self.https_port = int(record["https"])
        return record

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def command(self, *args: str, env: dict[str, str] | None = None) -> Deferred[CommandResult]:
        """
        Run C{mproxy <args> --socket <this server's socket>}.
        """
        done: Deferred[CommandResult] = Deferred()
        argv = self.argv(*args)
        if args and args[0] not in ("help", "--version", "run"):
            argv += ["--socket", self.socket]
        self.reactor.spawnProcess(_Collect(done), sys.executable, argv, env=_child_env(env))
        return done

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.pid is not None:
            os.kill(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> Deferred[int]:
        """
        Stop the server (SIGTERM by default); fires with its exit status.
        """
        if self.protocol is None:
            d: Deferred[int] = Deferred()
            d.callback(0)
            return d
        if not self.protocol.ended.called:
            self.send_signal(sig)
        ended = self.protocol.ended
        result: Deferred[int] = Deferred()
        ended.addBoth(lambda r: (result.callback(r), r)[1])
        return result
