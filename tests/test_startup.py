"""
Start-up: the first workers started with their sockets before the rest of
the supervisor (L{mproxy.workers.prestart}) and taken over by the pool; the
pool's start-up waits; what each kind of process imports (a client command
no TLS, the early part of C{mproxy run} no Twisted, a supervisor no ACME
client).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mproxy.config import resolve_config
from mproxy.errors import StartupError
from mproxy.logging import ListLogger
from mproxy.tls.issuing import IssueError
from mproxy.tls.wiring import LazyIssuer
from mproxy.workers.pool import WorkerPool
from mproxy.workers.prestart import PrestartedSpawner, prestart, worker_settings
from mproxy.workers.settings import WorkerSettings

from tests.test_workers import MemorySpawner

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**options: Any) -> Any:
    d = tempfile.mkdtemp()
    values = {"http_port": 0, "https_port": 0, "bind": "127.0.0.1", "socket": d + "/s.sock",
              "state_dir": d + "/state", "workers": 2}
    values.update(options)
    return resolve_config(values, environ={})


class FakeProcesses:
    """
    C{spawn} and C{kill} for L{prestart}: records the calls, starts nothing.
    """

    def __init__(self, fail_at: int | None = None) -> None:
        self.spawned: list[tuple[str, list[str], dict[int, int]]] = []
        self.killed: list[int] = []
        self.fail_at = fail_at

    def spawn(self, python: str, argv: list[str], fds: dict[int, int]) -> int:
        if self.fail_at is not None and len(self.spawned) == self.fail_at:
            raise OSError("no more processes")
        # the descriptors the child is to get must be open here
        for ours in fds.values():
            os.fstat(ours)
        self.spawned.append((python, argv, fds))
        return 1000 + len(self.spawned)

    def kill(self, pid: int) -> None:
        self.killed.append(pid)


class PrestartTests(SynchronousTestCase):
    def test_binds_and_starts_every_worker(self) -> None:
        """
        The sockets are bound and listening; each worker is started with
        its slot, its channel and the sockets at the numbers its settings
        name, and the ports the supervisor listens on.
        """
        processes = FakeProcesses()
        cfg = config()
        started = prestart(cfg, 7.0, python="/py", spawn=processes.spawn, kill=processes.kill, fork=None)
        self.addCleanup(started.abandon)
        http = started.sockets["http"][0]
        https = started.sockets["https"][0]
        self.assertNotIn("http3", started.sockets)
        socket.create_connection(http.getsockname()[:2], timeout=5).close()
        self.assertEqual([w.pid for w in started.workers], [1001, 1002])
        self.assertEqual(len(processes.spawned), 2)
        for slot, (python, argv, fds) in enumerate(processes.spawned):
            self.assertEqual((python, argv[:3]), ("/py", ["/py", "-m", "mproxy.workers"]))
            settings = WorkerSettings.from_json(argv[3])
            self.assertEqual(settings.slot, slot)
            self.assertEqual((settings.http_port, settings.https_port),
                             (http.getsockname()[1], https.getsockname()[1]))
            self.assertEqual(settings.grace, 7.0)
            self.assertEqual(fds[settings.sockets["http"][0][0]], http.fileno())
            self.assertEqual(fds[settings.sockets["https"][0][0]], https.fileno())
            self.assertIn(settings.channel, fds)
            self.assertEqual(fds[2], 2)
        self.assertEqual(started.settings, worker_settings(
            cfg, http.getsockname()[1], https.getsockname()[1], 7.0))

    def test_channels_reach_the_workers(self) -> None:
        """
        What the supervisor writes on its end of a worker's channel arrives
        at the descriptor the worker is given, and the worker's end is
        closed here once it is started.
        """
        held: list[socket.socket] = []

        def spawn(python: str, argv: list[str], fds: dict[int, int]) -> int:
            channel = fds[WorkerSettings.from_json(argv[3]).channel]
            held.append(socket.socket(fileno=os.dup(channel)))  # as the child holds it
            self.addCleanup(held[-1].close)
            return 1001

        started = prestart(config(workers=1), 10.0, spawn=spawn, kill=lambda pid: None,
                           fork=None)
        self.addCleanup(started.abandon)
        worker = started.take(0)
        assert worker is not None
        self.addCleanup(worker.channel.close)
        worker.channel.sendall(b"hello")
        self.assertEqual(held[0].recv(5), b"hello")
        worker.channel.close()
        self.assertEqual(held[0].recv(5), b"")  # no other end left open here

    def test_http3_socket_on_the_https_port(self) -> None:
        processes = FakeProcesses()
        started = prestart(config(http3=True, workers=1), 10.0, spawn=processes.spawn,
                           kill=processes.kill, fork=None)
        self.addCleanup(started.abandon)
        udp = started.sockets["http3"][0]
        self.assertEqual(udp.type, socket.SOCK_DGRAM)
        self.assertEqual(udp.getsockname()[1], started.sockets["https"][0].getsockname()[1])
        settings = WorkerSettings.from_json(processes.spawned[0][1][3])
        self.assertEqual(len(settings.udp), 1)

    def test_port_in_use(self) -> None:
        """
        A port that stays in use is the usual start-up error, once it was
        tried again for the wait; nothing is started or left open.
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        processes = FakeProcesses()
        slept: list[float] = []
        e = self.assertRaises(StartupError, prestart, config(http_port=port), 10.0,
                              spawn=processes.spawn, kill=processes.kill, fork=None, wait=0.5,
                              sleep=slept.append)
        self.assertIn(f"cannot listen for HTTP on port {port}", str(e))
        self.assertEqual(slept, [0.05] * 10)
        self.assertEqual(processes.spawned, [])

    def test_port_freed_meanwhile(self) -> None:
        """
        A port held a moment longer (by the workers of a server killed just
        before) is bound once it is free.
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            if len(slept) == 2:
                taken.close()

        processes = FakeProcesses()
        started = prestart(config(http_port=port), 10.0, spawn=processes.spawn,
                           kill=processes.kill, sleep=sleep, fork=None)
        self.addCleanup(started.abandon)
        self.assertEqual(len(slept), 2)
        self.assertEqual(started.sockets["http"][0].getsockname()[1], port)

    def test_failed_spawn_ends_the_others(self) -> None:
        """
        When a worker cannot be started, those started are killed and the
        sockets closed.
        """
        processes = FakeProcesses(fail_at=1)
        cfg = config()
        self.assertRaises(OSError, prestart, cfg, 10.0, spawn=processes.spawn,
                          kill=processes.kill, fork=None)
        self.assertEqual(processes.killed, [1001])
        http_port = WorkerSettings.from_json(processes.spawned[0][1][3]).http_port
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", http_port))
        again.listen(1)
        again.close()

    def test_abandon_kills_those_not_taken(self) -> None:
        processes = FakeProcesses()
        started = prestart(config(), 10.0, spawn=processes.spawn, kill=processes.kill, fork=None)
        taken = started.take(1)
        assert taken is not None
        self.addCleanup(taken.channel.close)
        self.assertIsNone(started.take(1))
        started.abandon()
        self.assertEqual(processes.killed, [1001])
        self.assertEqual(started.workers, [])
        self.assertEqual(started.sockets, {})


class AdoptingReactor(MemoryReactorClock):
    """
    A memory reactor whose adopted connections are connected at once, as a
    real reactor's are (to a L{StringTransport}).
    """

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: int,
                              factory: Any) -> None:
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        factory.buildProtocol(None).makeConnection(StringTransport())


class FakeFork:
    """
    C{fork} for L{prestart}: records what each child would run, runs
    nothing.
    """

    def __init__(self) -> None:
        self.children: list[Any] = []

    def __call__(self, child: Any) -> int:
        self.children.append(child)
        return 2000 + len(self.children)


class ForkTests(SynchronousTestCase):
    def test_workers_are_forked(self) -> None:
        """
        Where it can, prestart forks the workers: each goes on with its
        slot, its end of its channel and the listening sockets at the
        numbers they have here, and lets go of everything else.
        """
        import mproxy.workers.prestart as prestart_module

        forks = FakeFork()
        ran: list[tuple[Any, set[int], list[Any], bool]] = []
        self.patch(prestart_module, "run_forked",
                   lambda *args: ran.append(args))  # type: ignore[arg-type]
        started = prestart(config(), 10.0, spawn=FakeProcesses().spawn,
                           kill=lambda pid: None, fork=forks, can_fork=lambda: True)
        self.addCleanup(started.abandon)
        self.assertEqual([w.pid for w in started.workers], [2001, 2002])
        for child in forks.children:
            child()
        # a socket per worker and kind, each owned by its slot
        http = [s.fileno() for s in started.sockets["http"]]
        https = [s.fileno() for s in started.sockets["https"]]
        self.assertEqual((len(http), len(https)), (2, 2))
        first, second = ran
        for slot, (arguments, keep, objects, log_to_fd) in enumerate(ran):
            self.assertEqual(arguments.slot, slot)
            self.assertEqual(arguments.sockets, {
                "http": [(fd, socket.AF_INET, owner) for fd, owner in zip(http, (0, 1))],
                "https": [(fd, socket.AF_INET, owner) for fd, owner in zip(https, (0, 1))]})
            self.assertEqual(keep, {arguments.channel, *http, *https})
            self.assertIn(started.workers[slot].channel, objects)
        # the second child lets go of the first one's channel too
        self.assertIn(started.workers[0].channel, second[2])
        self.assertNotIn(started.workers[1].channel, first[2])

    def test_no_fork_where_unsafe(self) -> None:
        """
        A process whose reactor is installed does not fork its workers: it
        starts them as processes of their own.
        """
        from twisted.internet import reactor

        from mproxy.workers.prestart import preload

        if "twisted.internet.reactor" not in sys.modules:  # pragma: no cover
            sys.modules["twisted.internet.reactor"] = reactor
            self.addCleanup(sys.modules.pop, "twisted.internet.reactor")
        self.assertFalse(preload())
        forks = FakeFork()
        processes = FakeProcesses()
        started = prestart(config(), 10.0, spawn=processes.spawn, kill=processes.kill,
                           fork=forks)
        self.addCleanup(started.abandon)
        self.assertEqual(forks.children, [])
        self.assertEqual(len(processes.spawned), 2)


class PreloadTests(SynchronousTestCase):
    def test_not_with_another_thread(self) -> None:
        import threading

        from mproxy.workers.prestart import preload

        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        self.assertFalse(preload())


class Fallback:
    def __init__(self, spawner: MemorySpawner) -> None:
        self.spawner = spawner
        self.spawned: list[Any] = []

    def spawn(self, pool: WorkerPool, worker: Any) -> None:
        self.spawned.append(worker)
        self.spawner.spawn(pool, worker)


class PrestartedSpawnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = AdoptingReactor()
        self.processes = FakeProcesses()
        self.started = prestart(config(), 10.0, spawn=self.processes.spawn,
                                kill=self.processes.kill, fork=None)
        self.addCleanup(self.started.abandon)
        self.fallback = Fallback(MemorySpawner(self.reactor))
        self.pool = WorkerPool(self.reactor, ListLogger(), PrestartedSpawner(
            self.reactor, self.started, self.fallback), 2, spares=1)
        self.pool.startService()

    def test_first_generation_is_the_prestarted_workers(self) -> None:
        """
        The first generation's workers are the processes started early:
        their channels are adopted, and their end is seen as their channel
        closing (they are not processes the reactor started).
        """
        channels = [w.channel.fileno() for w in self.started.workers]
        self.pool.start_generation()
        generation = self.pool.generations[0]
        self.assertEqual([w.pid for w in generation.workers], [1001, 1002])
        self.assertEqual([w.process for w in generation.workers], [None, None])
        adopted = self.reactor.adoptedStreamConnections
        self.assertEqual([(fd, family) for fd, family, _ in adopted],
                         [(fd, socket.AF_UNIX) for fd in channels])
        for (_, _, factory), worker in zip(adopted, generation.workers):
            self.assertIs(factory.buildProtocol(None), worker.channel)
            # told what to serve at once: it reads that once it has started
            self.assertIn(b"Serve", worker.channel.transport.value())
        self.assertEqual(self.started.workers, [])
        self.assertEqual(self.fallback.spawned, [])

    def test_later_spawns_start_processes(self) -> None:
        """
        The standby, a second generation and a replacement are started as
        usual.
        """
        self.pool.start_generation()
        self.pool._fill_standby()
        self.pool.start_generation(1)
        self.assertEqual([w.slot for w in self.fallback.spawned], [-1, 0])
        self.assertEqual(self.processes.killed, [])


class PoolStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawner = MemorySpawner(self.reactor)
        self.pool = WorkerPool(self.reactor, ListLogger(), self.spawner, 2)
        self.pool.startService()

    def test_one_worker_serves_before_the_other(self) -> None:
        """
        Each worker is told to serve as soon as it has the routing, without
        waiting for the others of its generation.
        """
        from tests.test_workers import record

        self.pool.apply([record("web", "web-1:3000", host="a.test")], 30.0)
        d = self.pool.start_generation()
        first = self.spawner.pumps[0]
        for _ in range(3):
            first.flush()
        self.assertNoResult(d)
        servers = list(self.spawner.servers.values())
        self.assertEqual([s.served for s in servers], [True, False])
        self.assertIsNotNone(servers[0].router.match("a.test", "/"))

    def test_inflight_and_metrics_do_not_wait_for_starting_workers(self) -> None:
        """
        C{list} (the in-flight counts) and a metrics scrape answer while a
        worker still starts: it has nothing to count.
        """
        self.pool.start_generation()
        first = self.spawner.pumps[0]
        for _ in range(3):
            first.flush()
        refreshed = self.pool.refresh()
        metrics = self.pool.metric_families()
        for _ in range(3):
            first.flush()
        self.assertIsNone(self.successResultOf(refreshed))
        self.assertEqual(len(self.successResultOf(metrics)), 1)


class Issuer:
    def __init__(self) -> None:
        self.issued: list[tuple[str, str]] = []
        self.cancelled = False

    def issue(self, host: str, challenge_type: str) -> tuple[bytes, bytes]:
        self.issued.append((host, challenge_type))
        return b"key", b"chain"

    def cancel(self) -> None:
        self.cancelled = True


class LazyIssuerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.made: list[Issuer] = []

    def make(self) -> Issuer:
        issuer = Issuer()
        self.made.append(issuer)
        return issuer

    def test_made_at_the_first_order(self) -> None:
        lazy = LazyIssuer(self.make)
        self.assertEqual(self.made, [])
        self.assertEqual(lazy.issue("a.test", "http-01"), (b"key", b"chain"))
        lazy.issue("b.test", "tls-alpn-01")
        self.assertEqual(len(self.made), 1)
        self.assertEqual(self.made[0].issued, [("a.test", "http-01"), ("b.test", "tls-alpn-01")])

    def test_cancel_before_any_order(self) -> None:
        lazy = LazyIssuer(self.make)
        lazy.cancel()
        e = self.assertRaises(IssueError, lazy.issue, "a.test", "http-01")
        self.assertEqual(str(e), "stopped")
        self.assertEqual(self.made, [])

    def test_cancel_reaches_the_issuer(self) -> None:
        lazy = LazyIssuer(self.make)
        lazy.issue("a.test", "http-01")
        lazy.cancel()
        self.assertTrue(self.made[0].cancelled)


def run_python(code: str) -> Any:
    """
    Run C{code} in a fresh interpreter on this tree; its last stdout line
    as JSON.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPROXY_")}
    env["PYTHONPATH"] = HERE
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


class ImportTests(SynchronousTestCase):
    """
    What each kind of process imports (a fresh interpreter each).
    """

    def test_client_command_without_tls(self) -> None:
        """
        A client command (here one that finds no server) loads neither
        pyOpenSSL nor cryptography, nor the server.
        """
        loaded = run_python(
            "import json, sys\n"
            "sys.argv = ['mproxy', 'list', '--socket', '/nonexistent/mproxy.sock']\n"
            "from mproxy.cli.main import run\n"
            "try:\n    run()\nexcept SystemExit as e:\n    status = e.code\n"
            "print(json.dumps([status, [m for m in sys.modules if sys.modules[m] is not None"
            " and m.split('.')[0] in ('OpenSSL', 'cryptography', 'service_identity')"
            " or m in ('mproxy.tree', 'mproxy.controller', 'twisted.web.server')]]))\n")
        self.assertEqual(loaded, [1, []])

    def test_version_imports_no_twisted(self) -> None:
        loaded = run_python(
            "import json, sys\n"
            "from mproxy.cli.main import main\n"
            "main(['--version'])\n"
            "print(json.dumps([m for m in sys.modules if m.startswith(('twisted', 'mproxy.cli.p'))]))\n")
        self.assertEqual(loaded, [])

    def test_options_and_sockets_without_twisted(self) -> None:
        """
        What C{mproxy run} imports before it binds its sockets (its options,
        the binding, the workers' settings) imports no Twisted: only what a
        worker runs is imported then, before the workers are forked.
        """
        loaded = run_python(
            "import json, sys\n"
            "import mproxy.cli.main, mproxy.cli.parsing, mproxy.server\n"
            "import mproxy.workers.prestart, mproxy.workers.settings\n"
            "print(json.dumps([m for m in sys.modules if m.startswith(('twisted', 'zope'))]))\n")
        self.assertEqual(loaded, [])

    def test_supervisor_without_acme_client(self) -> None:
        """
        A supervisor with workers is built without the ACME client, treq or
        the HTTP proxy (they are imported once needed).
        """
        loaded = run_python(
            "import json, sys, tempfile\n"
            "from twisted.internet import reactor\n"
            "from mproxy.config import resolve_config\n"
            "from mproxy.tree import build_service\n"
            "d = tempfile.mkdtemp()\n"
            "cfg = resolve_config({'socket': d + '/s.sock', 'state_dir': d + '/state',"
            " 'workers': 2}, environ={})\n"
            "build_service(reactor, cfg, environ={})\n"
            "print(json.dumps([m for m in ('acme', 'josepy', 'requests', 'treq',"
            " 'mproxy.tls.acme', 'mproxy.http.proxy') if m in sys.modules]))\n")
        self.assertEqual(loaded, [])


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        import gc

        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        self.addCleanup(gc.unfreeze)

    def test_paused_until_resumed(self) -> None:
        import gc

        from mproxy import collector

        gc.enable()
        collector.pause()
        self.assertFalse(gc.isenabled())
        collector.resume()
        self.assertTrue(gc.isenabled())
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_resume_leaves_a_collector_stopped_by_someone_else(self) -> None:
        import gc

        from mproxy import collector

        gc.disable()
        collector.pause()
        collector.resume()
        self.assertFalse(gc.isenabled())
        self.assertEqual(gc.get_freeze_count(), 0)
