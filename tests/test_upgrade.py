"""
Unit tests of the in-place upgrade: L{mproxy.upgrade} (check, handover,
exec), the handover's reading in L{mproxy.activation}, the control socket
adopted across it, SIGUSR2, and the C{upgrade} command's parsing.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.activation import (
    UPGRADE_VARIABLE,
    Handover,
    InheritedSocket,
    describe_control_socket,
    describe_datagram_socket,
    upgrade_sockets,
)
from mproxy.cli.main import main
from mproxy.cli.streams import Streams
from mproxy.controlsocket import ControlSocketService
from mproxy.listeners import Listener, StartupError
from mproxy.logging import ListLogger
from mproxy.signals import install_upgrade_signal
from mproxy.upgrade import (
    Relaunch,
    UpgradeError,
    Upgrades,
    check_reason,
    keep_across_exec,
    relaunch_for_run,
    relaunch_for_twistd,
    run_check,
)


class HandoverTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        h = Handover(42, "abc", (("http", 7), ("https", 8), ("http3", 9)), 10, 2.5,
                     ({"pid": 100, "fd": 11},))
        self.assertEqual(Handover.from_text(h.to_text()), h)

    def test_activated_kinds(self) -> None:
        h = Handover(42, "abc", (("http", 7),), activated=("http",))
        self.assertEqual(Handover.from_text(h.to_text()).activated, ("http",))
        older = '{"pid": 42, "id": "a", "sockets": [["http", 7]]}'
        self.assertEqual(Handover.from_text(older).activated, ())

    def test_malformed(self) -> None:
        for text in ("", "{}", '{"pid": "x", "id": "a", "sockets": []}', "[1]"):
            self.assertRaises(StartupError, Handover.from_text, text)


def fake_describe(fd: int) -> InheritedSocket:
    return InheritedSocket(fd, socket.AF_INET, 8000 + fd)


class UpgradeSocketsTests(SynchronousTestCase):
    def read(self, environ: dict[str, str], pid: int = 42) -> Any:
        self.kept: list[int] = []
        self.controls: list[int] = []
        return upgrade_sockets(
            environ, getpid=lambda: pid, describe=fake_describe,
            describe_datagram=lambda fd: InheritedSocket(fd, socket.AF_INET6, 9000 + fd),
            describe_control=lambda fd: self.controls.append(fd) or "/run/m.sock",
            keep_from_children=self.kept.append,
        )

    def test_none_without_the_variable(self) -> None:
        self.assertIsNone(self.read({"HOME": "/"}))

    def test_sockets_by_kind(self) -> None:
        h = Handover(42, "u1", (("http", 5), ("http", 6), ("https", 7), ("metrics", 8),
                                ("http3", 9)), 12)
        environ = {UPGRADE_VARIABLE: h.to_text(), "HOME": "/"}
        result = self.read(environ)
        self.assertEqual(environ, {"HOME": "/"})
        self.assertEqual(result.get("http"), (fake_describe(5), fake_describe(6)))
        self.assertEqual(result.port("https"), 8007)
        self.assertEqual(result.port("metrics"), 8008)
        self.assertEqual(result.get("http3"), (InheritedSocket(9, socket.AF_INET6, 9009),))
        self.assertEqual(result.control, 12)
        self.assertEqual(result.handover, h)
        self.assertEqual(self.kept, [5, 6, 7, 8, 9, 12])
        self.assertEqual(self.controls, [12])

    def test_for_another_process(self) -> None:
        """
        A child that inherited the variable (it names another PID) ignores it.
        """
        environ = {UPGRADE_VARIABLE: Handover(41, "u", (("http", 5),)).to_text()}
        self.assertIsNone(self.read(environ))
        self.assertEqual(environ, {})

    def test_unknown_kind(self) -> None:
        environ = {UPGRADE_VARIABLE: Handover(42, "u", (("gopher", 5),)).to_text()}
        self.assertRaises(StartupError, self.read, environ)


class DescribeTests(SynchronousTestCase):
    def test_datagram(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        found = describe_datagram_socket(s.fileno())
        self.assertEqual((found.family, found.port), (socket.AF_INET, s.getsockname()[1]))
        t = socket.socket()
        self.addCleanup(t.close)
        self.assertRaises(StartupError, describe_datagram_socket, t.fileno())

    def test_control(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "c.sock")
        s = socket.socket(socket.AF_UNIX)
        self.addCleanup(s.close)
        s.bind(path)
        self.assertRaises(StartupError, describe_control_socket, s.fileno())
        s.listen()
        self.assertEqual(describe_control_socket(s.fileno()), path)


class FakeServer:
    def __init__(self) -> None:
        self.drained: list[float] = []
        self.drain = Deferred()
        self.saved = 0
        self.stop_signals = None
        self.control = self

    def listening_sockets(self) -> list[tuple[str, int]]:
        return [("http", 5), ("https", 6)]

    def fileno(self) -> int:
        return 7

    def drain_for_upgrade(self, timeout: float) -> Deferred[Any]:
        self.drained.append(timeout)
        return self.drain

    def save_state(self) -> None:
        self.saved += 1


class UpgradesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.server = FakeServer()
        self.logger = ListLogger()
        self.checked: list[Any] = []
        self.check_result: Deferred[None] = Deferred()
        self.execs: list[Any] = []
        self.flushed = 0
        self.upgrades = Upgrades(
            self.reactor, self.server, self.logger, environ={"PATH": "/bin"},
            execv=lambda path, argv, env: self.execs.append((path, argv, env)),
            check=lambda reactor, argv, env: self.checked.append((argv, env))
            or self.check_result,
            keep=lambda fd: fd + 100, getpid=lambda: 42, flush=self.flush,
        )
        self.upgrades.relaunch = Relaunch(("/py", "-m", "mproxy", "run"), ("/py", "check"))
        self.progress: list[tuple[str, str]] = []

    def flush(self) -> None:
        self.flushed += 1

    def start(self, id: str = "u1") -> Deferred[None]:
        return self.upgrades.upgrade(id, 3.0, lambda *a: self.progress.append(a))

    def test_check_then_drain_then_exec(self) -> None:
        d = self.start()
        self.assertEqual(self.checked, [(("/py", "check"), {"PATH": "/bin"})])
        self.assertEqual(self.server.drained, [], "nothing is touched before the check")
        self.check_result.callback(None)
        self.assertEqual(self.server.drained, [3.0])
        self.assertEqual(self.server.saved, 0)
        self.server.drain.callback(None)
        self.assertEqual(self.server.saved, 1)
        self.assertEqual(self.execs, [])
        self.reactor.advance(0)
        self.reactor.advance(0)
        [(path, argv, env)] = self.execs
        self.assertEqual((path, argv), ("/py", ["/py", "-m", "mproxy", "run"]))
        self.assertEqual(env["PATH"], "/bin")
        handover = Handover.from_text(env[UPGRADE_VARIABLE])
        self.assertEqual(handover, Handover(42, "u1", (("http", 105), ("https", 106)), 107, 3.0))
        self.assertEqual(self.flushed, 1)
        self.assertEqual([p[0] for p in self.progress], ["check", "drain", "exec"])

    def test_activated_kinds_handed_over(self) -> None:
        """
        The kinds whose sockets came from socket activation are named in
        the handover (the next image keeps them shared by its workers).
        """
        self.server.activated_kinds = ("http",)
        self.start()
        self.check_result.callback(None)
        self.server.drain.callback(None)
        self.reactor.advance(0)
        self.reactor.advance(0)
        [(_path, _argv, env)] = self.execs
        self.assertEqual(Handover.from_text(env[UPGRADE_VARIABLE]).activated, ("http",))

    def test_check_fails(self) -> None:
        d = self.start()
        self.check_result.errback(UpgradeError("the new code cannot start: boom"))
        self.assertIn("boom", str(self.failureResultOf(d, UpgradeError).value))
        self.assertEqual(self.server.drained, [])
        self.assertEqual(self.execs, [])
        self.assertIsNone(self.upgrades.running)
        self.assertEqual(self.logger.messages()[-1], "Upgrade failed")

    def test_one_at_a_time(self) -> None:
        self.start("u1")
        second = self.start("u2")
        self.assertIn("already in progress", str(self.failureResultOf(second).value))

    def test_refused(self) -> None:
        self.upgrades.relaunch = Relaunch((), ("c",), refusal="not here")
        self.assertEqual(str(self.failureResultOf(self.start(), UpgradeError).value),
                         "not here")
        self.upgrades.relaunch = None
        self.failureResultOf(self.start(), UpgradeError)
        self.assertEqual(self.checked, [])

    def test_shutting_down(self) -> None:
        class Stopping:
            stopping = True

        self.server.stop_signals = Stopping()
        self.failureResultOf(self.start(), UpgradeError)

    def test_exec_fails(self) -> None:
        def broken(*a: Any) -> None:
            raise OSError(2, "No such file")

        self.upgrades.execv = broken
        self.reactor.running = True
        stopped: list[bool] = []
        self.reactor.stop = lambda: stopped.append(True)  # type: ignore[method-assign]
        self.start()
        self.check_result.callback(None)
        self.server.drain.callback(None)
        self.reactor.advance(0)
        self.reactor.advance(0)
        self.assertEqual(stopped, [True])

    def test_before_exec(self) -> None:
        ran: list[int] = []
        self.upgrades.relaunch = Relaunch(("/py",), ("c",),
                                          before_exec=lambda: ran.append(len(self.execs)))
        self.start()
        self.check_result.callback(None)
        self.server.drain.callback(None)
        self.reactor.advance(0)
        self.reactor.advance(0)
        self.assertEqual(ran, [0])
        self.assertEqual(len(self.execs), 1)


class OutcomeTests(SynchronousTestCase):
    def upgrades(self, handover: Handover | None) -> Upgrades:
        return Upgrades(MemoryReactorClock(), FakeServer(), ListLogger(), handover=handover,
                        getpid=lambda: 42)

    def test_done_once_serving(self) -> None:
        u = self.upgrades(Handover(42, "u1", ()))
        d = u.outcome("u1")
        self.assertNoResult(d)
        u.serving()
        self.assertEqual(self.successResultOf(d), {"id": "u1", "pid": 42})
        self.assertEqual(self.successResultOf(u.outcome("u1"))["pid"], 42)

    def test_unknown(self) -> None:
        self.failureResultOf(self.upgrades(Handover(42, "u1", ())).outcome("u2"), UpgradeError)
        self.failureResultOf(self.upgrades(None).outcome("u1"), UpgradeError)


class FakeChannel:
    def __init__(self) -> None:
        self._outstandingRequests: dict[bytes, Any] = {}


class FakeWorker:
    def __init__(self) -> None:
        self.channel = FakeChannel()


class FakeSpare:
    pid = 102
    gone = False

    def __init__(self) -> None:
        class Transport:
            def fileno(self) -> int:
                return 22

        self.channel = FakeChannel()
        self.channel.transport = Transport()  # type: ignore[attr-defined]


class FakePool:
    def __init__(self) -> None:
        self.workers = [FakeWorker(), FakeWorker()]
        self.standby = [FakeSpare()]
        self.adopted: list[Any] = []
        self.started: Deferred[Any] = Deferred()
        self.retiring: dict[Any, tuple[float, Deferred[None]]] = {}

    def channels(self) -> list[tuple[int, int, int]]:
        return [(100, 20, 1), (101, 21, 1)]

    def adopt(self, channels: Any) -> list[str]:
        self.adopted.extend(channels)
        return ["old"]

    def start_generation(self) -> Deferred[Any]:
        return self.started

    def retire(self, generation: Any, grace: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.retiring[generation] = (grace, d)
        return d


class GenerationHandoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pool = FakePool()
        self.logger = ListLogger()
        handover = Handover(42, "u1", (), None, 4.0, ([100, 20, 1], [101, 21, 1]))
        self.reactor = MemoryReactorClock()
        self.exited: set[int] = set()
        self.reaped: list[int] = []
        self.upgrades = Upgrades(self.reactor, FakeServer(), self.logger,
                                 handover=handover, getpid=lambda: 42, waitpid=self.waitpid)
        self.progress: list[tuple[str, str]] = []

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        self.assertEqual(options, os.WNOHANG)
        if pid in self.reaped:
            raise ChildProcessError()
        if pid in self.exited:
            self.reaped.append(pid)
            return pid, 0
        return 0, 0

    def test_adopted_workers_are_reaped(self) -> None:
        """
        The adopted workers (children Twisted did not start) are reaped
        when they exit, each by its PID.
        """
        self.upgrades.start_generation(self.pool)
        self.assertEqual(self.reaped, [])
        self.exited.add(101)
        self.reactor.advance(0.5)
        self.assertEqual(self.reaped, [101])
        self.exited.add(100)
        self.reactor.advance(0.5)
        self.assertEqual(self.reaped, [101, 100])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_old_generation_retired_once_the_new_serves(self) -> None:
        serving = self.upgrades.start_generation(self.pool)
        self.assertEqual(self.pool.adopted, [(100, 20, 1), (101, 21, 1)])
        outcome = self.upgrades.outcome("u1", lambda *a: self.progress.append(a))
        self.assertEqual(self.pool.retiring, {}, "the old serve until the new do")
        self.pool.started.callback("new")
        self.assertEqual(self.successResultOf(serving), "new")
        self.assertEqual(list(self.pool.retiring), ["old"])
        self.assertEqual(self.pool.retiring["old"][0], 4.0)
        self.assertEqual([p[0] for p in self.progress], ["retire"])
        self.upgrades.serving()
        self.assertNoResult(outcome)
        self.pool.retiring["old"][1].callback(None)
        self.assertEqual(self.successResultOf(outcome), {"id": "u1", "pid": 42})
        later = self.upgrades.outcome("u1")
        self.assertEqual(self.successResultOf(later)["pid"], 42)

    def test_no_upgrade_while_the_old_generation_drains(self) -> None:
        self.upgrades.relaunch = Relaunch(("/py",), ("c",))
        self.upgrades.start_generation(self.pool)
        self.pool.started.callback("new")
        refused = self.upgrades.upgrade("u2", 1.0)
        self.assertIn("still finishing", str(self.failureResultOf(refused, UpgradeError).value))
        self.pool.retiring["old"][1].callback(None)
        self.upgrades.serving()
        checks: list[Any] = []
        self.upgrades.check = lambda *a: checks.append(a) or Deferred()
        self.assertNoResult(self.upgrades.upgrade("u2", 1.0))
        self.assertEqual(len(checks), 1, "now it checks the new code")

    def test_new_generation_fails_old_serves_on(self) -> None:
        serving = self.upgrades.start_generation(self.pool)
        outcome = self.upgrades.outcome("u1")
        self.pool.started.errback(RuntimeError("worker 0 ended before serving"))
        self.assertEqual(self.successResultOf(serving), "old")
        self.assertEqual(self.pool.retiring, {})
        error = self.failureResultOf(outcome, UpgradeError).value
        self.assertIn("worker 0 ended before serving", str(error))

    def test_without_handover(self) -> None:
        upgrades = Upgrades(MemoryReactorClock(), FakeServer(), ListLogger())
        d = upgrades.start_generation(self.pool)
        self.assertEqual(self.pool.adopted, [])
        self.pool.started.errback(RuntimeError("no"))
        self.failureResultOf(d, RuntimeError)

    def test_channels_kept_across_the_exec(self) -> None:
        server = FakeServer()
        server.pool = self.pool  # type: ignore[attr-defined]
        execs: list[Any] = []
        reactor = MemoryReactorClock()
        upgrades = Upgrades(reactor, server, ListLogger(), environ={},
                            execv=lambda *a: execs.append(a), check=lambda *a: succeed(None),
                            keep=lambda fd: fd + 100, getpid=lambda: 42, flush=lambda: None)
        upgrades.relaunch = Relaunch(("/py",), ("c",))
        upgrades.upgrade("u2", 5.0)
        server.drain.callback(None)
        reactor.advance(0)
        reactor.advance(0)
        handover = Handover.from_text(execs[0][2][UPGRADE_VARIABLE])
        self.assertEqual(handover.channels, ([100, 120, 1], [101, 121, 1], [102, 122, 0]))

    def exec_with_busy_channel(self) -> tuple[MemoryReactorClock, list[Any]]:
        server = FakeServer()
        server.pool = self.pool  # type: ignore[attr-defined]
        execs: list[Any] = []
        reactor = MemoryReactorClock()
        upgrades = Upgrades(reactor, server, ListLogger(), environ={},
                            execv=lambda *a: execs.append(a), check=lambda *a: succeed(None),
                            keep=lambda fd: fd, getpid=lambda: 42, flush=lambda: None)
        upgrades.relaunch = Relaunch(("/py",), ("c",))
        self.pool.workers[1].channel._outstandingRequests[b"1"] = Deferred()
        upgrades.upgrade("u3", 5.0)
        server.drain.callback(None)
        reactor.advance(0)
        reactor.advance(0)
        return reactor, execs

    def test_exec_waits_for_the_workers_answers(self) -> None:
        """
        The exec waits while a worker owes an answer: the new image would
        get an answer to a question it never asked.
        """
        reactor, execs = self.exec_with_busy_channel()
        reactor.advance(0.5)
        self.assertEqual(execs, [])
        self.pool.workers[1].channel._outstandingRequests.clear()
        reactor.advance(0.01)
        self.assertEqual(len(execs), 1)

    def test_exec_waits_only_so_long(self) -> None:
        reactor, execs = self.exec_with_busy_channel()
        for _ in range(300):
            reactor.advance(0.01)
        self.assertEqual(len(execs), 1)


class RelaunchTests(SynchronousTestCase):
    def test_run(self) -> None:
        r = relaunch_for_run(["--http-port", "8080"])
        self.assertEqual(r.check_argv[-3:], ("upgrade-check", "--http-port", "8080"))
        self.assertIsNone(r.refusal)

    def test_twistd_foreground(self) -> None:
        removed: list[str] = []
        r = relaunch_for_twistd(
            {"nodaemon": True, "pidfile": "/run/t.pid"},
            ["/py", "/bin/twistd", "-n", "mproxy", "--http-port", "81"],
            remove=removed.append,
        )
        self.assertEqual(r.argv[1:], ("/bin/twistd", "-n", "mproxy", "--http-port", "81"))
        self.assertEqual(r.check_argv[-3:], ("upgrade-check", "--http-port", "81"))
        assert r.before_exec is not None
        r.before_exec()
        self.assertEqual(removed, ["/run/t.pid"])

    def test_twistd_daemon_refused(self) -> None:
        r = relaunch_for_twistd({"nodaemon": False}, ["/py", "/bin/twistd", "mproxy"])
        self.assertIn("daemonized twistd", r.refusal or "")


class CheckTests(SynchronousTestCase):
    def test_reason(self) -> None:
        self.assertEqual(check_reason(1, "x\nError: bad state file\n"), "bad state file")
        self.assertEqual(check_reason(1, "Traceback\nImportError: no module\n"),
                         "ImportError: no module")
        self.assertEqual(check_reason(3, ""), "exit status 3")

    def spawn(self) -> Any:
        test = self

        class Reactor(MemoryReactorClock):
            def spawnProcess(self, protocol: Any, path: str, argv: list[str],
                             env: dict[str, str]) -> Any:
                test.spawned = (protocol, path, argv, env)
                test.signals: list[str] = []

                class Process:
                    def signalProcess(self, name: str) -> None:
                        test.signals.append(name)

                return Process()

        return Reactor()

    def end(self, status: int | None, sig: int | None = None) -> None:
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        self.spawned[0].processEnded(Failure(ProcessTerminated(status, sig)))

    def test_run_check_passes(self) -> None:
        reactor = self.spawn()
        d = run_check(reactor, ["/py", "check"], {"A": "1"})
        self.assertEqual(self.spawned[1:], ("/py", ["/py", "check"], {"A": "1"}))
        self.assertNoResult(d)
        self.end(0)
        self.successResultOf(d)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_run_check_fails_with_the_reason(self) -> None:
        reactor = self.spawn()
        d = run_check(reactor, ["/py", "check"], {})
        self.spawned[0].errReceived(b"Error: cannot read state file /x: bad JSON\n")
        self.end(1)
        self.assertEqual(str(self.failureResultOf(d, UpgradeError).value),
                         "the new code cannot start: cannot read state file /x: bad JSON")

    def test_run_check_times_out(self) -> None:
        reactor = self.spawn()
        d = run_check(reactor, ["/py", "check"], {}, timeout=5.0)
        reactor.advance(5.0)
        self.assertEqual(self.signals, ["KILL"])
        self.end(None, 9)
        self.assertIn("within 5s", str(self.failureResultOf(d, UpgradeError).value))

    def test_keep_across_exec(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        kept = keep_across_exec(r)
        self.addCleanup(os.close, kept)
        self.assertNotEqual(kept, r)
        self.assertTrue(os.get_inheritable(kept))


class ListenerTests(SynchronousTestCase):
    def test_stop_accepting_keeps_listening(self) -> None:
        class Port:
            reading = True

            def fileno(self) -> int:
                return 9

            def stopReading(self) -> None:
                self.reading = False

        listener = Listener("HTTP", None, 0, [])
        port = Port()
        listener._ports.append(port)
        self.assertEqual(listener.filenos(), [9])
        listener.stop_accepting()
        self.assertFalse(port.reading)
        self.assertEqual(listener.filenos(), [9])


class ControlAdoptionTests(SynchronousTestCase):
    def test_adopts_a_socket_for_its_path(self) -> None:
        reactor = MemoryReactorClock()
        adopted: list[Any] = []
        reactor.adoptStreamPort = lambda fd, family, factory: (  # type: ignore[method-assign]
            adopted.append((fd, family)) or object())
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "c.sock")
        open(path, "w").close()
        os.chmod(path, 0o666)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        service = ControlSocketService(reactor, path, None, ListLogger(), inherited=w,
                                       bound_path=lambda fd: path)
        service.startService()
        self.assertEqual(adopted, [(w, socket.AF_UNIX)])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertRaises(OSError, os.fstat, w)  # the port has its own duplicate

    def test_other_path_is_closed_and_bound(self) -> None:
        reactor = MemoryReactorClock()
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "c.sock")
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        logger = ListLogger()
        service = ControlSocketService(reactor, path, None, logger, inherited=w,
                                       bound_path=lambda fd: "/elsewhere.sock")
        service.startService()
        self.assertRaises(OSError, os.fstat, w)
        self.assertEqual(len(reactor.unixServers), 1)


class SignalTests(SynchronousTestCase):
    def test_sigusr2_upgrades(self) -> None:
        installed: dict[int, Any] = {}

        def install(number: int, handler: Any) -> Any:
            previous = installed.get(number)
            installed[number] = handler
            return previous

        class Reactor:
            def callFromThread(self, f: Any, *a: Any) -> None:
                f(*a)

        class FakeUpgrades:
            def __init__(self) -> None:
                self.calls: list[Any] = []

            def upgrade(self, id: str, timeout: float) -> Deferred[None]:
                self.calls.append((id, timeout))
                return fail(UpgradeError("already"))

        upgrades = FakeUpgrades()
        logger = ListLogger()
        uninstall = install_upgrade_signal(Reactor(), upgrades, logger, install=install)
        installed[signal.SIGUSR2](signal.SIGUSR2, None)
        self.assertEqual(len(upgrades.calls), 1)
        self.assertTrue(upgrades.calls[0][0].startswith("signal-"))
        self.assertEqual(logger.messages(), ["Upgrade on SIGUSR2 refused"])
        assert uninstall is not None
        uninstall()
        self.assertEqual(installed[signal.SIGUSR2], signal.SIG_DFL)


class CommandTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), Streams(out, err))
        return status, out.getvalue(), err.getvalue()

    def test_help(self) -> None:
        status, out, _ = self.run_main("help")
        self.assertIn("upgrade ", out)
        status, out, _ = self.run_main("upgrade", "--help")
        self.assertEqual(status, 0)
        self.assertIn("--drain-timeout", out)
        self.assertNotIn("upgrade-check", self.run_main("help")[1])

    def test_bad_flag(self) -> None:
        status, _, err = self.run_main("upgrade", "--drain-timeout", "soon")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("Error: "), err)

    def test_check_bad_option(self) -> None:
        status, _, err = self.run_main("upgrade-check", "--http-port", "99999")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("Error: "), err)

    def test_check_passes_and_fails_on_the_state(self) -> None:
        from twisted.internet.testing import MemoryReactorClock as R

        from mproxy.cli.parsing import run_command
        from mproxy.upgrade import check_installed

        directory = tempfile.mkdtemp()
        ns = run_command().parse(["--state-dir", directory, "--socket",
                                  os.path.join(directory, "s")])
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check_installed(ns, Streams(out, err), R()), 0, err.getvalue())
        self.assertEqual(os.listdir(directory), [], "the check writes nothing")
        with open(os.path.join(directory, "mproxy.state"), "w") as f:
            f.write("{nope")
        self.assertEqual(check_installed(ns, Streams(out, err), R()), 1)
        self.assertIn("Error: ", err.getvalue())
