"""
The hitless upgrade (C{mproxy upgrade}, SIGUSR2): the running server is
replaced by the code installed now, in the same process, without closing a
listening socket.

  1. Pre-flight: the installed code is run as a child (L{CHECK_COMMAND})
     with the server's run options: it imports everything, parses the
     options and reads the state file.  If it fails, the upgrade fails with
     its reason and nothing changed.
  2. The control commands in progress (a deploy waiting for health or
     draining, a pause draining, ...) finish first, so that their clients
     get their answers from this image: the exec would close their
     connections.  From now on a new control command is refused with
     L{UpgradeInProgress} (nothing done), which the C{mproxy} client takes
     as a cue to wait and send it again to the new image.  When they do not
     finish within L{OPERATIONS_TIMEOUT}, the upgrade fails and everything
     goes on as before.
  3. The listening sockets (HTTP, HTTPS, metrics, HTTP/3's UDP) and the
     control socket are duplicated into descriptors kept across an exec.
     The server stops accepting and drains what it serves (in-flight
     requests finish, idle keep-alive connections are closed; new
     connections wait in the listening sockets' queues meanwhile), the
     state file is written, and the process re-executes its own command
     line (L{Relaunch}) with the descriptors named in C{MPROXY_UPGRADE}
     (L{mproxy.activation.Handover}); the PID stays the same.
  4. The new image adopts the sockets (L{mproxy.activation.upgrade_sockets})
     and restores the state; once it serves, the upgrade is done, and the
     client that asked for it (reconnected, since the exec closed its
     connection) is told so by L{Upgrades.outcome}.

With worker processes the supervisor serves no HTTP: it drains nothing
before the exec, and the workers' channels are handed over too, so the old
workers serve on through it.  The new image adopts them, starts a new
generation, and once that serves retires the old one (it drains up to the
drain timeout); the upgrade is done when the old workers are gone
(L{Upgrades.start_generation}).

The run options of the new image are the ones the server was started with:
the same command line and environment.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Sequence

from attrs import frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from mproxy.activation import UPGRADE_VARIABLE, Handover
from mproxy.errors import MproxyError, UpgradeError, UpgradeInProgress

#: The hidden command that checks the installed code before an upgrade.
CHECK_COMMAND = "upgrade-check"

#: Seconds the pre-flight check may take.
CHECK_TIMEOUT = 60.0

#: Seconds the exec waits for the workers to answer what was asked of them.
QUIET_TIMEOUT = 2.0

#: Seconds between looks for the exit of adopted workers.
REAP_INTERVAL = 0.5

#: How long the old server's connections may drain, by default.
DEFAULT_DRAIN_TIMEOUT = 10.0

#: Seconds the exec waits for the control commands in progress (a deploy's
#: default health wait and drain take up to a minute).
OPERATIONS_TIMEOUT = 120.0


class Operations:
    """
    The control commands in progress, each named as its user would say it
    (C{"deploy web"}), so an upgrade can wait until there are none.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._running: dict[int, str] = {}
        self._next = 0
        self._idle: list[Deferred[None]] = []

    def begin(self, what: str) -> Callable[[], None]:
        """
        Command C{what} started; call the function returned once its answer
        is sent.
        """
        self._next += 1
        token = self._next
        self._running[token] = what

        def end() -> None:
            if self._running.pop(token, None) is not None:
                # the answer is written in the callbacks after this one:
                # count the command as done on the next turn
                self.reactor.callLater(0, self._check)

        return end

    def running(self) -> list[str]:
        """
        The commands in progress, oldest first.
        """
        return list(self._running.values())

    def _check(self) -> None:
        if self._running:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            if not d.called:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        """
        Fires once no command is in progress.
        """
        d: Deferred[None] = Deferred()
        if self._running:
            self._idle.append(d)
        else:
            d.callback(None)
        return d


def describe_commands(names: Sequence[str]) -> str:
    """
    C{deploy web, pause api}; the same ones counted once (C{list (x2)}).
    """
    counted: dict[str, int] = {}
    for name in names:
        counted[name] = counted.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} (x{n})" for name, n in counted.items())


@frozen
class Relaunch:
    """
    How this server re-executes itself: C{argv} (C{argv[0]} the program),
    and C{check_argv}, the pre-flight check of the installed code with the
    same run options.  C{refusal}, when set, says why this server cannot be
    upgraded in place.  C{before_exec} runs just before the exec.
    """

    argv: tuple[str, ...]
    check_argv: tuple[str, ...]
    refusal: str | None = None
    before_exec: Callable[[], Any] | None = None


def relaunch_for_run(run_args: Sequence[str]) -> Relaunch:
    """
    The relaunch of C{mproxy run RUN_ARGS...} (as a console script or
    C{python -m mproxy}): the same interpreter command line.
    """
    return Relaunch(
        (sys.executable, *sys.orig_argv[1:]),
        (sys.executable, "-m", "mproxy", CHECK_COMMAND, *run_args),
    )


def relaunch_for_twistd(
    twistd_options: Mapping[str, Any], orig_argv: Sequence[str] | None = None,
    remove: Callable[[str], Any] = os.unlink,
) -> Relaunch:
    """
    The relaunch of C{twistd -n ... mproxy OPTIONS...}.  twistd refuses to
    start while its pidfile names a live process, and this one lives on: the
    file is removed just before the exec, and the new twistd writes it again
    with the same PID.  A daemonized twistd is refused: its re-executed
    command line would daemonize again, as a new process.
    """
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    try:
        plugin_args = argv[argv.index("mproxy", 2) + 1:]
    except ValueError:
        plugin_args = []
    check = (sys.executable, "-m", "mproxy", CHECK_COMMAND, *plugin_args)
    if not twistd_options.get("nodaemon"):
        return Relaunch(
            (), check,
            refusal="a daemonized twistd cannot be upgraded in place: run it in the "
            "foreground (twistd -n mproxy) under a supervisor such as systemd or Docker",
        )
    pidfile = twistd_options.get("pidfile") or ""

    def before_exec() -> None:
        if pidfile:
            try:
                remove(pidfile)
            except FileNotFoundError:
                pass

    return Relaunch((sys.executable, *argv[1:]), check, before_exec=before_exec)


class _CheckProtocol(ProcessProtocol):
    def __init__(self, done: Deferred[tuple[int, str]]) -> None:
        self.done = done
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        pass

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-8192:]

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        if code is None:
            code = -(reason.value.signal or 1)
        self.done.callback((code, self.err.decode("utf-8", "replace")))


def check_reason(status: int, stderr: str) -> str:
    """
    What a failed pre-flight check said: its last C{Error:} line, else the
    last line of its stderr, else its exit status.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line[len("Error: "):]
    if lines:
        return lines[-1]
    return f"exit status {status}"


def run_check(
    reactor: Any, argv: Sequence[str], environ: Mapping[str, str], timeout: float = CHECK_TIMEOUT
) -> Deferred[None]:
    """
    Run the pre-flight check C{argv}; fires when it passed, fails with
    L{UpgradeError} saying why it did not.
    """
    done: Deferred[tuple[int, str]] = Deferred()
    process = reactor.spawnProcess(_CheckProtocol(done), argv[0], list(argv), env=dict(environ))

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except Exception:
            pass

    timer = reactor.callLater(timeout, kill)

    def ended(result: tuple[int, str]) -> None:
        if timer.active():
            timer.cancel()
        status, stderr = result
        if status != 0:
            if status == -9 and not timer.active():
                raise UpgradeError(f"the new code did not pass its check within {timeout:g}s")
            raise UpgradeError(f"the new code cannot start: {check_reason(status, stderr)}")

    return done.addCallback(ended)


def keep_across_exec(fd: int, dup: Callable[[int], int] = os.dup) -> int:
    """
    A duplicate of C{fd} that an exec keeps open.
    """
    new = dup(fd)
    os.set_inheritable(new, True)
    return new


class Upgrades:
    """
    The upgrades of one server (C{server}, an L{mproxy.tree.MproxyService}):
    starting one (L{upgrade}) and answering for the one that brought this
    image up (L{outcome}).

    @ivar relaunch: how to re-execute; set by the entry point that started
        the server (without one, upgrades are refused).
    @ivar handover: what the image before handed over, when this image
        came from an upgrade.
    """

    def __init__(
        self,
        reactor: Any,
        server: Any,
        logger: Any,
        handover: Handover | None = None,
        environ: Mapping[str, str] = os.environ,
        execv: Callable[[str, Sequence[str], Mapping[str, str]], Any] = os.execve,
        check: Callable[[Any, Sequence[str], Mapping[str, str]], Deferred[None]] = run_check,
        keep: Callable[[int], int] = keep_across_exec,
        getpid: Callable[[], int] = os.getpid,
        flush: Callable[[], Any] | None = None,
        waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.logger = logger
        self.handover = handover
        self.environ = environ
        self.execv = execv
        self.check = check
        self.keep = keep
        self.getpid = getpid
        self.flush = flush or _flush_standard_streams
        self.waitpid = waitpid
        self.relaunch: Relaunch | None = None
        self.running: str | None = None
        self.operations = Operations(reactor)
        self.operations_timeout = OPERATIONS_TIMEOUT
        #: new control commands are refused (the exec is coming)
        self.holding = False
        self._waiting: list[tuple[Deferred[dict[str, Any]], Callable[[str, str], Any]]] = []
        self._done: dict[str, Any] | None = None
        self._pending = False  # old workers are still to retire
        self._serving = False
        self._phase: tuple[str, str] | None = None

    # The image before

    def admit(self, what: str) -> Callable[[], None]:
        """
        Control command C{what} may start: returns the function to call once
        it is answered (see L{Operations.begin}).

        @raise UpgradeInProgress: an upgrade is about to re-execute the
            server; the command must not start.
        """
        if self.holding:
            self.logger.info("Control command refused: an upgrade is in progress",
                             upgrade=self.running, command=what)
            raise UpgradeInProgress(
                f"an upgrade is in progress ({self.running}): {what} was not carried out; "
                "send it again once the new server answers"
            )
        return self.operations.begin(what)

    def upgrade(
        self, id: str, drain_timeout: float,
        progress: Callable[[str, str], Any] = lambda phase, detail: None,
    ) -> Deferred[None]:
        """
        Upgrade, named C{id}.  Fails with L{UpgradeError} (nothing changed)
        when it cannot be done or the new code fails its check; otherwise
        never fires: the process re-executes itself.
        """
        d: Deferred[None] = Deferred()
        if self.relaunch is None:
            d.errback(UpgradeError("this server cannot be upgraded in place"))
            return d
        if self.relaunch.refusal:
            d.errback(UpgradeError(self.relaunch.refusal))
            return d
        if self.running is not None:
            d.errback(UpgradeError(f"an upgrade is already in progress ({self.running})"))
            return d
        if self.handover is not None and self._done is None:
            d.errback(UpgradeError(
                "the previous upgrade is still finishing (the old workers drain); "
                "try again once it is done"
            ))
            return d
        if getattr(self.server, "stop_signals", None) is not None and \
                self.server.stop_signals.stopping:
            d.errback(UpgradeError("the server is shutting down"))
            return d
        self.running = id
        return self._upgrade(id, drain_timeout, progress)

    @inlineCallbacks
    def _upgrade(
        self, id: str, drain_timeout: float, progress: Callable[[str, str], Any]
    ) -> Any:
        relaunch = self.relaunch
        assert relaunch is not None
        self.logger.info("Upgrade started", upgrade=id)
        progress("check", "Checking the new code")
        try:
            yield self.check(self.reactor, relaunch.check_argv, self.environ)
        except UpgradeError as e:
            self.running = None
            self.logger.error("Upgrade failed", upgrade=id, error=str(e))
            raise
        except Exception as e:
            self.running = None
            self.logger.error("Upgrade failed", upgrade=id, error=repr(e))
            raise UpgradeError(f"cannot check the new code: {e}")
        self.holding = True
        try:
            yield self._wait_for_operations(id, progress)
        except UpgradeError:
            self.holding = False
            self.running = None
            raise
        sockets, control = self._keep_sockets()
        if getattr(self.server, "pool", None) is None:
            progress("drain",
                     f"Draining the connections of the old server (up to {drain_timeout:g}s)")
        self.logger.info("Upgrade: draining", upgrade=id, timeout=drain_timeout)
        yield self.server.drain_for_upgrade(drain_timeout)
        self.server.save_state()
        progress("exec", f"Starting the new server (pid {self.getpid()})")
        # Let the progress reach the clients (written on the reactor's next
        # turns) before the exec, and the workers answer what was asked of
        # them (an answer arriving after the exec would name a question the
        # new image never asked).
        deadline = self.reactor.seconds() + QUIET_TIMEOUT
        done: Deferred[None] = Deferred()
        self.reactor.callLater(0, self.reactor.callLater, 0, done.callback, None)
        yield done
        while self._busy_channels() and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.01, lambda: None)
        handover = Handover(self.getpid(), id, tuple(sockets), control, drain_timeout,
                            tuple(self._keep_channels()),
                            tuple(getattr(self.server, "activated_kinds", ())))
        self._exec(relaunch, handover)

    @inlineCallbacks
    def _wait_for_operations(self, id: str, progress: Callable[[str, str], Any]) -> Any:
        """
        Wait until the control commands in progress have been answered, for
        up to L{operations_timeout} seconds.
        """
        waiting = self.operations.running()
        if not waiting:
            return
        timeout = self.operations_timeout
        what = describe_commands(waiting)
        progress("wait", f"Waiting for the control commands in progress to finish: {what} "
                 f"(up to {timeout:g}s)")
        self.logger.info("Upgrade: waiting for control commands", upgrade=id,
                         commands=waiting, timeout=timeout)
        idle = self.operations.idle()
        idle.addTimeout(timeout, self.reactor)
        try:
            yield idle
        except defer.TimeoutError:
            left = describe_commands(self.operations.running())
            error = UpgradeError(
                f"control commands still in progress after {timeout:g}s: {left}; "
                "nothing was changed (try again once they are done)"
            )
            self.logger.error("Upgrade failed", upgrade=id, error=str(error))
            raise error

    def _keep_sockets(self) -> tuple[list[tuple[str, int]], int | None]:
        sockets = [(kind, self.keep(fd)) for kind, fd in self.server.listening_sockets()]
        control = self.server.control.fileno()
        return sockets, None if control is None else self.keep(control)

    def _busy_channels(self) -> int:
        """
        How many worker channels await an answer.
        """
        pool = getattr(self.server, "pool", None)
        if pool is None:
            return 0
        return sum(
            1 for w in pool.workers
            if w.channel is not None and getattr(w.channel, "_outstandingRequests", None)
        )

    def _keep_channels(self) -> list[list[int]]:
        """
        The channels of the workers (which serve on through the exec), as
        C{[pid, descriptor, generation]}.
        """
        pool = getattr(self.server, "pool", None)
        if pool is None:
            return []
        channels = [[pid, self.keep(fd), generation] for pid, fd, generation in pool.channels()]
        # the spare workers too (as generation 0): the new image retires
        # them with the old ones, and reaps them
        for spare in getattr(pool, "standby", ()):
            transport = spare.channel.transport if spare.channel is not None else None
            if transport is not None and spare.pid is not None and not spare.gone:
                channels.append([spare.pid, self.keep(transport.fileno()), 0])
        return channels

    def _exec(self, relaunch: Relaunch, handover: Handover) -> None:
        environ = dict(self.environ)
        environ[UPGRADE_VARIABLE] = handover.to_text()
        self.logger.info("Upgrade: re-executing", upgrade=handover.id, pid=handover.pid,
                         argv=list(relaunch.argv))
        if relaunch.before_exec is not None:
            relaunch.before_exec()
        self.flush()
        try:
            self.execv(relaunch.argv[0], list(relaunch.argv), environ)
        except OSError as e:
            # The old server stopped accepting: nothing can serve now.
            self.logger.error("Upgrade: cannot re-execute; stopping", upgrade=handover.id,
                              error=str(e))
            self.running = None
            self.reactor.stop()

    # The image after

    def start_generation(self, pool: Any) -> Deferred[Any]:
        """
        Start this image's first generation of workers on C{pool} (a
        L{mproxy.workers.pool.WorkerPool}).  After an upgrade, the workers
        of the image before are adopted first and go on serving; once the
        new generation serves they are retired (drained for the handover's
        drain timeout), and only then is the upgrade done.  When the new
        generation fails to start, the old one keeps serving and the upgrade
        fails with the reason.  Fires with the generation that serves.
        """
        channels = [tuple(ch) for ch in self.handover.channels] if self.handover else []
        old = pool.adopt(channels) if channels else []
        self._reap([int(ch[0]) for ch in channels])
        if old:
            self._pending = True
            self.logger.info("Upgrade: adopted the old workers", upgrade=self.handover.id,
                             pids=[pid for pid, _fd, _g in channels])
        d = pool.start_generation()

        def started(generation: Any) -> Any:
            if old:
                self._retire(pool, old)
            return generation

        def failed(f: Failure) -> Any:
            if not old:
                return f
            reason = f"the new workers did not start: {f.getErrorMessage()}"
            self.logger.error("Upgrade failed: the old workers serve on",
                              upgrade=self.handover.id, error=reason)
            self._finish(UpgradeError(reason))
            return old[-1]

        return d.addCallbacks(started, failed)

    def _reap(self, pids: Sequence[int]) -> None:
        """
        Reap the adopted workers once they exit: they are children of this
        process that Twisted did not start (and a supervisor that is PID 1
        must not leave zombies).  Each is asked for by its PID only, so the
        exits of Twisted's own children stay Twisted's to see.
        """
        left = []
        for pid in pids:
            try:
                done, _status = self.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped already (by the pool), or not our child
            if done == 0:
                left.append(pid)
        if left:
            self.reactor.callLater(REAP_INTERVAL, self._reap, left)

    def _retire(self, pool: Any, old: Sequence[Any]) -> None:
        assert self.handover is not None
        timeout = self.handover.drain_timeout
        self.logger.info("Upgrade: retiring the old workers", upgrade=self.handover.id,
                         timeout=timeout)
        self._notify("retire", f"New workers serve; the old ones drain (up to {timeout:g}s)")
        d = DeferredList([pool.retire(g, timeout) for g in old], consumeErrors=True)
        d.addCallback(lambda _: self._finish(None))

    def serving(self) -> None:
        """
        The server now serves; the upgrade that started it, if any, is done
        (unless old workers are still draining).
        """
        if self.handover is None or self._done is not None:
            return
        self._serving = True
        if not self._pending:
            self._finish(None)

    def _finish(self, error: UpgradeError | None) -> None:
        if self._done is not None or self.handover is None:
            return
        self._pending = False
        self._done = {"id": self.handover.id, "pid": self.getpid(), "error": error}
        if error is None:
            self.logger.info("Upgrade done", upgrade=self.handover.id, pid=self.getpid())
        waiting, self._waiting = self._waiting, []
        for d, _progress in waiting:
            self._answer(d)

    def _answer(self, d: Deferred[dict[str, Any]]) -> None:
        assert self._done is not None
        if self._done["error"] is not None:
            d.errback(self._done["error"])
        else:
            d.callback({"id": self._done["id"], "pid": self._done["pid"]})

    def _notify(self, phase: str, detail: str) -> None:
        self._phase = (phase, detail)
        for _d, progress in self._waiting:
            progress(phase, detail)

    def outcome(
        self, id: str, progress: Callable[[str, str], Any] = lambda phase, detail: None
    ) -> Deferred[dict[str, Any]]:
        """
        Fires with C{{"id", "pid"}} once upgrade C{id}, which started this
        image, is done (C{progress} is told what it waits for meanwhile);
        fails with L{UpgradeError} when this image did not come from
        upgrade C{id}, or the upgrade failed.
        """
        d: Deferred[dict[str, Any]] = Deferred()
        if self.handover is None or self.handover.id != id:
            d.errback(UpgradeError(
                f"upgrade {id} did not happen: the server running now did not start "
                "from it (did it crash or restart instead?)"
            ))
        elif self._done is not None:
            self._answer(d)
        else:
            self._waiting.append((d, progress))
            if self._phase is not None:
                progress(*self._phase)
        return d


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def check_installed(ns: Any, streams: Any, reactor: Any = None) -> int:
    """
    The pre-flight check (L{CHECK_COMMAND}), run by the installed code:
    the run options C{ns} parse, the service tree builds (importing what it
    serves with), and the state file restores.  Exit status 0, or 1 with
    C{Error: ...}.  Nothing is bound, listened on or written.
    """
    import io

    from mproxy.cli.streams import fail
    from mproxy.config import SERVER_OPTIONS, resolve_config
    from mproxy.logging import JSONLogger
    from mproxy.tree import build_service

    if reactor is None:
        from twisted.internet import reactor
    explicit = {spec.attr: getattr(ns, spec.attr, None) for spec in SERVER_OPTIONS}
    try:
        config = resolve_config(explicit)
        service = build_service(reactor, config, JSONLogger(io.StringIO()), environ={})
        service.controller.restore()
        service.controller.shutdown()
    except MproxyError as e:
        return fail(streams, str(e))
    except Exception as e:
        return fail(streams, f"{type(e).__name__}: {e}")
    return 0
