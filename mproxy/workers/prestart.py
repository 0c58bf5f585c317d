"""
The first workers of C{mproxy run}, started before the supervisor imports
and builds the rest of itself.

A worker takes about as long to start as the supervisor (both import
Twisted and TLS): one after the other, they doubled the time from
C{mproxy run} to the first request served, and each process imported the
same modules again.  So, as soon as its options are parsed, C{mproxy run}
binds the HTTP and HTTPS sockets (and the HTTP/3 UDP one), imports what a
worker runs (no reactor yet) and forks its first generation of workers,
which go on as C{python -m mproxy.workers} would (L{prestart}); then it
imports and builds the rest of the supervisor while they start.  Where it
cannot fork safely, the workers are started as processes of their own
instead.  Each worker waits for its channel to tell it what to serve;
clients that connect meanwhile wait in the listening sockets' queues, and
are served once the first worker serves.  The pool takes the workers over
as its first generation (L{PrestartedSpawner}); later workers (a
replacement, the standby, an upgrade's) are started as usual.

Not used when the listening sockets are inherited (socket activation, an
upgrade), nor under twistd (which binds before dropping privileges and
starts the workers as the user it runs as).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

from mproxy.workers.binding import bind_sockets, listen_failure, socket_owners


def worker_settings(config: Any, http_port: int, https_port: int,
                    grace: float) -> dict[str, Any]:
    """
    The L{mproxy.workers.settings.WorkerSettings} fields other than the
    slot and descriptors, for the ports the supervisor listens on.
    """
    return dict(
        http_port=http_port, https_port=https_port,
        header_timeout=config.http_header_timeout, idle_timeout=config.http_idle_timeout,
        metrics=bool(config.metrics_port), debug=config.debug, grace=grace,
        acceptors=config.workers,
    )


def inherits_sockets() -> bool:
    """
    Whether this process was given listening sockets (socket activation,
    or the handover of an upgrade).
    """
    import mproxy

    return bool(mproxy._startup_listen_env)


def stdout_is_shared() -> bool:
    """
    Whether workers may write their log lines to our descriptor 1 (else
    they send them over their channel).
    """
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


class PrestartedWorker:
    """
    A worker process started by L{prestart}: its PID and our end of its
    channel.
    """

    def __init__(self, slot: int, pid: int, channel: socket.socket) -> None:
        self.slot = slot
        self.pid = pid
        self.channel = channel

    def __repr__(self) -> str:
        return f"<PrestartedWorker {self.slot} pid={self.pid}>"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class Prestarted:
    """
    What L{prestart} started: the bound sockets by kind (C{http},
    C{https}, C{http3}) and the workers not yet taken over by a pool.

    @param kill: ends a worker process that never served, by its PID.
    """

    def __init__(self, sockets: dict[str, list[socket.socket]],
                 workers: list[PrestartedWorker], settings: dict[str, Any],
                 kill: Callable[[int], None] = _kill) -> None:
        self.sockets = sockets
        self.workers = workers
        self.settings = settings
        self.kill = kill

    def take(self, slot: int) -> PrestartedWorker | None:
        """
        The worker started for C{slot}, once.
        """
        for w in self.workers:
            if w.slot == slot:
                self.workers.remove(w)
                return w
        return None

    def abandon(self) -> None:
        """
        Start-up failed: kill the workers not taken over (they never
        served) and close what is left here.
        """
        workers, self.workers = self.workers, []
        for w in workers:
            w.channel.close()
            self.kill(w.pid)
        for sockets in self.sockets.values():
            for s in sockets:
                s.close()
        self.sockets = {}


def _spawn(python: str, argv: list[str], fds: dict[int, int]) -> int:
    # the copies to the child's high numbers first: none of them is below
    # a source, so only the standard descriptors can overwrite one
    actions = [(os.POSIX_SPAWN_DUP2, ours, theirs)
               for theirs, ours in sorted(fds.items(), reverse=True)]
    return os.posix_spawn(python, argv, dict(os.environ), file_actions=actions)


#: How long a port in use is tried again before start-up fails: the
#: workers of a server killed just before (kill -9) close their listening
#: sockets only once they see their supervisor gone.
BIND_WAIT = 1.0


def _bind_waiting(bind: str, port: int, kind: int, wait: float,
                  sleep: Callable[[float], None], count: int = 1) -> list[socket.socket]:
    tries = max(1, int(wait / 0.05) + 1)
    for attempt in range(tries):
        try:
            return bind_sockets(bind, port, kind, count)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or attempt == tries - 1 or port == 0:
                raise
        sleep(0.05)
    raise AssertionError("unreachable")


def preload() -> bool:
    """
    Import what a worker runs, so that forked workers start with it;
    C{False} when forking here would not be safe (a reactor is installed,
    or another thread runs).
    """
    import threading

    if "twisted.internet.reactor" in sys.modules or threading.active_count() > 1:
        return False
    from mproxy.workers.worker import import_data_plane

    import_data_plane()
    return "twisted.internet.reactor" not in sys.modules and threading.active_count() == 1


def _fork(child: Callable[[], None]) -> int:
    """
    Run C{child} in a forked process, which exits when it returns; the
    child's PID.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        child()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _open_descriptors() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(os.sysconf("SC_OPEN_MAX")))


def run_forked(arguments: Any, keep: set[int], objects: list[socket.socket],
               log_to_fd: bool) -> None:
    """
    In a forked worker: let go of the supervisor's socket objects (their
    descriptors are closed, or kept, by number), take stdin (and stdout
    unless it is shared) from /dev/null, close every descriptor but the
    standard ones and those in C{keep}, and run the worker.
    """
    for s in objects:
        s.detach()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if not log_to_fd:
        os.dup2(devnull, 1)
    for fd in _open_descriptors():
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    from mproxy.workers.worker import main

    main([arguments.to_json()])


def prestart(config: Any, grace: float, python: str = sys.executable,
             spawn: Callable[[str, list[str], dict[int, int]], int] = _spawn,
             kill: Callable[[int], None] = _kill, wait: float = BIND_WAIT,
             sleep: Callable[[float], None] = time.sleep,
             fork: Callable[[Callable[[], None]], int] | None = _fork,
             can_fork: Callable[[], bool] = preload) -> Prestarted:
    """
    Bind the sockets of C{config} (a L{mproxy.config.ServerConfig} with
    workers) and start its C{config.workers} workers on them: forked (see
    the module docstring) when C{fork} is given and C{can_fork()}, else
    with C{spawn}.  A port in use is tried again every 50 ms for up to
    C{wait} seconds.

    @param spawn: starts a process: C{(python, argv, {child fd: ours})} ->
        its PID.
    @param fork: runs a function in a forked process -> its PID.
    @param kill: ends one, by its PID, when start-up fails.
    @raise StartupError: a port cannot be bound (nothing is left open).
    """
    from mproxy.workers.settings import WorkerSettings, child_descriptors

    kinds = [("http", "HTTP", config.http_port, socket.SOCK_STREAM),
             ("https", "HTTPS", config.https_port, socket.SOCK_STREAM)]
    if config.http3:
        kinds.append(("http3", "HTTP/3 (UDP)", None, socket.SOCK_DGRAM))
    bound: dict[str, list[socket.socket]] = {}
    prestarted = Prestarted(bound, [], {}, kill)
    try:
        for name, what, port, kind in kinds:
            if port is None:  # HTTP/3 listens on the port HTTPS got
                port = bound["https"][0].getsockname()[1]
            count = config.workers if kind == socket.SOCK_STREAM else 1
            try:
                bound[name] = _bind_waiting(config.bind, port, kind, wait, sleep, count)
            except OSError as e:
                raise listen_failure(what, port, e)
        listening: dict[str, list[tuple[int, ...]]] = {}
        for name in ("http", "https"):
            pairs = [(s.fileno(), int(s.family)) for s in bound[name]]
            owners = socket_owners(pairs, config.workers)
            listening[name] = [(fd, family, owner)
                               for (fd, family), owner in zip(pairs, owners)]
        udp = [(s.fileno(), int(s.family)) for s in bound.get("http3", [])]
        prestarted.settings = settings = worker_settings(
            config, bound["http"][0].getsockname()[1], bound["https"][0].getsockname()[1],
            grace)
        log_to_fd = stdout_is_shared()
        if fork is not None and can_fork():
            _fork_workers(prestarted, config.workers, listening, udp, log_to_fd, fork)
            return prestarted
        for slot in range(config.workers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                fds, channel_fd, sockets, child_udp = child_descriptors(
                    theirs.fileno(), devnull, log_to_fd, listening, udp)
                arguments = WorkerSettings(
                    slot=slot, channel=channel_fd, sockets=sockets, udp=child_udp,
                    log="fd" if log_to_fd else "channel", **settings)
                pid = spawn(python, [python, "-m", "mproxy.workers", arguments.to_json()], fds)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
                os.close(devnull)
            prestarted.workers.append(PrestartedWorker(slot, pid, ours))
    except BaseException:
        prestarted.abandon()
        raise
    return prestarted


def _fork_workers(prestarted: Prestarted, count: int, listening: dict[str, list[tuple[int, ...]]],
                  udp: list[tuple[int, int]], log_to_fd: bool,
                  fork: Callable[[Callable[[], None]], int]) -> None:
    from mproxy.workers.settings import WorkerSettings

    sockets = [s for group in prestarted.sockets.values() for s in group]
    for slot in range(count):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            arguments = WorkerSettings(
                slot=slot, channel=theirs.fileno(), sockets=listening, udp=udp,
                log="fd" if log_to_fd else "channel", **prestarted.settings)
            keep = {theirs.fileno()} | {
                entry[0] for entries in listening.values() for entry in entries} | {
                fd for fd, _ in udp}
            objects = [w.channel for w in prestarted.workers] + [ours, theirs] + sockets
            pid = fork(lambda a=arguments, k=keep, o=objects: run_forked(a, k, o, log_to_fd))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        prestarted.workers.append(PrestartedWorker(slot, pid, ours))


class PrestartedSpawner:
    """
    A pool's spawner that hands it the prestarted workers, slot by slot,
    for its first spawns, and leaves every other spawn to C{fallback} (a
    L{mproxy.workers.pool.ProcessSpawner}).

    A prestarted worker is not a process the reactor started: like a worker
    adopted after an upgrade, its end is seen as its channel closing, then
    C{waitpid}.
    """

    def __init__(self, reactor: Any, prestarted: Prestarted, fallback: Any) -> None:
        self.reactor = reactor
        self.prestarted = prestarted
        self.fallback = fallback

    def spawn(self, pool: Any, worker: Any) -> None:
        mine = self.prestarted.take(worker.slot) if worker.slot >= 0 else None
        if mine is None:
            self.fallback.spawn(pool, worker)
            return
        from twisted.internet.protocol import Factory

        worker.pid = mine.pid
        channel = pool.channel_for(worker)
        try:
            self.reactor.adoptStreamConnection(mine.channel.fileno(), socket.AF_UNIX,
                                               Factory.forProtocol(lambda: channel))
        finally:
            mine.channel.close()
