"""
Tests for L{mproxy.tap}: the service tree, built on a memory reactor.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mproxy.config import ServerConfig
from mproxy.errors import StateError
from mproxy.logging import ListLogger
from mproxy.tap import MproxyService, Options, StartupError, build_service, check_socket_free


class ServiceTreeTests(SynchronousTestCase):
    def config(self, **kw: object) -> ServerConfig:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        import shutil
        import tempfile

        short = tempfile.mkdtemp(prefix="mp-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        base = dict(http_port=8080, https_port=8443, bind="127.0.0.1",
                    socket=os.path.join(short, "s.sock"), state_dir=os.path.join(d, "state"))
        base.update(kw)
        return ServerConfig(**base)  # type: ignore[arg-type]

    def build(self, **kw: object) -> tuple[MproxyService, MemoryReactorClock, ListLogger]:
        reactor = MemoryReactorClock()
        logger = ListLogger()
        service = build_service(reactor, self.config(**kw), logger)
        return service, reactor, logger

    def test_building_opens_nothing(self) -> None:
        service, reactor, _ = self.build()
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.unixServers, [])
        self.assertFalse(os.path.exists(service.config.state_dir))

    def test_start_listens_and_restores(self) -> None:
        service, reactor, logger = self.build(metrics_port=9100)
        service.startService()
        self.addCleanup(service.stopService)
        self.successResultOf(service.ready)
        ports = sorted((port, iface) for port, _, _, iface in reactor.tcpServers)
        self.assertEqual(ports, [(8080, "127.0.0.1"), (8443, "127.0.0.1"), (9100, "127.0.0.1")])
        [(path, _, _, mode, _)] = [(u[0], u[1], u[2], u[3], u[4]) for u in reactor.unixServers]
        self.assertEqual(path, service.config.socket)
        self.assertEqual(mode, 0o600)
        self.assertEqual(os.stat(service.config.state_dir).st_mode & 0o777, 0o700)
        messages = logger.messages()
        self.assertIn("No previous state to restore", messages)
        self.assertIn("Server started", messages)
        self.assertIn("Metrics enabled", messages)
        self.assertLess(messages.index("No previous state to restore"),
                        messages.index("Server started"))
        self.assertIsNotNone(service.getServiceNamed("certs"))

    def test_http_timeouts_reach_the_sites(self) -> None:
        """
        C{--http-header-timeout} and C{--http-idle-timeout} configure both
        HTTP and HTTPS sites.
        """
        service, reactor, _ = self.build(http_header_timeout=2.0, http_idle_timeout=5.0)
        service.startService()
        self.addCleanup(service.stopService)
        self.successResultOf(service.ready)
        self.assertEqual(len(service.sites), 2)
        for site in service.sites:
            self.assertEqual((site.header_timeout, site.idle_timeout), (2.0, 5.0))

    def test_corrupt_state_stops_startup_before_listening(self) -> None:
        service, reactor, _ = self.build()
        os.makedirs(service.config.state_dir)
        with open(service.store.path, "w") as f:
            f.write("[{]")
        service.startService()
        self.addCleanup(service.stopService)
        f = self.failureResultOf(service.ready, StateError)
        self.assertIn(service.store.path, str(f.value))
        self.assertEqual(reactor.tcpServers, [])
        with open(service.store.path) as fh:
            self.assertEqual(fh.read(), "[{]")

    def test_stop_logs_server_stopped(self) -> None:
        service, reactor, logger = self.build()
        service.startService()
        self.successResultOf(service.ready)
        d = service.stopService()
        reactor.advance(11)
        self.successResultOf(d)
        self.assertIn("Server stopped", logger.messages())


class SocketTests(SynchronousTestCase):
    def test_missing_socket_is_fine(self) -> None:
        check_socket_free(os.path.join(os.path.abspath(self.mktemp()), "none.sock"))

    def test_stale_socket_removed(self) -> None:
        import socket

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "s.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # bound, never listening: nobody answers
        check_socket_free(path)
        self.assertFalse(os.path.exists(path))

    def test_live_socket_not_stolen(self) -> None:
        import socket

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "s.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.listen(1)
        self.addCleanup(s.close)
        e = self.assertRaises(StartupError, check_socket_free, path)
        self.assertIn("already running", str(e))
        self.assertTrue(os.path.exists(path))

    def test_regular_file_not_replaced(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("x")
        e = self.assertRaises(StartupError, check_socket_free, path)
        self.assertIn("not a socket", str(e))

    def test_path_too_long(self) -> None:
        e = self.assertRaises(StartupError, check_socket_free, "/tmp/" + "x" * 120)
        self.assertIn("too long", str(e))


class OptionsTests(SynchronousTestCase):
    def test_twistd_options_same_table(self) -> None:
        o = Options()
        o.parseOptions(["--http-port", "8081", "--debug", "--socket", "/tmp/x.sock"])
        self.assertEqual(o.config.http_port, 8081)
        self.assertTrue(o.config.debug)
        self.assertEqual(o.config.socket, "/tmp/x.sock")

    def test_twistd_bad_value(self) -> None:
        o = Options()
        self.assertRaises(usage.UsageError, o.parseOptions, ["--http-port", "eighty"])
