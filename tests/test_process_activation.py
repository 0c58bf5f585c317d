"""
Unit tests of socket activation: L{mproxy.activation} reading the inherited
sockets, and the service tree serving them instead of binding ports.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.activation import (
    InheritedSocket,
    InheritedSockets,
    describe_socket,
    inherited_sockets,
)
from mproxy.config import ServerConfig
from mproxy.listeners import StartupError
from mproxy.logging import ListLogger
from mproxy.tree import MproxyService, build_service


def fake_describe(fd: int) -> InheritedSocket:
    return InheritedSocket(fd, socket.AF_INET6 if fd % 2 else socket.AF_INET, 8000 + fd)


class InheritedSocketsTests(SynchronousTestCase):
    def read(self, environ: dict[str, str], pid: int = 42) -> Any:
        self.kept: list[int] = []
        return inherited_sockets(
            environ, getpid=lambda: pid, describe=fake_describe,
            keep_from_children=self.kept.append,
        )

    def test_none_without_the_variables(self) -> None:
        environ = {"PATH": "/bin"}
        self.assertIsNone(self.read(environ))
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_named_sockets_by_kind(self) -> None:
        environ = {
            "LISTEN_PID": "42", "LISTEN_FDS": "4",
            "LISTEN_FDNAMES": "http:https:http:metrics", "HOME": "/root",
        }
        result = self.read(environ)
        self.assertEqual(result.get("http"), (fake_describe(3), fake_describe(5)))
        self.assertEqual(result.get("https"), (fake_describe(4),))
        self.assertEqual(result.port("metrics"), 8006)
        self.assertIsNone(result.port("other"))
        self.assertEqual(environ, {"HOME": "/root"}, "the variables are removed")
        self.assertEqual(self.kept, [3, 4, 5, 6])

    def test_for_another_process(self) -> None:
        """
        Variables meant for another process (the one that started us) are
        not ours, and are removed all the same.
        """
        environ = {"LISTEN_PID": "7", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
        self.assertIsNone(self.read(environ))
        self.assertEqual(environ, {})
        self.assertIsNone(self.read({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}))

    def test_zero_sockets(self) -> None:
        self.assertIsNone(self.read({"LISTEN_PID": "42", "LISTEN_FDS": "0"}))

    def test_bad_count(self) -> None:
        e = self.assertRaises(StartupError, self.read, {"LISTEN_PID": "42", "LISTEN_FDS": "x"})
        self.assertEqual(str(e), "LISTEN_FDS='x' is not a number of sockets")

    def test_unnamed_sockets(self) -> None:
        e = self.assertRaises(StartupError, self.read, {"LISTEN_PID": "42", "LISTEN_FDS": "2"})
        self.assertEqual(
            str(e),
            "2 inherited socket(s) but LISTEN_FDNAMES names 0: name each socket "
            "FileDescriptorName=http, https or metrics in its .socket unit",
        )

    def test_unknown_name(self) -> None:
        e = self.assertRaises(StartupError, self.read, {
            "LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:mproxy.socket"})
        self.assertEqual(
            str(e),
            "inherited socket 4 is named 'mproxy.socket': name each socket "
            "FileDescriptorName=http, https or metrics in its .socket unit",
        )


class DescribeSocketTests(SynchronousTestCase):
    def test_listening_tcp_socket(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        described = describe_socket(s.fileno())
        self.assertEqual(described, InheritedSocket(s.fileno(), socket.AF_INET,
                                                    s.getsockname()[1]))
        s.getsockname()  # still open: only looked at

    def test_not_listening(self) -> None:
        s = socket.socket()
        self.addCleanup(s.close)
        e = self.assertRaises(StartupError, describe_socket, s.fileno())
        self.assertEqual(str(e), f"inherited file descriptor {s.fileno()} is not listening")

    def test_not_tcp(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        e = self.assertRaises(StartupError, describe_socket, s.fileno())
        self.assertIn("is not a TCP socket", str(e))

    def test_not_a_socket(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        e = self.assertRaises(StartupError, describe_socket, r)
        self.assertIn(f"inherited file descriptor {r} is not a socket", str(e))

    def test_real_reading_keeps_sockets_from_children(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        fd = os.dup2(s.fileno(), 900, inheritable=True)
        self.addCleanup(os.close, fd)
        result = inherited_sockets(
            {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"},
            getpid=lambda: 1, first_fd=900,
        )
        self.assertEqual(result.port("http"), s.getsockname()[1])
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


class ServiceTreeTests(SynchronousTestCase):
    def config(self, **kw: Any) -> ServerConfig:
        d = tempfile.mkdtemp(prefix="mpa-")
        self.addCleanup(shutil.rmtree, d, True)
        base = dict(http_port=8080, https_port=8443, bind="127.0.0.1",
                    socket=os.path.join(d, "s.sock"), state_dir=os.path.join(d, "state"))
        base.update(kw)
        return ServerConfig(**base)

    def listening(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s

    def test_serves_the_inherited_sockets(self) -> None:
        """
        The HTTP and metrics listeners adopt their inherited sockets (a
        duplicate, so the inherited one stays open); HTTPS, not inherited,
        binds its port; the inherited ports become the configuration's.
        """
        http, metrics = self.listening(), self.listening()
        inherited = InheritedSockets({
            "http": (describe_socket(http.fileno()),),
            "metrics": (describe_socket(metrics.fileno()),),
        })
        reactor = MemoryReactorClock()
        reactor.run()
        service = MproxyService(reactor, self.config(), ListLogger(), inherited)
        self.assertEqual(service.config.http_port, http.getsockname()[1])
        self.assertEqual(service.config.metrics_port, metrics.getsockname()[1])
        self.assertEqual(service.config.https_port, 8443)
        service.startService()
        self.addCleanup(service.stopService)
        adopted = [(family, factory) for _, family, factory in reactor.adoptedPorts]
        self.assertEqual(len(adopted), 2)
        self.assertEqual({family for family, _ in adopted}, {socket.AF_INET})
        self.assertEqual([(port, iface) for port, _, _, iface in reactor.tcpServers],
                         [(8443, "127.0.0.1")])
        self.assertNotIn(http.fileno(), [fd for fd, _, _ in reactor.adoptedPorts])
        self.assertIsNotNone(service.metrics)
        http.getsockname()  # the inherited socket is still open

    def test_building_reads_the_environment(self) -> None:
        """
        C{build_service} takes the variables out of the environment it is
        given; without them it binds as configured.
        """
        reactor = MemoryReactorClock()
        environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "X": "y"}
        service = build_service(reactor, self.config(), ListLogger(), environ=environ)
        self.assertEqual(environ, {"X": "y"})
        self.assertIsNone(service.inherited)
        self.assertEqual(service.config.http_port, 8080)

    def test_building_refuses_unusable_sockets(self) -> None:
        e = self.assertRaises(StartupError, build_service, MemoryReactorClock(), self.config(),
                              ListLogger(), environ={"LISTEN_PID": str(os.getpid()),
                                                     "LISTEN_FDS": "1"})
        self.assertIn("LISTEN_FDNAMES names 0", str(e))


class WorkerSocketGroupTests(SynchronousTestCase):
    """
    With workers, the sockets of socket activation stay shared by all of
    them; those an upgrade handed over get a socket per worker.
    """

    def reusable(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s

    def http_listener(self, handover: Any) -> Any:
        from mproxy.activation import Handover

        s = self.reusable()
        handed = Handover(os.getpid(), "u1", (("http", s.fileno()),)) if handover else None
        inherited = InheritedSockets({"http": (describe_socket(s.fileno()),)},
                                     handover=handed)
        d = tempfile.mkdtemp(prefix="mpa-")
        self.addCleanup(shutil.rmtree, d, True)
        config = ServerConfig(http_port=8080, https_port=0, bind="127.0.0.1", workers=2,
                              socket=os.path.join(d, "s.sock"),
                              state_dir=os.path.join(d, "state"))
        service = MproxyService(MemoryReactorClock(), config, ListLogger(), inherited)
        (listener,) = [x for x in service.listeners if x.name == "http"]
        listener.privilegedStartService()
        self.addCleanup(listener.stopService)
        return s, listener

    def test_socket_activation_shared(self) -> None:
        s, listener = self.http_listener(handover=False)
        self.assertEqual(listener.worker_sockets, [(s.fileno(), socket.AF_INET, -1)])

    def test_handed_over_grows(self) -> None:
        s, listener = self.http_listener(handover=True)
        self.assertEqual(len(listener.fds), 2)
        self.assertEqual([owner for *_, owner in listener.worker_sockets], [0, 1])
