"""
Integration tests of the server's lifecycle: the real C{mproxy run} and
C{twistd mproxy} in child processes (start-up failures, clean stops, where
the log lines go), the control socket's ownership checks, running out of
file descriptors, and the seed spelling's redeploy versus a host conflict.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mproxy.testing import (
    CommandProtocol,
    CommandResult,
    MproxyProcess,
    child_env,
    listen_upstream,
)

TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def spawn(argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> Deferred[CommandResult]:
    done: Deferred[CommandResult] = Deferred()
    reactor.spawnProcess(CommandProtocol(done), sys.executable, argv, env=child_env(env), **kw)
    return done


@inlineCallbacks
def wait_for(predicate: Any, seconds: float = 20.0) -> Any:
    for _ in range(int(seconds / 0.1)):
        if predicate():
            return True
        yield sleep(0.1)
    return predicate()


class TwistdProcess(MproxyProcess):
    """
    C{twistd -n mproxy} instead of C{mproxy run}, otherwise the same.
    """

    def argv(self, *args: str) -> list[str]:
        if args and args[0] == "run":
            return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mproxy", *args[1:]]
        return super().argv(*args)


class Helpers:
    timeout = 120

    def short_dir(self) -> str:
        d = tempfile.mkdtemp(prefix="mpl-")
        os.chmod(d, 0o755)
        self.addCleanup(shutil.rmtree, d, True)  # type: ignore[attr-defined]
        return d

    @inlineCallbacks
    def started(self, cls: type[MproxyProcess] = MproxyProcess) -> Any:
        p = cls(reactor, self.mktemp())  # type: ignore[attr-defined]
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)  # type: ignore[attr-defined]
        return p

    def occupied_port(self) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)  # type: ignore[attr-defined]
        return int(s.getsockname()[1])


class CleanStopTests(Helpers, TestCase):
    @inlineCallbacks
    def check_stop_removes_socket(self, cls: type[MproxyProcess], sig: int) -> Any:
        p = yield self.started(cls)
        self.assertTrue(os.path.exists(p.socket))
        status = yield p.stop(sig)
        # twistd ends a clean stop on a signal by re-raising that signal.
        expected = -sig if cls is TwistdProcess else 0
        self.assertEqual(status, expected, p.protocol.stderr if p.protocol else "")
        self.assertFalse(os.path.exists(p.socket), "the control socket file was left behind")
        self.assertTrue(any(r.get("msg") == "Server stopped" for r in p.records))
        return p

    def test_sigterm_removes_the_control_socket(self) -> Any:
        return self.check_stop_removes_socket(MproxyProcess, signal.SIGTERM)

    def test_sigint_removes_the_control_socket(self) -> Any:
        return self.check_stop_removes_socket(MproxyProcess, signal.SIGINT)

    def test_twistd_stop_removes_the_control_socket(self) -> Any:
        return self.check_stop_removes_socket(TwistdProcess, signal.SIGTERM)

    @inlineCallbacks
    def check_repeated_signals(self, cls: type[MproxyProcess]) -> Any:
        """
        Stop signals repeated while a request holds the shutdown open are
        logged and change nothing: no error, the request completes, the
        exit is the clean one.
        """
        app, upstream = listen_upstream(reactor, "one")
        self.addCleanup(upstream.stopListening)
        p = yield self.started(cls)
        r = yield p.command("deploy", f"127.0.0.1:{upstream.getHost().port}")
        self.assertEqual(r.status, 0, r.err)

        def get() -> bytes:
            with socket.create_connection(("127.0.0.1", p.http_port), timeout=20) as s:
                s.sendall(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return b"".join(iter(lambda: s.recv(65536), b""))

        slow = deferToThread(get)
        self.assertTrue((yield wait_for(lambda: app.requests == 1)))
        p.send_signal(signal.SIGTERM)
        yield sleep(0.3)
        p.send_signal(signal.SIGTERM)
        yield sleep(0.1)  # one signal pending at a time: the kernel merges repeats
        p.send_signal(signal.SIGINT)
        yield sleep(0.1)
        status = yield p.stop(signal.SIGTERM)
        answer = yield slow
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"one", answer.split(b"\r\n\r\n", 1)[1])
        expected = -signal.SIGTERM if cls is TwistdProcess else 0
        self.assertEqual(status, expected, p.protocol.stderr if p.protocol else "")
        errors = [x for x in p.records if x.get("level") == "ERROR"]
        self.assertEqual(errors, [])
        self.assertNotIn(b"Traceback", p.protocol.stderr if p.protocol else b"")
        self.assertEqual(
            sorted(x.get("signal") for x in p.records if x.get("msg") == "Already shutting down"),
            ["SIGINT", "SIGTERM", "SIGTERM"],
        )
        self.assertEqual([x["msg"] for x in p.records][-1], "Server stopped")

    def test_repeated_stop_signals_are_harmless(self) -> Any:
        return self.check_repeated_signals(MproxyProcess)

    def test_twistd_repeated_stop_signals_are_harmless(self) -> Any:
        return self.check_repeated_signals(TwistdProcess)

    @inlineCallbacks
    def test_twistd_stdout_carries_only_json(self) -> Any:
        """
        Under C{twistd -n}, every line on stdout, from start to stop, is a
        JSON log line: twistd's own text lines ("twistd ... starting up",
        "reactor class", "Main loop terminated") are not there.
        """
        d = self.short_dir()
        socket_path = os.path.join(d, "s.sock")
        done: Deferred[CommandResult] = Deferred()
        collect = CommandProtocol(done)
        process = reactor.spawnProcess(
            collect, sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mproxy", "--bind", "127.0.0.1",
             "--http-port", "0", "--https-port", "0", "--socket", socket_path,
             "--state-dir", os.path.join(d, "state")],
            env=child_env(),
        )
        self.addCleanup(lambda: done if done.called else (process.signalProcess("KILL"), done)[1])
        self.assertTrue((yield wait_for(lambda: b"Server started" in b"".join(collect.out))))
        process.signalProcess("TERM")
        r = yield done
        self.assertFalse(os.path.exists(socket_path))
        lines = r.out.splitlines()
        messages = [json.loads(line)["msg"] for line in lines]
        self.assertIn("Server started", messages)
        self.assertEqual(messages[-1], "Server stopped")

    @inlineCallbacks
    def test_stale_temporary_files_cleaned_at_start(self) -> Any:
        p = MproxyProcess(reactor, self.mktemp())
        os.makedirs(p.state_dir)
        stale = os.path.join(p.state_dir, ".tmp-deadbeef")
        with open(stale, "w") as f:
            f.write("{half")
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        self.assertFalse(os.path.exists(stale))


class TwistdStartupFailureTests(Helpers, TestCase):
    """
    A start-up failure under twistd exits non-zero with a plain
    C{Error: ...}; it used to stay up with nothing listening.
    """

    def twistd(self, directory: str, *args: str, daemon: bool = False) -> Deferred[CommandResult]:
        socket_path = os.path.join(self.short_dir(), "s.sock")
        argv = [sys.executable, "-c", TWISTD]
        if daemon:
            argv += ["--logfile", os.path.join(directory, "twistd.log"),
                     "--pidfile", os.path.join(directory, "twistd.pid")]
        else:
            argv += ["-n", "--pidfile="]
        argv += ["mproxy", "--bind", "127.0.0.1", "--socket", socket_path,
                 "--state-dir", os.path.join(directory, "state"), *args]
        return spawn(argv)

    @inlineCallbacks
    def test_port_in_use(self) -> Any:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        port = self.occupied_port()
        r = yield self.twistd(d, "--http-port", str(port), "--https-port", "0")
        self.assertNotEqual(r.status, 0)
        self.assertIn(f"Error: cannot listen for HTTP on port {port}", r.err)
        self.assertNotIn("Traceback", r.err)
        for line in r.out.splitlines():
            json.loads(line)

    @inlineCallbacks
    def test_corrupt_state(self) -> Any:
        d = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(d, "state"))
        with open(os.path.join(d, "state", "mproxy.state"), "w") as f:
            f.write("{not json")
        r = yield self.twistd(d, "--http-port", "0", "--https-port", "0")
        self.assertNotEqual(r.status, 0)
        self.assertIn("Error: state file", r.err)
        self.assertIn("corrupt", r.err)

    @inlineCallbacks
    def test_daemon_port_in_use(self) -> Any:
        """
        A daemon's parent waits for the start and exits non-zero with the
        reason; the JSON log file says why too.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        port = self.occupied_port()
        r = yield self.twistd(d, "--http-port", str(port), "--https-port", "0", daemon=True)
        self.assertNotEqual(r.status, 0)
        self.assertIn("cannot listen for HTTP", r.err)
        with open(os.path.join(d, "twistd.log")) as f:
            records = [json.loads(line) for line in f]
        self.assertIn("Unable to start", [x["msg"] for x in records])

    @inlineCallbacks
    def test_daemon_logs_json_to_its_log_file(self) -> Any:
        """
        In daemon mode the JSON lines (server, requests) go to twistd's log
        file; a clean stop removes the control socket.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        app, upstream = listen_upstream(reactor, "one")
        self.addCleanup(upstream.stopListening)
        socket_path = os.path.join(self.short_dir(), "s.sock")
        log_path = os.path.join(d, "twistd.log")
        pid_path = os.path.join(d, "twistd.pid")
        r = yield spawn([sys.executable, "-c", TWISTD, "--logfile", log_path,
                         "--pidfile", pid_path, "mproxy", "--bind", "127.0.0.1",
                         "--http-port", "0", "--https-port", "0", "--socket", socket_path,
                         "--state-dir", os.path.join(d, "state")])
        self.assertEqual(r.status, 0, r.err)
        with open(pid_path) as f:
            pid = int(f.read())

        def kill() -> None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

        self.addCleanup(kill)

        def records() -> list[dict[str, Any]]:
            with open(log_path) as f:
                return [json.loads(line) for line in f if line.strip()]

        def started() -> dict[str, Any] | None:
            return next((x for x in records() if x["msg"] == "Server started"), None)

        self.assertTrue((yield wait_for(started)))
        http_port = started()["http"]  # type: ignore[index]
        r = yield spawn([sys.executable, "-m", "mproxy", "deploy",
                         f"127.0.0.1:{upstream.getHost().port}", "--socket", socket_path])
        self.assertEqual(r.status, 0, r.err)

        def get() -> bytes:
            with socket.create_connection(("127.0.0.1", http_port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return b"".join(iter(lambda: s.recv(65536), b""))

        answer = yield deferToThread(get)
        self.assertTrue(answer.endswith(b"one"), answer)
        self.assertTrue((yield wait_for(lambda: any(x["msg"] == "Request" for x in records()))))
        os.kill(pid, signal.SIGTERM)
        self.assertTrue((yield wait_for(lambda: not os.path.exists(pid_path))))
        self.assertFalse(os.path.exists(socket_path))
        self.assertIn("Server stopped", [x["msg"] for x in records()])


class SocketOwnershipTests(Helpers, TestCase):
    """
    As root (CI), with real files and processes of another user.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root to create files and processes of another user")

    def strangers_socket(self) -> str:
        """
        A socket path in a directory everyone may write, owned by nobody.
        """
        d = self.short_dir()
        os.chmod(d, 0o1777)
        path = os.path.join(d, "mproxy.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        self.addCleanup(s.close)
        os.chown(path, 65534, 65534)
        return path

    @inlineCallbacks
    def test_server_refuses_a_strangers_socket(self) -> Any:
        path = self.strangers_socket()
        p = MproxyProcess(reactor, self.mktemp())
        p.socket = path
        with self.assertRaises(RuntimeError) as e:
            yield p.start()
        self.assertIn(f"Error: control socket {path} belongs to user nobody", str(e.exception))
        self.assertEqual(os.stat(path).st_uid, 65534)

    @inlineCallbacks
    def test_cli_refuses_a_strangers_socket(self) -> Any:
        path = self.strangers_socket()
        r = yield spawn([sys.executable, "-m", "mproxy", "list", "--socket", path])
        self.assertEqual(r.status, 1)
        self.assertIn(f"Error: control socket {path} belongs to user nobody", r.err)
        self.assertNotIn("Traceback", r.err)

    @inlineCallbacks
    def test_cli_refuses_a_server_running_as_another_user(self) -> Any:
        """
        The file may say root while the process behind it is someone else:
        the peer credentials decide.
        """
        d = self.short_dir()
        os.chmod(d, 0o1777)
        path = os.path.join(d, "mproxy.sock")
        ready = os.path.join(d, "ready")
        server = (
            "import socket, os, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen(5)\n"
            f"open({ready!r}, 'w').close()\n"
            "c, _ = s.accept(); time.sleep(30)\n"
        )
        # Another user may not be able to run this interpreter (under /root).
        python = "/usr/bin/python3"
        if not os.path.exists(python):
            raise SkipTest(f"{python} is needed to run a process as another user")
        done: Deferred[CommandResult] = Deferred()
        proc = reactor.spawnProcess(CommandProtocol(done), python, [python, "-c", server],
                                    env={}, path="/", uid=65534, gid=65534)
        self.addCleanup(lambda: (proc.signalProcess("KILL") if proc.pid else None, done)[1])
        self.assertTrue((yield wait_for(lambda: os.path.exists(ready))))
        os.chown(path, 0, 0)
        r = yield spawn([sys.executable, "-m", "mproxy", "list", "--socket", path])
        self.assertEqual(r.status, 1)
        self.assertIn(f"Error: the server on control socket {path} runs as user nobody", r.err)


class FileDescriptorLimitTests(Helpers, TestCase):
    @inlineCallbacks
    def test_running_out_of_descriptors_is_logged_once(self) -> Any:
        """
        With a low open-files limit, a burst of connections beyond it is
        logged as one warning (not one line per refused connection), and
        the server serves again once connections close.
        """
        limit = 64

        class Limited(MproxyProcess):
            def argv(self, *args: str) -> list[str]:
                if args and args[0] == "run":
                    code = (
                        "import resource, sys; "
                        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
                        "from mproxy.cli.main import run; sys.argv = ['mproxy'] + sys.argv[1:]; "
                        "run()"
                    )
                    return [sys.executable, "-c", code, *args]
                return super().argv(*args)

        p = yield self.started(Limited)
        opened: list[socket.socket] = []

        def flood() -> None:
            for _ in range(limit * 2):
                s = socket.create_connection(("127.0.0.1", p.http_port), timeout=5)
                opened.append(s)

        yield deferToThread(flood)

        def warnings() -> list[dict[str, Any]]:
            return [r for r in p.records
                    if r.get("msg") == "Out of file descriptors: refusing new connections"]

        self.assertTrue((yield wait_for(lambda: warnings())))
        yield sleep(0.5)
        self.assertEqual(len(warnings()), 1, warnings())
        self.assertEqual(warnings()[0]["level"], "WARN")
        for s in opened:
            s.close()
        yield sleep(0.5)
        r = yield p.command("list")
        self.assertEqual(r.status, 0, r.err)


class HostSpellingTests(Helpers, TestCase):
    @inlineCallbacks
    def test_seed_spelling_redeploys_kamal_spelling_conflicts(self) -> Any:
        """
        C{deploy other:5000 --host app1.example.com} names the service after
        the host, so it redeploys service app1.example.com; a differently
        named service claiming that host is refused.
        """
        a, addr_a = self.upstream("a")
        b, addr_b = self.upstream("b")
        c, addr_c = self.upstream("c")
        p = yield self.started()
        r = yield p.command("deploy", addr_a, "--host", "app1.example.com")
        self.assertEqual(r.status, 0, r.err)
        r = yield p.command("deploy", addr_b, "--host", "app1.example.com")
        self.assertEqual(r.status, 0, r.err)
        r = yield p.command("list", "--json")
        [service] = json.loads(r.out)
        self.assertEqual(service["service"], "app1.example.com")
        self.assertIn(addr_b, r.out)
        self.assertNotIn(addr_a, r.out)
        r = yield p.command("deploy", "other", "--target", addr_c, "--host", "app1.example.com")
        self.assertEqual(r.status, 1)
        self.assertEqual(
            r.err.strip(),
            "Error: host settings conflict with another service: host app1.example.com "
            "is served by service app1.example.com",
        )
        r = yield p.command("list", "--json")
        self.assertNotIn('"other"', r.out)

    def upstream(self, name: str) -> Any:
        app, port = listen_upstream(reactor, name)
        self.addCleanup(port.stopListening)
        return app, f"127.0.0.1:{port.getHost().port}"
