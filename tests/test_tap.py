"""
Tests for L{mproxy.tree} (the service tree, built on a memory reactor),
L{mproxy.listeners}, L{mproxy.controlsocket} and L{mproxy.tap} (twistd).
"""

from __future__ import annotations

import errno
import io
import json
import signal
import os
import socket
import stat
import sys
from typing import Any

from twisted.application.service import Application, IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import directlyProvides
from twisted.internet.interfaces import ISystemHandle

from mproxy.config import ServerConfig
from mproxy.controlsocket import (
    Identity,
    PeerCheckingFactory,
    UntrustedSocket,
    check_server_peer,
    check_server_socket,
    check_socket_free,
)
from mproxy.errors import StateError
from mproxy.fileutil import atomic_write, remove_stale_temporary_files
from mproxy.listeners import StartupError
from mproxy.logging import EXHAUSTION_REPORT_INTERVAL, JSONLogger, ListLogger, TwistedEvents
from mproxy.tap import Options, makeService, twistd_log_stream
from mproxy.tree import MproxyService, build_service


class RefusingReactor(MemoryReactorClock):
    """
    A memory reactor on which listening on C{refused} fails with C{error}.
    """

    def __init__(self, refused: int, error: int = errno.EADDRINUSE) -> None:
        super().__init__()
        self.refused = refused
        self.error = error

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == self.refused:
            raise CannotListenError(interface, port, OSError(self.error, os.strerror(self.error)))
        return super().listenTCP(port, factory, backlog, interface)


class SlowClosingPort:
    """
    A listening port whose C{stopListening} completes only when told to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.closing: Deferred[None] = Deferred()

    def getHost(self) -> Any:
        return None

    def stopListening(self) -> Deferred[None]:
        return self.closing


class SlowClosingReactor(MemoryReactorClock):
    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666,
                   wantPID: int = 0) -> Any:
        super().listenUNIX(address, factory, backlog, mode, wantPID)
        self.control_port = SlowClosingPort(address)
        return self.control_port


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

    def build(self, reactor: MemoryReactorClock | None = None,
              **kw: object) -> tuple[MproxyService, MemoryReactorClock, ListLogger]:
        reactor = reactor or MemoryReactorClock()
        reactor.run()  # running: callWhenRunning calls at once
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
        """
        A corrupt state file: starting raises (so twistd exits non-zero),
        C{ready} fails, nothing listens, the file is untouched.
        """
        service, reactor, logger = self.build()
        os.makedirs(service.config.state_dir)
        with open(service.store.path, "w") as f:
            f.write("[{]")
        self.assertRaises(StateError, service.startService)
        f = self.failureResultOf(service.ready, StateError)
        self.assertIn(service.store.path, str(f.value))
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.unixServers, [])
        self.assertFalse(service.running)
        with open(service.store.path) as fh:
            self.assertEqual(fh.read(), "[{]")
        [record] = [r for r in logger.records if r["msg"] == "Unable to start"]
        self.assertIn(service.store.path, record["error"])

    def test_port_in_use_raises_at_privileged_start(self) -> None:
        """
        A port that cannot be bound raises L{StartupError} from
        C{privilegedStartService} (twistd's start step that runs before it
        reports success), naming the port; the ports already bound are
        closed again and the control socket is not created.
        """
        service, reactor, logger = self.build(RefusingReactor(8443))
        e = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertIn("cannot listen for HTTPS on port 8443", str(e))
        self.assertIn("Address already in use", str(e))
        self.failureResultOf(service.ready, StartupError)
        self.assertEqual(reactor.unixServers, [])
        [(port, _, _, _)] = [t[:4] for t in reactor.tcpServers]  # only HTTP got bound
        self.assertEqual(port, 8080)
        self.assertFalse(service.bound.get("https"))
        self.assertIn("Unable to start", logger.messages())

    def test_privileged_port_names_the_way_out(self) -> None:
        """
        A port below 1024 refused for lack of privilege says how to run as a
        normal user.
        """
        service, reactor, _ = self.build(RefusingReactor(443, errno.EACCES), https_port=443)
        e = self.assertRaises(StartupError, service.startService)
        self.assertIn("cannot listen for HTTPS on port 443", str(e))
        self.assertIn("--http-port 8080 --https-port 8443", str(e))
        self.failureResultOf(service.ready)

    def test_unprivileged_refusal_has_no_hint(self) -> None:
        service, reactor, _ = self.build(RefusingReactor(8443, errno.EACCES))
        e = self.assertRaises(StartupError, service.startService)
        self.assertNotIn("--https-port 8443", str(e))
        self.failureResultOf(service.ready)

    def test_listeners_and_control_socket_are_children(self) -> None:
        """
        The listeners and the control socket are named services of the tree,
        started by it in order: certificates, HTTP, HTTPS, metrics, control.
        """
        service, reactor, _ = self.build(metrics_port=9100)
        self.assertEqual([s.name for s in service],
                         ["certs", "http", "https", "metrics", "control"])
        self.assertIs(service.getServiceNamed("control"), service.control)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(all(s.running for s in service))
        self.assertEqual(service.bound, {"http": 8080, "https": 8443, "metrics": 9100})

    def test_stop_waits_for_the_control_socket_to_close(self) -> None:
        """
        Stopping completes only once the control socket's port has closed
        (closing it is what removes its file): a stop that did not wait let
        the reactor exit first and left the file behind.
        """
        service, reactor, logger = self.build(SlowClosingReactor())
        service.startService()
        self.successResultOf(service.ready)
        d = service.stopService()
        reactor.advance(11)
        self.assertNoResult(d)
        self.assertNotIn("Server stopped", logger.messages())
        reactor.control_port.closing.callback(None)
        self.successResultOf(d)
        self.assertIn("Server stopped", logger.messages())

    def test_stale_temporary_files_removed_at_start(self) -> None:
        """
        Temporary files a crash left in the state directory (and in
        certificate directories below it) are removed at start, before the
        state is restored; other files stay.
        """
        service, reactor, logger = self.build()
        state = service.config.state_dir
        certs = os.path.join(state, "certs", "abc")
        os.makedirs(certs)
        for d in (state, certs):
            with open(os.path.join(d, ".tmp-k3j4h5g6"), "w") as f:
                f.write("half a file")
        atomic_write(service.store.path, b"[]")
        with open(os.path.join(certs, "host.crt"), "w") as f:
            f.write("cert")
        service.startService()
        self.addCleanup(service.stopService)
        self.successResultOf(service.ready)
        self.assertEqual(sorted(os.listdir(state)), ["certs", "mproxy.state"])
        self.assertEqual(os.listdir(certs), ["host.crt"])
        [record] = [r for r in logger.records
                    if r["msg"] == "Removed temporary files left by an earlier run"]
        self.assertEqual(record["count"], 2)


class ListenerTests(SynchronousTestCase):
    def test_an_inherited_socket_is_just_another_endpoint(self) -> None:
        """
        A listener whose endpoint adopts an inherited file descriptor (as a
        supervisor or systemd socket activation would hand over) serves on
        it without binding anything.
        """
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint

        from mproxy.listeners import Listener

        reactor = MemoryReactorClock()
        factory = object()
        inherited = socket.socket()
        self.addCleanup(inherited.close)
        fd = os.dup(inherited.fileno())  # the endpoint closes it once adopted
        listener = Listener(
            "HTTP", factory, 80,
            [lambda port: AdoptedStreamServerEndpoint(reactor, fd, socket.AF_INET)],
        )
        listener.privilegedStartService()
        self.assertEqual(reactor.adoptedPorts, [(fd, socket.AF_INET, factory)])
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(listener.port, 1234)

    def test_one_family_may_fail(self) -> None:
        """
        Without C{--bind}, C{::} and C{0.0.0.0} are both tried; one failing
        (IPv6 disabled, or IPv4 already taken by a dual-stack socket) is
        fine, and an ephemeral port is reused for the second.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

        from mproxy.listeners import Listener

        reactor = RefusingReactor(0)
        refused = Listener("HTTP", object(), 0, [
            lambda port: TCP6ServerEndpoint(reactor, port, 5, "::"),
            lambda port: TCP4ServerEndpoint(reactor, port, 5, "0.0.0.0"),
        ])
        e = self.assertRaises(StartupError, refused.privilegedStartService)
        self.assertIn("cannot listen for HTTP on port 0", str(e))
        reactor = RefusingReactor(8080)
        ok = Listener("HTTP", object(), 8081, [
            lambda port: TCP4ServerEndpoint(reactor, 8080, 5, "0.0.0.0"),
            lambda port: TCP6ServerEndpoint(reactor, port, 5, "::"),
        ])
        ok.privilegedStartService()
        self.assertEqual(ok.port, 8081)
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(8081, "::")])


class TemporaryFilesTests(SynchronousTestCase):
    def test_symlinks_and_directories_are_left(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(d, ".tmp-dir"))
        os.symlink("/etc/hostname", os.path.join(d, ".tmp-link"))
        logger = ListLogger()
        self.assertEqual(remove_stale_temporary_files(d, logger), [])
        self.assertEqual(sorted(os.listdir(d)), [".tmp-dir", ".tmp-link"])
        self.assertEqual(logger.records, [])

    def test_missing_directory(self) -> None:
        self.assertEqual(remove_stale_temporary_files(self.mktemp(), ListLogger()), [])

def short_directory(case: SynchronousTestCase) -> str:
    """
    A fresh directory with a short path (UNIX socket paths are short).
    """
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="mp-")
    case.addCleanup(shutil.rmtree, d, True)
    return d


def bound_socket(path: str, listening: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    if listening:
        s.listen(1)
    return s


def someone_else(owner_of: dict[str, int], me: int = 1000) -> Identity:
    """
    An identity for user C{me}, to whom each path in C{owner_of} belongs to
    the uid given there.
    """

    def lstat(path: str) -> os.stat_result:
        st = os.lstat(path)
        fields = list(st)
        fields[stat.ST_UID] = owner_of.get(path, me)
        return os.stat_result(fields)

    return Identity(euid=lambda: me, lstat=lstat, describe=lambda uid: f"uid {uid}")


class SocketTests(SynchronousTestCase):
    def test_missing_socket_is_fine(self) -> None:
        check_socket_free(os.path.join(short_directory(self), "none.sock"))

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


class OwnershipTests(SynchronousTestCase):
    """
    Another local user can create the default control socket path first:
    neither the server nor the client uses a socket that belongs to someone
    else.
    """

    def test_server_refuses_a_stale_socket_of_another_user(self) -> None:
        path = os.path.join(short_directory(self), "s.sock")
        bound_socket(path, listening=False).close()
        e = self.assertRaises(StartupError, check_socket_free, path, someone_else({path: 1001}))
        self.assertIn(f"control socket {path} belongs to uid 1001", str(e))
        self.assertIn("--socket", str(e))
        self.assertTrue(os.path.exists(path), "another user's file was removed")

    def test_server_refuses_a_live_socket_of_another_user(self) -> None:
        path = os.path.join(short_directory(self), "s.sock")
        s = bound_socket(path, listening=True)
        self.addCleanup(s.close)
        e = self.assertRaises(StartupError, check_socket_free, path, someone_else({path: 0}))
        self.assertIn("belongs to uid 0", str(e))
        self.assertNotIn("already running", str(e))

    def test_server_replaces_its_own_stale_socket(self) -> None:
        path = os.path.join(short_directory(self), "s.sock")
        bound_socket(path, listening=False).close()
        check_socket_free(path, someone_else({}))
        self.assertFalse(os.path.exists(path))

    def test_service_refuses_to_start_on_a_strangers_socket(self) -> None:
        """
        The control socket service fails start-up with the ownership error
        and listens on nothing.
        """
        from mproxy.controlsocket import ControlSocketService

        path = os.path.join(short_directory(self), "s.sock")
        bound_socket(path, listening=False).close()
        reactor = MemoryReactorClock()
        service = ControlSocketService(reactor, path, object(), ListLogger(),
                                       someone_else({path: 1001}))
        e = self.assertRaises(StartupError, service.startService)
        self.assertIn("belongs to uid 1001", str(e))
        self.assertEqual(reactor.unixServers, [])

    def test_client_refuses_a_socket_of_another_user(self) -> None:
        path = os.path.join(short_directory(self), "s.sock")
        bound_socket(path, listening=False).close()
        e = self.assertRaises(UntrustedSocket, check_server_socket, path,
                              someone_else({path: 1001}))
        self.assertIn(f"control socket {path} belongs to uid 1001, not to you or root",
                      str(e))

    def test_client_accepts_its_own_or_roots_socket(self) -> None:
        path = os.path.join(short_directory(self), "s.sock")
        bound_socket(path, listening=False).close()
        check_server_socket(path, someone_else({path: 1000}))
        check_server_socket(path, someone_else({path: 0}))
        check_server_socket(os.path.join(short_directory(self), "none"), someone_else({}))

    def test_client_refuses_a_server_running_as_another_user(self) -> None:
        """
        After connecting, the peer credentials of the server process decide
        (the file's owner can differ from the process that listens on it).
        """
        a, b = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return a

        transport = Transport()
        directlyProvides(transport, ISystemHandle)
        stranger = Identity(euid=lambda: 1000, peer_uid=lambda sock: 1001,
                            describe=lambda uid: f"uid {uid}")
        e = self.assertRaises(UntrustedSocket, check_server_peer, "/x.sock", transport, stranger)
        self.assertIn("runs as uid 1001, not as you or root", str(e))
        check_server_peer("/x.sock", transport, Identity(euid=lambda: 1000,
                                                         peer_uid=lambda sock: 0))

    def test_real_peer_credentials(self) -> None:
        """
        The peer's uid comes from the kernel: a socket pair's peer is us.
        """
        from mproxy.controlsocket import peer_uid

        if not hasattr(socket, "SO_PEERCRED"):
            raise SkipTest("no SO_PEERCRED on this platform")
        a, b = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertEqual(peer_uid(a), os.geteuid())

    def test_server_drops_connections_from_other_users(self) -> None:
        """
        The control factory hands a connection on only when the connecting
        process runs as the server's user or root; others are cut and logged.
        """
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import StringTransport

        made: list[Any] = []

        class Recording(Protocol):
            def connectionMade(self) -> None:
                made.append(self)

        def connect(uid: int) -> StringTransport:
            logger = ListLogger()
            identity = Identity(euid=lambda: 1000, peer_uid=lambda sock: uid,
                                describe=lambda u: f"uid {u}")
            factory = PeerCheckingFactory(Factory.forProtocol(Recording), logger, identity)
            transport = StringTransport()
            transport.getHandle = lambda: None  # type: ignore[attr-defined]
            directlyProvides(transport, ISystemHandle)
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            protocol.makeConnection(transport)
            transport.logger = logger  # type: ignore[attr-defined]
            return transport

        cut = connect(1001)
        self.assertEqual(made, [])
        self.assertTrue(cut.disconnecting)
        self.assertEqual(cut.logger.records[0]["msg"],  # type: ignore[attr-defined]
                         "Refused a control connection from another user")
        for uid in (1000, 0):
            kept = connect(uid)
            self.assertFalse(kept.disconnecting)
        self.assertEqual(len(made), 2)


class FileDescriptorExhaustionTests(SynchronousTestCase):
    """
    Twisted's listening ports log refused accepts at info level, once per
    connection: mproxy turns them into a rate-limited warning.
    """

    def event(self, fmt: str, **kw: Any) -> dict[str, Any]:
        return dict(log_format=fmt, log_level=LogLevel.info,
                    log_namespace="twisted.internet.tcp.Port", **kw)

    def test_one_line_then_a_count_per_interval(self) -> None:
        clock = Clock()
        logger = ListLogger()
        observer = TwistedEvents(logger, clock)
        closed = self.event("EMFILE recovery: Closed socket from {address}", address=("1", 2))
        for _ in range(500):
            observer(closed)
        self.assertEqual(len(logger.records), 1)
        [first] = logger.records
        self.assertEqual((first["level"], first["msg"]),
                         ("WARN", "Out of file descriptors: refusing new connections"))
        clock.advance(EXHAUSTION_REPORT_INTERVAL)
        self.assertEqual(len(logger.records), 2)
        self.assertEqual(logger.records[1]["refused"], 499)
        clock.advance(EXHAUSTION_REPORT_INTERVAL)  # nothing new: no line
        self.assertEqual(len(logger.records), 2)
        observer(closed)
        self.assertEqual(len(logger.records), 3)
        self.assertNotIn("refused", logger.records[2])

    def test_system_wide_exhaustion_too(self) -> None:
        logger = ListLogger()
        observer = TwistedEvents(logger, Clock())
        observer(self.event("Could not accept new connection ({acceptError})",
                            acceptError="ENFILE"))
        self.assertEqual(logger.records[0]["error"], "ENFILE")

    def test_aborted_connections_are_not_exhaustion(self) -> None:
        logger = ListLogger()
        observer = TwistedEvents(logger, Clock())
        observer(self.event("Could not accept new connection ({acceptError})",
                            acceptError="ECONNABORTED"))
        self.assertEqual(logger.records, [])


class TwistdTests(SynchronousTestCase):
    """
    Under twistd, JSON log lines go where twistd logs, and twistd's own
    events go through the same logger.
    """

    def setUp(self) -> None:
        import signal

        installed: list[Any] = []
        # Rotation on SIGUSR1, as twistd does; not in the test process.
        self.patch(signal, "signal", lambda *a: installed.append(a))
        self.installed = installed

    def test_log_stream(self) -> None:
        self.assertIs(twistd_log_stream({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(twistd_log_stream({"nodaemon": True, "logfile": "-"}), sys.stdout)
        path = os.path.abspath(self.mktemp())
        stream = twistd_log_stream({"nodaemon": False, "logfile": path})
        self.addCleanup(stream.close)
        self.assertEqual([a[0] for a in self.installed], [signal.SIGUSR1])
        JSONLogger(stream).info("hello", n=1)
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["msg"], "hello")

    def test_daemon_default_log_file(self) -> None:
        here = os.getcwd()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        os.chdir(d)
        self.addCleanup(os.chdir, here)
        stream = twistd_log_stream({"nodaemon": False, "logfile": None})
        self.addCleanup(stream.close)
        self.assertEqual(stream.path, os.path.join(d, "twistd.log"))

    def test_application_logs_through_our_observer(self) -> None:
        """
        Added to a twistd application, the service gives it its JSON log
        observer; twistd's chatter is dropped, its errors become JSON lines.
        """
        short = short_directory(self)
        options = Options()
        options.parseOptions(["--http-port", "0", "--https-port", "0",
                              "--socket", os.path.join(short, "s.sock"),
                              "--state-dir", os.path.join(short, "state")])
        out = io.StringIO()
        options.parent = {"nodaemon": True, "logfile": None}  # type: ignore[attr-defined]
        self.patch(sys, "stdout", out)
        self.patch(sys, "excepthook", sys.excepthook)
        service = makeService(options)
        application = Application("mproxy")
        service.setServiceParent(application)
        self.assertIs(IService(application).getServiceNamed("mproxy"), service)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        observer(dict(log_format="twistd starting up", log_level=LogLevel.info,
                      log_namespace="twisted.scripts._twistd_unix.UnixAppLogger"))
        observer(dict(log_format="boom {x}", x=1, log_level=LogLevel.error,
                      log_namespace="anything"))
        [line] = out.getvalue().splitlines()
        self.assertEqual(json.loads(line)["msg"], "boom 1")

    def test_syslog_is_refused(self) -> None:
        """
        twistd's --syslog would bypass the JSON log: refused with a reason.
        """
        options = Options()
        options.parseOptions(["--socket", "/tmp/unused.sock"])
        options.parent = {"nodaemon": False, "syslog": True}  # type: ignore[attr-defined]
        self.patch(sys, "excepthook", sys.excepthook)
        e = self.assertRaises(StartupError, makeService, options)
        self.assertIn("--syslog is not supported", str(e))

    def test_unwritable_log_file(self) -> None:
        options = Options()
        options.parseOptions(["--socket", "/tmp/unused.sock"])
        path = os.path.join(os.path.abspath(self.mktemp()), "no", "such", "dir", "x.log")
        options.parent = {"nodaemon": False, "logfile": path}  # type: ignore[attr-defined]
        self.patch(sys, "excepthook", sys.excepthook)
        e = self.assertRaises(StartupError, makeService, options)
        self.assertIn("cannot open the log file", str(e))

    def test_startup_errors_print_plainly(self) -> None:
        from mproxy.tap import report_errors_plainly

        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        self.patch(sys, "excepthook", lambda *a: err.write("traceback\n"))
        report_errors_plainly()
        sys.excepthook(StartupError, StartupError("cannot listen"), None)
        sys.excepthook(ValueError, ValueError("bug"), None)
        self.assertEqual(err.getvalue(), "Error: cannot listen\ntraceback\n")


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
