"""
The real C{mproxy} in child processes: L{MproxyProcess} runs C{mproxy run} on
free loopback ports and runs C{mproxy} commands against it;
L{run_mproxy} runs one command on its own; L{CommandProtocol} and
L{child_env} are the pieces for spawning anything else (C{twistd mproxy},
another Python) the same way.
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


@frozen
class CommandResult:
    """
    How a child process ended: its exit status (minus the signal number
    when a signal killed it), and what it wrote to stdout and stderr.
    """

    status: int
    out: str
    err: str


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment for a child C{mproxy}: this one without C{MPROXY_*}
    variables, with C{PYTHONPATH} leading to the C{mproxy} being tested,
    plus C{extra}.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPROXY_")}
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(package)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


class CommandProtocol(protocol.ProcessProtocol):
    """
    Collects a child's stdout (C{out}) and stderr (C{err}) as they arrive;
    C{done} fires with a L{CommandResult} when the child has ended.
    """

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


class ServerProtocol(protocol.ProcessProtocol):
    """
    Reads a running server's JSON log from its stdout: every record is kept
    in C{records}; C{started} fires with the "Server started" record (or
    fails if the process ends first), C{ended} with its exit status.
    """

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
        self.protocol: ServerProtocol | None = None

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
        self.protocol = ServerProtocol()
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
            self.protocol, sys.executable, args, env=child_env()
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
        self.reactor.spawnProcess(CommandProtocol(done), sys.executable, argv, env=child_env(env))
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


def run_mproxy(
    reactor: Any, *args: str, env: dict[str, str] | None = None
) -> Deferred[CommandResult]:
    """
    Run C{mproxy <args>} (no socket added) in a child process; fires with
    its L{CommandResult}.
    """
    done: Deferred[CommandResult] = Deferred()
    argv = [sys.executable, "-m", "mproxy", *args]
    reactor.spawnProcess(CommandProtocol(done), sys.executable, argv, env=child_env(env))
    return done
