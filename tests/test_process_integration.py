"""
Integration tests of the process model: the real C{mproxy run} started the
way systemd socket activation starts it (listening sockets inherited as
descriptors 3, 4, ... with C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess, ServerProtocol, child_env, listen_upstream

#: Runs mproxy with LISTEN_PID set to its own process id, as systemd does
#: between fork and exec (the test cannot know the pid before spawning).
AS_SYSTEMD = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-m', 'mproxy', *sys.argv[1:]])"
)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
AS_SYSTEMD_TWISTD = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    f"os.execv(sys.executable, [sys.executable, '-c', {TWISTD!r}, '-n', '--pidfile=', "
    "'mproxy', *sys.argv[2:]])"
)


class ActivatedProcess(MproxyProcess):
    """
    C{mproxy run} given C{sockets} (name, socket) as systemd would give them.
    """

    def __init__(self, reactor: Any, directory: str, sockets: list[tuple[str, socket.socket]],
                 ports: tuple[int, int], twistd: bool = False) -> None:
        super().__init__(reactor, directory)
        self.sockets = sockets
        self.ports = ports
        self.twistd = twistd

    def start(self) -> Any:
        self.protocol = ServerProtocol()
        args = [
            sys.executable, "-c", AS_SYSTEMD_TWISTD if self.twistd else AS_SYSTEMD, "run",
            "--http-port", str(self.ports[0]), "--https-port", str(self.ports[1]),
            "--bind", "127.0.0.1", "--socket", self.socket, "--state-dir", self.state_dir,
        ]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for offset, (_, s) in enumerate(self.sockets):
            fds[3 + offset] = s.fileno()
        env = child_env({
            "LISTEN_FDS": str(len(self.sockets)),
            "LISTEN_FDNAMES": ":".join(name for name, _ in self.sockets),
        })
        self.process = self.reactor.spawnProcess(
            self.protocol, sys.executable, args, env=env, childFDs=fds
        )
        d = self.protocol.started

        def started(record: dict[str, Any]) -> dict[str, Any]:
            self.http_port = int(record["http"])
            self.https_port = int(record["https"])
            return record

        return d.addCallback(started)


def listening() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def get(port: int, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return b"".join(iter(lambda: s.recv(65536), b""))


class SocketActivationTests(TestCase):
    timeout = 120

    def sockets(self, *names: str) -> list[tuple[str, socket.socket]]:
        result = []
        for name in names:
            s = listening()
            self.addCleanup(s.close)
            result.append((name, s))
        return result

    def occupied(self) -> int:
        """
        A port another socket listens on: mproxy binding it would fail.
        """
        s = listening()
        self.addCleanup(s.close)
        return int(s.getsockname()[1])

    @inlineCallbacks
    def test_serves_the_sockets_it_is_given(self) -> Any:
        """
        mproxy serves HTTP (and HTTPS) on the sockets it inherited, without
        binding the ports of its options (both are taken by other sockets
        here, so binding them would fail start-up); the sockets outlive it:
        a connection made while no mproxy runs is served by the next one.
        """
        app, upstream = listen_upstream(reactor, "one")
        self.addCleanup(upstream.stopListening)
        given = self.sockets("http", "https")
        (_, http), (_, https) = given
        ports = (self.occupied(), self.occupied())
        p = ActivatedProcess(reactor, self.mktemp(), given, ports)
        record = yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        self.assertEqual(record["http"], http.getsockname()[1])
        self.assertEqual(record["https"], https.getsockname()[1])
        [inherited] = [x for x in p.records if x["msg"] == "Serving inherited sockets"]
        self.assertEqual((inherited["http"], inherited["https"]),
                         ([http.getsockname()[1]], [https.getsockname()[1]]))
        r = yield p.command("deploy", f"127.0.0.1:{upstream.getHost().port}")
        self.assertEqual(r.status, 0, r.err)
        answer = yield deferToThread(get, record["http"])
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"one", answer.split(b"\r\n\r\n", 1)[1])
        tls = yield deferToThread(self.tls_handshake_reaches, record["https"])
        self.assertTrue(tls)
        status = yield p.stop(signal.SIGTERM)
        self.assertEqual(status, 0, p.protocol.stderr if p.protocol else "")

        # No mproxy runs now, yet the socket accepts (the kernel queues it).
        waiting = deferToThread(get, record["http"])
        second = ActivatedProcess(reactor, p.directory, given, ports)
        yield second.start()
        self.addCleanup(second.stop, signal.SIGKILL)
        answer = yield waiting
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"one", answer.split(b"\r\n\r\n", 1)[1])

    @inlineCallbacks
    def test_twistd_serves_the_sockets_it_is_given(self) -> Any:
        app, upstream = listen_upstream(reactor, "one")
        self.addCleanup(upstream.stopListening)
        given = self.sockets("http", "https")
        p = ActivatedProcess(reactor, self.mktemp(), given, (self.occupied(), self.occupied()),
                             twistd=True)
        record = yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        self.assertEqual(record["http"], given[0][1].getsockname()[1])
        r = yield p.command("deploy", f"127.0.0.1:{upstream.getHost().port}")
        self.assertEqual(r.status, 0, r.err)
        answer = yield deferToThread(get, record["http"])
        self.assertIn(b"one", answer.split(b"\r\n\r\n", 1)[1])

    def tls_handshake_reaches(self, port: int) -> bool:
        """
        Something speaking TLS answers on C{port} (no certificate for the
        name: the handshake ends in an alert, not in silence or a reset).
        """
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            try:
                with context.wrap_socket(s, server_hostname="nothing.example"):
                    return True
            except ssl.SSLError as e:
                return "alert" in str(e).lower() or "unrecognized_name" in str(e).lower()

    @inlineCallbacks
    def test_kinds_not_given_are_bound(self) -> Any:
        """
        Given only an HTTP socket, mproxy binds the HTTPS port itself.
        """
        given = self.sockets("http")
        p = ActivatedProcess(reactor, self.mktemp(), given, (self.occupied(), 0))
        record = yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        self.assertEqual(record["http"], given[0][1].getsockname()[1])
        self.assertNotEqual(record["https"], 0)
        yield deferToThread(lambda: socket.create_connection(
            ("127.0.0.1", record["https"]), timeout=10).close())

    @inlineCallbacks
    def test_unnamed_sockets_are_refused(self) -> Any:
        given = self.sockets("mproxy.socket")
        p = ActivatedProcess(reactor, self.mktemp(), given, (0, 0))
        with self.assertRaises(RuntimeError) as e:
            yield p.start()
        self.assertIn("Error: inherited socket 3 is named 'mproxy.socket'", str(e.exception))
        self.assertNotIn("Traceback", str(e.exception))
