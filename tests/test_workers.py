"""
Unit tests of L{mproxy.workers}: the supervisor's L{WorkerPool} driving
in-memory workers (the real L{WorkerServer} and channel protocols, over an
in-memory AMP connection on a fake clock), the controller on a data plane
of workers, certificates, challenges and metrics across processes.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mproxy.controller import Controller
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.spec import DeployRequest, ServiceOptions, TargetOptions
from mproxy.state import ServiceRecord, Slot
from mproxy.target import Drained, TargetState
from mproxy.workers.interfaces import IDataPlane, Switch
from mproxy.workers.local import LocalDataPlane
from mproxy.workers.pool import WorkerPool
from mproxy.workers.sockets import HELP_AFTER
from mproxy.workers.worker import WorkerChannel, WorkerServer, WorkerSettings


def record(name: str, *targets: str, host: str = "") -> ServiceRecord:
    options = ServiceOptions(hosts=(host,) if host else ())
    return ServiceRecord(name, options, TargetOptions(), Slot(targets))


class MemorySpawner:
    """
    Starts each worker as a L{WorkerServer} in this process, its channel
    an in-memory AMP connection; C{kill(worker)} ends one as a crash would.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.servers: dict[int, WorkerServer] = {}
        self.pumps: list[Any] = []
        self.next_pid = 100
        #: the supervisor's listening sockets, C{{kind: [(fd, family, owner)]}}:
        #: each worker gets duplicates of all of them
        self.sockets: dict[str, list[tuple[int, int, int]]] = {}

    def spawn(self, pool: WorkerPool, worker: Any) -> None:
        pid = self.next_pid
        self.next_pid += 1
        sockets = {kind: [(os.dup(fd), family, owner) for fd, family, owner in entries]
                   for kind, entries in self.sockets.items()}
        settings = WorkerSettings(slot=worker.slot, channel=-1, http_port=80, https_port=443,
                                  header_timeout=30.0, idle_timeout=75.0, sockets=sockets,
                                  metrics=True)
        channel = WorkerChannel()
        server = WorkerServer(self.reactor, settings, ListLogger(), channel.callRemote,
                              exit=lambda: self.ended(pid, "exit status 0"))
        channel.server = server
        supervisor = pool.channel_for(worker)
        worker.pid = pid
        self.pool = pool
        self.servers[pid] = server
        pump = connect(channel, FakeTransport(channel, True), supervisor,
                       FakeTransport(supervisor, False), greet=False)
        pump.pid = pid
        self.pumps.append(pump)

    def flush(self) -> None:
        for _ in range(5):
            for pump in list(self.pumps):
                pump.flush()
            self.reactor.advance(0)

    def ended(self, pid: int, how: str) -> None:
        for w in [w for g in self.pool.generations for w in g.workers] + self.pool.standby:
            if w.pid == pid and not w.gone:
                self.pool._worker_ended(w, how)
        self.pumps = [p for p in self.pumps if p.pid != pid]

    def kill(self, pid: int) -> None:
        self.servers.pop(pid)
        self.ended(pid, "killed by signal 9")


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawner = MemorySpawner(self.reactor)
        self.logger = ListLogger()
        self.ejected: list[tuple[str, str]] = []
        self.pool = WorkerPool(self.reactor, self.logger, self.spawner, 2,
                               on_eject=lambda a, e, k: self.ejected.append((a, e)))
        self.pool.startService()

    def start(self) -> Any:
        d = self.pool.start_generation()
        self.spawner.flush()
        return self.successResultOf(d)

    def servers(self) -> list[WorkerServer]:
        return list(self.spawner.servers.values())

    def test_interface(self) -> None:
        verifyObject(IDataPlane, self.pool)
        verifyObject(IDataPlane, LocalDataPlane())

    def test_generation_serves_with_current_routing(self) -> None:
        """
        Workers started after a change get it before they serve; the
        generation fires once all serve.
        """
        self.pool.apply([record("web", "web-1:3000", host="a.test")], 30.0)
        d = self.pool.start_generation()
        self.assertNoResult(d)
        self.spawner.flush()
        generation = self.successResultOf(d)
        self.assertEqual(len(generation.workers), 2)
        for server in self.servers():
            match = server.router.match("a.test", "/")
            assert match is not None
            self.assertEqual(match.service.active.addresses, ["web-1:3000"])
        self.assertIn("Workers started", self.logger.messages())

    def test_switch_waits_for_every_worker(self) -> None:
        self.start()
        switch = self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.assertNoResult(switch.switched)
        self.spawner.flush()
        self.assertEqual(self.successResultOf(switch.switched), 0)
        for server in self.servers():
            self.assertIn("web", server.router.services)

    def test_drain_waits_for_requests_on_every_worker(self) -> None:
        """
        The requests in flight on a replaced deployment, in any worker, are
        counted at the switch and waited for by the drain.
        """
        self.start()
        first = self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        claims = [s.router.services["web"].active.claim(False) for s in self.servers()]
        switch = self.pool.apply([record("web", "web-2:3000")], 30.0)
        self.spawner.flush()
        self.assertEqual(self.successResultOf(switch.switched), 2)
        self.assertNoResult(switch.drained)
        claims[0].release()
        self.spawner.flush()
        self.assertNoResult(switch.drained)
        claims[1].release()
        self.spawner.flush()
        self.assertEqual(self.successResultOf(switch.drained), Drained(2, 0))
        self.successResultOf(first.drained)

    def test_drain_cut_at_timeout(self) -> None:
        self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        self.servers()[0].router.services["web"].active.claim(False)
        switch = self.pool.apply([record("web", "web-2:3000")], 5.0)
        self.spawner.flush()
        self.reactor.advance(5)
        self.spawner.flush()
        self.assertEqual(self.successResultOf(switch.drained), Drained(1, 1))

    def test_health_reaches_workers(self) -> None:
        self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        self.pool.set_health("web-1:3000", False)
        self.spawner.flush()
        for server in self.servers():
            t = server.router.services["web"].active.targets[0]
            self.assertIs(t.state, TargetState.UNHEALTHY)
        # a worker started now knows it too
        self.spawner.kill(self.pool.generations[0].workers[0].pid)
        self.reactor.advance(0)
        self.spawner.flush()
        for server in self.servers():
            t = server.router.services["web"].active.targets[0]
            self.assertIs(t.state, TargetState.UNHEALTHY)

    def test_ejection_reported(self) -> None:
        self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        target = self.servers()[0].router.services["web"].active.targets[0]
        self.assertTrue(target.eject("connection refused"))
        self.spawner.flush()
        self.assertEqual(self.ejected, [("web-1:3000", "connection refused")])

    def test_dead_worker_replaced_and_logged(self) -> None:
        """
        A worker that dies is replaced in its slot at once; its pending
        drain counts as done; the supervisor logs both.
        """
        generation = self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        dead = generation.workers[0]
        self.spawner.servers[dead.pid].router.services["web"].active.claim(False)
        switch = self.pool.apply([record("web", "web-2:3000")], 30.0)
        self.spawner.flush()
        self.spawner.kill(dead.pid)
        self.assertEqual(self.successResultOf(switch.drained), Drained())
        self.spawner.flush()
        replacement = generation.workers[0]
        self.assertIsNot(replacement, dead)
        self.assertTrue(replacement.serving)
        self.assertEqual(len(self.servers()), 2)
        for server in self.servers():
            self.assertEqual(server.router.services["web"].active.addresses, ["web-2:3000"])
        errors = [r for r in self.logger.records if r["msg"].startswith("Worker exited")]
        self.assertEqual(errors[0]["level"], "ERROR")
        self.assertEqual(errors[0]["pid"], dead.pid)
        self.assertIn("Worker replaced", self.logger.messages())

    def test_standby_worker_replaces_without_a_new_start(self) -> None:
        self.pool.spares = 1
        generation = self.start()
        self.spawner.flush()
        self.assertEqual(len(self.pool.standby), 1)
        spare_pid = self.pool.standby[0].pid
        self.spawner.kill(generation.workers[1].pid)
        self.spawner.flush()
        self.assertEqual(generation.workers[1].pid, spare_pid)
        self.assertTrue(generation.workers[1].serving)
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.standby), 1)  # a new spare

    def test_replacement_takes_the_dead_workers_own_socket(self) -> None:
        """
        A worker that dies is replaced by the standby worker, which then
        takes the dead one's own listening socket whole (the supervisor
        held it open meanwhile, its queue kept) and helps with the other.
        """
        import socket

        from mproxy.workers.sockets import SocketListener

        listener = SocketListener("HTTP", 0, "127.0.0.1", workers=2)
        listener.privilegedStartService()
        self.addCleanup(listener.stopService)
        self.spawner.sockets = {"http": listener.worker_sockets}
        self.pool.spares = 1
        generation = self.start()
        self.spawner.flush()

        from mproxy.workers.sockets import HelpingPort, OneAcceptPort

        def ports(worker: Any) -> list[tuple[int, type]]:
            server = self.spawner.servers[worker.pid]
            return [(os.fstat(p.fileno()).st_ino, type(p)) for p in server.ports]

        inodes = [os.fstat(fd).st_ino for fd, _family in listener.fds]
        before = ports(generation.workers[1])
        self.assertEqual(before, [(inodes[0], HelpingPort), (inodes[1], OneAcceptPort)])
        dead = self.spawner.servers[generation.workers[1].pid]
        for server in self.spawner.servers.values():
            for p in server.ports:
                self.addCleanup(p.connectionLost, None)
        own = listener._sockets[1]
        while accept_queue(own) < 2:  # queued on the socket of the worker that dies
            connect_clients(listener.port, 1, self)
        self.spawner.kill(generation.workers[1].pid)
        self.spawner.flush()
        self.assertEqual(ports(generation.workers[1]), before)
        self.assertEqual(accept_queue(own), 2)
        replacement = self.spawner.servers[generation.workers[1].pid]
        self.assertIsNot(replacement, dead)
        replacement.ports[1].doRead()
        self.assertEqual(accept_queue(own), 0)
        for reader in self.reactor.getReaders():
            if getattr(reader, "socket", None) is not None and reader not in replacement.ports \
                    and not isinstance(reader, type(replacement.ports[0])):
                reader.socket.close()
        for p in replacement.ports:
            self.addCleanup(p.connectionLost, None)

    def test_worker_that_never_serves_fails_the_generation(self) -> None:
        d = self.pool.start_generation()
        self.spawner.kill(self.pool.generations[0].workers[0].pid)
        self.failureResultOf(d)

    def test_retire(self) -> None:
        generation = self.start()
        d = self.pool.retire(generation, 10.0)
        self.assertNoResult(d)
        self.spawner.flush()
        self.successResultOf(d)
        self.assertNotIn(generation, self.pool.generations)
        self.assertNotIn("Worker exited unexpectedly: replacing it", self.logger.messages())

    def test_inflight_summed(self) -> None:
        self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        for s in self.servers():
            s.router.services["web"].active.claim(False)
        d = self.pool.refresh()
        self.spawner.flush()
        self.successResultOf(d)
        self.assertEqual(self.pool.inflight("web"), 2)

    def test_drain_service_summed(self) -> None:
        self.start()
        self.pool.apply([record("web", "web-1:3000")], 30.0)
        self.spawner.flush()
        claims = [s.router.services["web"].active.claim(False) for s in self.servers()]
        d = self.pool.drain_service("web", 30.0)
        self.spawner.flush()
        self.assertNoResult(d)
        for c in claims:
            c.release()
        self.spawner.flush()
        self.assertEqual(self.successResultOf(d), Drained(2, 0))

    def test_metrics_summed(self) -> None:
        from mproxy.metrics import Metrics
        from mproxy.workers.metrics import merged_exposition

        self.start()
        for s in self.servers():
            assert s.metrics is not None
            s.metrics.observe("web", "GET", 200, 0.01)
        d = self.pool.metric_families()
        self.spawner.flush()
        families = self.successResultOf(d)
        supervisor = Metrics()
        supervisor.deploy("web", "success")
        text = merged_exposition(supervisor.registry, families).decode()
        self.assertIn('mproxy_http_requests_total{method="GET",service="web",status="200"} 2.0',
                      text)
        self.assertIn('mproxy_deploys_total{outcome="success",service="web"} 1.0', text)
        self.assertEqual(text.count("# TYPE mproxy_http_requests_total counter"), 1)

    def test_stop_retires_everything(self) -> None:
        self.start()
        d = self.pool.stopService()
        self.spawner.flush()
        self.successResultOf(d)
        self.assertEqual(self.pool.generations, [])


class FakeDataPlane:
    """
    A data plane whose switches and drains the test fires.
    """

    def __init__(self) -> None:
        self.applied: list[tuple[list[str], float]] = []
        self.switches: list[tuple[Deferred[int], Deferred[Drained]]] = []
        self.health: list[tuple[str, bool]] = []

    def apply(self, records: Any, drain_timeout: float, targets: Any = None) -> Switch:
        self.applied.append(([r.name for r in records], drain_timeout))
        pair: tuple[Deferred[int], Deferred[Drained]] = (Deferred(), Deferred())
        self.switches.append(pair)
        return Switch(*pair)

    def set_health(self, address: str, healthy: bool, key: str | None = None) -> None:
        self.health.append((address, healthy))

    def drain_service(self, name: str, timeout: float) -> Deferred[Drained]:
        return succeed(Drained(3, 1))

    def refresh(self) -> Deferred[None]:
        return succeed(None)

    def inflight(self, service: str) -> int:
        return 4


class ControllerOnWorkersTests(SynchronousTestCase):
    def setUp(self) -> None:
        from tests.test_controller import FakeProbe

        self.clock = MemoryReactorClock()
        self.probe = FakeProbe()
        self.dataplane = FakeDataPlane()
        self.controller = Controller(Router(), self.clock, self.probe, None, ListLogger(),
                                     dataplane=self.dataplane)

    def deploy(self, *targets: str) -> tuple[Deferred[Any], list[tuple[str, str]]]:
        progress: list[tuple[str, str]] = []
        for t in targets:
            self.probe.auto[t] = 200
        d = self.controller.deploy(DeployRequest("web", targets, options=ServiceOptions(),
                                                 target_options=TargetOptions(), drain_timeout=7.0),
                                   lambda phase, detail: progress.append((phase, detail)))
        return d, progress

    def test_deploy_switched_once_workers_switched_and_returns_after_their_drain(self) -> None:
        d, progress = self.deploy("web-1:3000")
        self.assertEqual(self.dataplane.applied, [(["web"], 7.0)])
        self.assertNotIn("switched", [p for p, _ in progress])
        switched, drained = self.dataplane.switches[0]
        switched.callback(0)
        self.assertIn("switched", [p for p, _ in progress])
        self.successResultOf(d)  # a first deploy replaced nothing
        d, progress = self.deploy("web-2:3000")
        switched, drained = self.dataplane.switches[1]
        switched.callback(2)
        self.assertIn(("draining", "draining 2 requests from web-1:3000"), progress)
        self.assertNoResult(d)
        drained.callback(Drained(2, 0))
        result = self.successResultOf(d)
        self.assertEqual(result.drained, Drained(2, 0))

    def test_health_transitions_reach_the_data_plane(self) -> None:
        d, _ = self.deploy("web-1:3000")
        self.assertIn(("web-1:3000", True), self.dataplane.health)

    def test_eject_from_a_worker(self) -> None:
        d, _ = self.deploy("web-1:3000")
        self.dataplane.switches[0][0].callback(0)
        self.controller.eject("web-1:3000", "connection refused")
        t = self.controller.router.services["web"].active.targets[0]
        self.assertIs(t.state, TargetState.UNHEALTHY)
        self.assertEqual(t.last_error, "connection refused")
        self.assertEqual(self.dataplane.health[-1], ("web-1:3000", False))

    def test_pause_drains_workers_and_list_sums_inflight(self) -> None:
        d, _ = self.deploy("web-1:3000")
        self.dataplane.switches[0][0].callback(0)
        p = self.controller.pause("web")
        self.assertNoResult(p)  # until the workers hold new requests
        self.dataplane.switches[1][0].callback(0)
        self.assertEqual(self.successResultOf(p), Drained(3, 1))
        self.assertEqual(self.controller.list()[0]["inflight"], 4)

    def test_resume_answers_once_switched(self) -> None:
        d, _ = self.deploy("web-1:3000")
        self.dataplane.switches[0][0].callback(0)
        r = self.controller.resume("web")
        self.assertNoResult(r)
        self.dataplane.switches[-1][0].callback(0)
        self.successResultOf(r)


class CertificateMirrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        from mproxy.tls.testing import make_ca, make_certificate

        self.ca = make_ca()
        self.cert = make_certificate(["a.test"], issuer=self.ca)
        self.other = make_certificate(["b.test"], issuer=self.ca)
        self.router = Router()
        self.asked: list[str] = []
        self.now = 0.0
        from mproxy.workers.certs import CertificateMirror

        def lookup(name: str) -> Any:
            s = self.router.root_service_for(name)
            return None if s is None else (s.name, s.options)

        self.mirror = CertificateMirror(lookup, self.asked.append, now=lambda: self.now)
        from mproxy.replica import Replica
        from mproxy.balancer import LoadBalancer

        self.replica = Replica(self.router, MemoryReactorClock(),
                               lambda slot: LoadBalancer(slot.writers, slot.readers,
                                                         MemoryReactorClock()))

    def pem(self, cert: Any) -> list[str]:
        from mproxy.tls.certs import certified_pem

        return [x.decode() for x in certified_pem(cert)]

    def serve(self, name: str, host: str, **options: Any) -> None:
        self.replica.apply([ServiceRecord(name, ServiceOptions(hosts=(host,), tls_enabled=True,
                                                               **options),
                                          TargetOptions(), Slot(("app-1:3000",)))])

    def test_acme_static_and_default(self) -> None:
        self.serve("web", "a.test")
        self.serve("api", "b.test", tls_certificate_path="/c.pem", tls_private_key_path="/k.pem")
        self.replica.apply([
            ServiceRecord("web", ServiceOptions(hosts=("a.test",), tls_enabled=True),
                          TargetOptions(), Slot(("app-1:3000",))),
            ServiceRecord("api", ServiceOptions(hosts=("b.test",), tls_enabled=True,
                                                tls_certificate_path="/c.pem",
                                                tls_private_key_path="/k.pem"),
                          TargetOptions(), Slot(("app-2:3000",))),
        ])
        self.mirror.update({"default": self.pem(self.cert), "static": {"api": self.pem(self.other)},
                            "hosts": [["https://acme/dir", "a.test", self.pem(self.cert)]],
                            "directories": ["https://acme/dir", "https://staging/dir"]})
        a = self.mirror.select("a.test")
        assert a is not None
        self.assertEqual(a.dns_names(), ["a.test"])
        b = self.mirror.select("b.test")
        assert b is not None
        self.assertEqual(b.dns_names(), ["b.test"])
        self.assertIs(self.mirror.select(None), self.mirror._default)
        self.assertIsNone(self.mirror.select("unknown.test"))
        # the same PEM keeps the same object (and so its TLS context)
        self.mirror.update({"default": None, "static": {},
                            "hosts": [["https://acme/dir", "a.test", self.pem(self.cert)]],
                            "directories": ["https://acme/dir", "https://staging/dir"]})
        self.assertIs(self.mirror.select("a.test"), a)
        self.assertIsNone(self.mirror.select("b.test"))

    def test_on_demand_asks_the_supervisor(self) -> None:
        self.serve("web", "", tls_on_demand_url="http://policy/")
        self.assertIsNone(self.mirror.select("x.test"))
        self.assertIsNone(self.mirror.select("x.test"))
        self.assertEqual(self.asked, ["x.test"])
        self.now = 5.0
        self.assertIsNone(self.mirror.select("x.test"))
        self.assertEqual(self.asked, ["x.test", "x.test"])

    def test_challenges(self) -> None:
        from mproxy.tls.challenges import tls_alpn_certificate

        alpn = tls_alpn_certificate("a.test", "token.thumb")
        self.mirror.update_challenges({"tok": "tok.thumb"}, {"a.test": self.pem(alpn)})
        self.assertEqual(self.mirror.challenges.http01_response(
            b"/.well-known/acme-challenge/tok"), b"tok.thumb")
        self.assertIsNotNone(self.mirror.challenges.alpn_certificate("a.test"))
        self.mirror.update_challenges({}, {})
        self.assertIsNone(self.mirror.challenges.alpn_certificate("a.test"))


class NotifyingChallengesTests(SynchronousTestCase):
    def test_changes_pushed(self) -> None:
        from mproxy.workers.certs import NotifyingChallenges

        store = NotifyingChallenges(MemoryReactorClock(), in_io_thread=lambda: True)
        pushed: list[Any] = []
        store.push = lambda http01, alpn: pushed.append((http01, alpn)) or succeed(None)
        store.add_http01("tok", "tok.key")
        store.remove_http01("tok")
        self.assertEqual(pushed, [({"tok": "tok.key"}, {}), ({}, {})])
        self.assertIsNone(store.key_authorization("tok"))

    def test_removal_from_a_thread_goes_through_the_reactor(self) -> None:
        from mproxy.workers.certs import NotifyingChallenges

        calls: list[Any] = []

        class Reactor:
            def callFromThread(self, f: Any, *a: Any) -> None:
                calls.append(f)

        store = NotifyingChallenges(Reactor(), in_io_thread=lambda: False)
        pushed: list[Any] = []
        store.push = lambda http01, alpn: pushed.append((http01, alpn)) or succeed(None)
        store.remove_tls_alpn01("a.test")
        self.assertEqual(pushed, [])
        calls[0]()
        self.assertEqual(pushed, [({}, {})])


class ReplicaHealthTests(SynchronousTestCase):
    def test_new_targets_take_the_supervisors_health(self) -> None:
        from mproxy.balancer import LoadBalancer
        from mproxy.replica import Replica

        clock = MemoryReactorClock()
        router = Router()
        replica = Replica(router, clock, lambda slot: LoadBalancer(slot.writers, slot.readers,
                                                                   clock))
        replica.apply([record("web", "web-1:3000", "web-2:3000")], {"web-2:3000": False})
        states = {t.address: t.state for t in router.services["web"].active.targets}
        self.assertEqual(states, {"web-1:3000": TargetState.HEALTHY,
                                  "web-2:3000": TargetState.UNHEALTHY})


class WorkerLoggingTests(SynchronousTestCase):
    def test_exhaustion_reported_not_logged(self) -> None:
        from mproxy.workers.worker import worker_events

        logger = ListLogger()
        reported: list[str] = []
        events = worker_events(logger, MemoryReactorClock(), reported.append)
        events({"log_format": "EMFILE recovery: Closed socket from {address}",
                "address": "x", "acceptError": "EMFILE"})
        self.assertEqual(reported, ["EMFILE"])
        self.assertEqual(logger.records, [])

    def test_fd_lines_one_write_per_line(self) -> None:
        import os

        from mproxy.workers.worker import FDLines

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        FDLines(w).write('{"msg": "Request"}\n')
        self.assertEqual(os.read(r, 100), b'{"msg": "Request"}\n')

    def test_channel_lines_sent_once_connected(self) -> None:
        from mproxy.workers import commands as c
        from mproxy.workers.worker import ChannelLines

        sent: list[Any] = []

        class Channel:
            def callRemote(self, command: Any, **kw: Any) -> None:
                sent.append((command, kw))

        lines = ChannelLines()
        lines.write("early\n")
        lines.connected(Channel())
        lines.write("late\n")
        self.assertEqual(sent, [(c.Log, {"line": "early"}), (c.Log, {"line": "late"})])


class SocketTests(SynchronousTestCase):
    def test_bound_and_listening_and_port_in_use(self) -> None:
        import socket

        from mproxy.listeners import StartupError
        from mproxy.workers.sockets import SocketListener

        listener = SocketListener("HTTP", 0, "127.0.0.1")
        listener.privilegedStartService()
        self.addCleanup(listener.stopService)
        assert listener.port is not None
        client = socket.create_connection(("127.0.0.1", listener.port), timeout=2)
        client.close()
        taken = SocketListener("HTTP", listener.port, "127.0.0.1")
        with self.assertRaises(StartupError) as cm:
            taken.privilegedStartService()
        self.assertIn(f"cannot listen for HTTP on port {listener.port}", str(cm.exception))

    def test_inherited_sockets_are_passed_on(self) -> None:
        from mproxy.workers.sockets import SocketListener

        listener = SocketListener("HTTPS", 443, "", inherited=[(5, 10, 8443)])
        listener.privilegedStartService()
        self.assertEqual((listener.port, listener.fds), (8443, [(5, 10)]))


def accept_queue(listener: Any) -> int:
    """
    The connections waiting in a listening socket's accept queue (Linux:
    C{tcpi_unacked} of a listener's C{TCP_INFO}).
    """
    import socket
    import struct

    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 24)[0]


class OneAcceptTests(SynchronousTestCase):
    """
    A worker accepts one connection each time its shared listening socket
    is readable, so that a burst is shared between the workers; a worker
    accepting alone takes the whole queue.
    """

    def listening_with_clients(self, clients: int) -> Any:
        import socket

        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        for _ in range(clients):
            client = socket.create_connection(listener.getsockname(), timeout=5)
            self.addCleanup(client.close)
        self.assertEqual(accept_queue(listener), clients)
        return listener

    def adopt(self, listener: Any, acceptors: int = 0) -> tuple[Any, list[Any], MemoryReactorClock]:
        import socket

        from twisted.internet.protocol import Factory, Protocol

        from mproxy.workers.sockets import adopt_listening

        built: list[Any] = []

        def build() -> Protocol:
            built.append(Protocol())
            return built[-1]

        reactor = MemoryReactorClock()
        port = adopt_listening(reactor, listener.fileno(), socket.AF_INET,
                               Factory.forProtocol(build), acceptors=acceptors)
        self.addCleanup(port.connectionLost, None)
        return port, built, reactor

    def test_one_connection_per_wake_up(self) -> None:
        listener = self.listening_with_clients(3)
        port, built, reactor = self.adopt(listener)
        self.assertIn(port, reactor.getReaders())
        for n in (1, 2, 3):
            port.doRead()
            self.assertEqual((len(built), accept_queue(listener)), (n, 3 - n))
        port.doRead()  # nothing left: no error, nothing built
        self.assertEqual(len(built), 3)
        self.assertEqual(port.numberAccepts, 1)
        for protocol in built:
            protocol.transport.socket.close()

    def test_shared_by_two_one_per_wake_up(self) -> None:
        listener = self.listening_with_clients(3)
        port, built, reactor = self.adopt(listener, acceptors=2)
        for n in (1, 2, 3):
            port.doRead()
            self.assertEqual((len(built), accept_queue(listener)), (n, 3 - n))
        for protocol in built:
            protocol.transport.socket.close()

    def test_sole_acceptor_takes_the_whole_queue(self) -> None:
        """
        A port no other worker accepts on takes every queued connection in
        one wake-up: one per wake-up, a burst to a busy worker would wait
        a reactor turn per connection.
        """
        listener = self.listening_with_clients(4)
        port, built, reactor = self.adopt(listener, acceptors=1)
        port.doRead()
        self.assertEqual((len(built), accept_queue(listener)), (4, 0))
        for protocol in built:
            protocol.transport.socket.close()

    def test_queue_not_readable_one_per_wake_up(self) -> None:
        from mproxy.workers.sockets import queued_connections

        class NoInfo:
            def getsockopt(self, *args: Any) -> bytes:
                raise OSError("no TCP_INFO here")

        self.assertIsNone(queued_connections(NoInfo()))
        listener = self.listening_with_clients(2)
        port, built, reactor = self.adopt(listener, acceptors=1)
        real = port.socket
        port.socket = NoInfo()
        self.assertEqual(port.numberAccepts, 1)
        port.socket = real
        self.assertEqual(port.numberAccepts, 2)

    def test_acceptors_in_settings(self) -> None:
        """
        The supervisor tells its workers how many of them accept on the
        sockets, and the number survives the command line; settings made
        without it take one connection per wake-up.
        """
        from types import SimpleNamespace

        from mproxy.workers.prestart import worker_settings

        for workers in (1, 2, 4):
            config = SimpleNamespace(http_header_timeout=30, http_idle_timeout=60,
                                     metrics_port=None, debug=False, workers=workers)
            fields = worker_settings(config, 80, 443, 10.0)
            self.assertEqual(fields["acceptors"], workers)
            ws = WorkerSettings(slot=0, channel=3, sockets={}, **fields)
            self.assertEqual(WorkerSettings.from_json(ws.to_json()), ws)
        old = WorkerSettings(slot=0, channel=3, http_port=80, https_port=443,
                             header_timeout=30, idle_timeout=60, sockets={})
        self.assertEqual(old.acceptors, 0)

    def test_sole_worker_takes_the_whole_queue(self) -> None:
        import socket

        listener = self.listening_with_clients(2)
        settings = WorkerSettings(slot=0, channel=-1, http_port=80, https_port=443,
                                  header_timeout=30, idle_timeout=60, acceptors=1,
                                  sockets={"http": [(os.dup(listener.fileno()), socket.AF_INET)]})
        reactor = MemoryReactorClock()
        server = WorkerServer(reactor, settings, ListLogger(), lambda *a, **k: None,
                              exit=lambda: None)
        server.serve()
        (port,) = server.ports
        self.assertEqual(port.acceptors, 1)
        port.doRead()
        self.assertEqual(accept_queue(listener), 0)
        for reader in reactor.getReaders():
            if reader is not port:
                reader.socket.close()
        server.retire(0)
        reactor.advance(0)

    def test_worker_serves_with_one_accept_ports(self) -> None:
        import socket

        from mproxy.workers.sockets import OneAcceptPort

        listener = self.listening_with_clients(2)
        settings = WorkerSettings(slot=0, channel=-1, http_port=80, https_port=443,
                                  header_timeout=30, idle_timeout=60,
                                  sockets={"http": [(os.dup(listener.fileno()), socket.AF_INET)]})
        reactor = MemoryReactorClock()
        server = WorkerServer(reactor, settings, ListLogger(), lambda *a, **k: None,
                              exit=lambda: None)
        server.serve()
        (port,) = server.ports
        self.assertIsInstance(port, OneAcceptPort)
        port.doRead()
        self.assertEqual(accept_queue(listener), 1)
        for reader in reactor.getReaders():
            if reader is not port:
                reader.socket.close()  # the accepted connection
        server.retire(0)
        reactor.advance(0)  # the port closes its socket


class SpawnerTests(SynchronousTestCase):
    def test_descriptors_settings_and_log_mode(self) -> None:
        """
        The child's descriptors are numbered above every descriptor of ours
        (so no mapping overwrites one still to be copied), and its command
        line says where they are, with the debug level and the log mode.
        """
        import json
        import socket

        from mproxy.workers.pool import ProcessSpawner, WorkerHandle, Generation
        from mproxy.workers.worker import WorkerSettings

        calls: list[Any] = []

        class Process:
            pid = 4242

        class Reactor:
            def spawnProcess(self, proto: Any, exe: str, args: list[str], env: Any,
                             childFDs: dict[int, Any]) -> Any:
                calls.append((args, dict(childFDs)))
                return Process()

            def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
                calls.append(("adopted", family))

        spawner = ProcessSpawner(Reactor(), {"http": [(3, socket.AF_INET)],
                                             "https": [(4, socket.AF_INET6)]},
                                 [(5, socket.AF_INET)],
                                 dict(http_port=80, https_port=443, header_timeout=30.0,
                                      idle_timeout=75.0, metrics=False, debug=True,
                                      grace=10.0),
                                 log_to_fd=False)
        pool = WorkerPool(MemoryReactorClock(), ListLogger(), spawner, 1)
        worker = WorkerHandle(0, Generation(1, 1))
        spawner.spawn(pool, worker)
        (args, fds), adopted = calls
        self.assertEqual(adopted, ("adopted", socket.AF_UNIX))
        self.assertEqual(worker.pid, 4242)
        settings = WorkerSettings.from_json(args[-1])
        self.assertEqual(args[1:3], ["-m", "mproxy.workers"])
        self.assertTrue(settings.debug)
        self.assertEqual(settings.log, "channel")
        sources = [v for k, v in fds.items() if k > 2]
        targets = [k for k in fds if k > 2]
        self.assertTrue(min(targets) > max(sources), fds)
        self.assertEqual(fds[settings.sockets["http"][0][0]], 3)
        self.assertEqual(fds[settings.sockets["https"][0][0]], 4)
        self.assertEqual(fds[settings.udp[0][0]], 5)
        self.assertIn(settings.channel, fds)
        self.assertEqual(settings.sockets["https"][0][1], socket.AF_INET6)
        self.assertEqual(json.loads(settings.to_json())["slot"], 0)


class RetireReleasesSocketsTests(SynchronousTestCase):
    """
    A worker that never served (a standby) lets go of its inherited
    listening sockets as soon as it retires, so that a server started after
    its supervisor died can bind the same ports while it is still exiting.
    """

    def server(self, sockets: dict[str, list[tuple[int, int]]]) -> WorkerServer:
        settings = WorkerSettings(slot=-1, channel=-1, http_port=80, https_port=443,
                                  header_timeout=30.0, idle_timeout=75.0, sockets=sockets,
                                  metrics=False)
        channel = WorkerChannel()
        return WorkerServer(MemoryReactorClock(), settings, ListLogger(), channel.callRemote,
                            exit=lambda: None)

    def listening(self) -> Any:
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        fd = os.dup(s.fileno())
        return fd, s.getsockname()[1]

    def test_unserved_sockets_closed_on_retire(self) -> None:
        import socket

        fd, port = self.listening()
        server = self.server({"http": [(fd, socket.AF_INET)]})
        server.retire(0)
        self.assertRaises(OSError, os.fstat, fd)

    def test_served_sockets_not_closed_twice(self) -> None:
        import socket

        fd, _port = self.listening()
        server = self.server({"http": [(fd, socket.AF_INET)]})
        server.serve()
        # the adopted port owns a copy; the inherited number was closed
        self.assertRaises(OSError, os.fstat, fd)
        other = os.dup(0)  # may reuse the number: retire must not close it
        self.addCleanup(os.close, other)
        server.retire(0)
        os.fstat(other)


def connect_clients(port: int, n: int, test: Any) -> list[Any]:
    import socket

    clients = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        test.addCleanup(client.close)
        clients.append(client)
    return clients


class ReuseportGroupTests(SynchronousTestCase):
    """
    One listening socket per worker and address, in one C{SO_REUSEPORT}
    group: the kernel spreads new connections over them; a port in use is
    refused as before.
    """

    def bound(self, bind: str, port: int = 0, count: int = 2) -> list[Any]:
        from mproxy.workers.binding import bind_sockets

        sockets = bind_sockets(bind, port, count=count)
        for s in sockets:
            self.addCleanup(s.close)
        return sockets

    def test_a_group_per_address_shares_the_connections(self) -> None:
        import socket

        group = self.bound("127.0.0.1")
        self.assertEqual(len(group), 2)
        port = group[0].getsockname()[1]
        self.assertEqual({s.getsockname() for s in group}, {("127.0.0.1", port)})
        for s in group:
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
            self.assertTrue(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        connect_clients(port, 40, self)
        queues = [accept_queue(s) for s in group]
        self.assertEqual(sum(queues), 40)
        # by hash: all 40 to one socket would be one chance in 2**39
        self.assertGreater(min(queues), 0, queues)

    def test_port_in_use_is_refused(self) -> None:
        """
        A port another server listens on fails to bind as it always did,
        whether that server's socket has C{SO_REUSEPORT} (another mproxy,
        the same user) or not.
        """
        import errno
        import socket

        from mproxy.workers.binding import bind_sockets

        group = self.bound("127.0.0.1")
        port = group[0].getsockname()[1]
        with self.assertRaises(OSError) as cm:
            bind_sockets("127.0.0.1", port, count=2)
        self.assertEqual(cm.exception.errno, errno.EADDRINUSE)
        plain = socket.socket()
        self.addCleanup(plain.close)
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        with self.assertRaises(OSError):
            bind_sockets("127.0.0.1", plain.getsockname()[1], count=2)

    def test_all_interfaces_one_group_when_dual_stack(self) -> None:
        import socket

        if not socket.has_ipv6:
            raise self.skipTest("no IPv6")
        sockets = self.bound("", count=2)
        families = [s.family for s in sockets]
        port = sockets[0].getsockname()[1]
        if families[0] == socket.AF_INET6:
            # the dual-stack group takes IPv4 too: no second group for 0.0.0.0
            self.assertEqual(families, [socket.AF_INET6] * 2)
            connect_clients(port, 4, self)
            self.assertEqual(sum(accept_queue(s) for s in sockets), 4)
            six = socket.create_connection(("::1", port), timeout=5)
            self.addCleanup(six.close)
            self.assertEqual(sum(accept_queue(s) for s in sockets), 5)
        self.assertEqual({s.getsockname()[1] for s in sockets}, {port})

    def test_join_group(self) -> None:
        import socket

        from mproxy.workers.binding import join_group

        (first,) = self.bound("127.0.0.1", count=1)
        added = join_group(first, 2)
        for s in added:
            self.addCleanup(s.close)
        self.assertEqual([s.getsockname() for s in added], [first.getsockname()] * 2)
        plain = socket.socket()
        self.addCleanup(plain.close)
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        self.assertRaises(OSError, join_group, plain, 1)

    def test_owners(self) -> None:
        """
        Socket C{i} of an address's group is slot C{i % workers}'s own; a
        group smaller than the workers (one inherited socket) is shared; a
        socket whose address cannot be read is a group of its own.
        """
        from mproxy.workers.binding import socket_owners

        addresses = {1: "a", 2: "a", 3: "b", 4: "b", 5: "a", 6: None, 7: "c"}
        pairs = [(fd, 2) for fd in addresses]
        self.assertEqual(socket_owners(pairs, 2, addresses.get),
                         [0, 1, 0, 1, 0, -1, -1])
        self.assertEqual(socket_owners(pairs, 1, addresses.get), [0] * 7)
        self.assertEqual(socket_owners(pairs, 3, addresses.get), [0, 1, -1, -1, 2, -1, -1])

    def test_local_address(self) -> None:
        from mproxy.workers.binding import local_address

        (s,) = self.bound("127.0.0.1", count=1)
        self.assertEqual(local_address(s.fileno()), (int(s.family), s.getsockname()))
        fd = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.assertIsNone(local_address(fd))


class SocketListenerGroupTests(SynchronousTestCase):
    def listener(self, **kw: Any) -> Any:
        from mproxy.workers.sockets import SocketListener

        listener = SocketListener("HTTP", kw.pop("port", 0), kw.pop("bind", "127.0.0.1"), **kw)
        listener.privilegedStartService()
        self.addCleanup(listener.stopService)
        return listener

    def test_a_socket_per_worker(self) -> None:
        listener = self.listener(workers=3)
        self.assertEqual(len(listener.fds), 3)
        self.assertEqual([owner for _fd, _family, owner in listener.worker_sockets], [0, 1, 2])
        self.assertEqual([(fd, family) for fd, family, _ in listener.worker_sockets],
                         listener.fds)

    def test_udp_is_one_socket(self) -> None:
        import socket

        listener = self.listener(workers=3, kind=socket.SOCK_DGRAM, name="http3")
        self.assertEqual(len(listener.fds), 1)
        self.assertEqual(listener.worker_sockets[0][2], -1)

    def test_socket_activation_stays_shared(self) -> None:
        """
        One socket inherited from systemd is shared by the workers, and no
        socket is bound beside it (it would not outlive this process as
        systemd's does).
        """
        import socket

        inherited = socket.socket()
        self.addCleanup(inherited.close)
        inherited.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(8)
        port = inherited.getsockname()[1]
        listener = self.listener(
            workers=2, inherited=[(inherited.fileno(), int(inherited.family), port)])
        self.assertEqual(listener.worker_sockets,
                         [(inherited.fileno(), int(inherited.family), -1)])

    def test_upgrade_to_more_workers_grows_the_group(self) -> None:
        """
        Handed over by an image with one worker, the group gets a socket
        for the second worker, on the same port and in the same group.
        """
        from mproxy.workers.binding import bind_sockets

        (old,) = bind_sockets("127.0.0.1", 0, count=1)
        self.addCleanup(old.close)
        port = old.getsockname()[1]
        listener = self.listener(workers=2, grow=True,
                                 inherited=[(old.fileno(), int(old.family), port)])
        self.assertEqual(len(listener.fds), 2)
        self.assertEqual(listener.fds[0], (old.fileno(), int(old.family)))
        self.assertEqual([owner for *_, owner in listener.worker_sockets], [0, 1])
        new = listener._sockets[0]
        self.assertEqual(new.getsockname(), old.getsockname())
        connect_clients(port, 40, self)
        self.assertGreater(min(accept_queue(old), accept_queue(new)), 0)
        # the socket bound here closes with the listener; the handed-over one stays
        listener.stopService()
        self.assertEqual(new.fileno(), -1)
        self.assertEqual(old.getsockname()[1], port)

    def test_upgrade_to_more_workers_of_a_shared_socket(self) -> None:
        """
        A handed-over socket not in a group (from an image before groups)
        cannot get members: it stays shared.
        """
        import socket

        old = socket.socket()
        self.addCleanup(old.close)
        old.bind(("127.0.0.1", 0))
        old.listen(8)
        port = old.getsockname()[1]
        listener = self.listener(workers=2, grow=True,
                                 inherited=[(old.fileno(), int(old.family), port)])
        self.assertEqual(listener.worker_sockets, [(old.fileno(), int(old.family), -1)])
        self.assertEqual(listener._sockets, [])

    def test_upgrade_to_fewer_workers_keeps_every_socket_served(self) -> None:
        """
        Handed over by an image with three workers, to two: every socket
        of the group stays open and owned (slot 0 owns two), so the
        connections the kernel still queues on the third are served.
        """
        from mproxy.workers.binding import bind_sockets

        old = bind_sockets("127.0.0.1", 0, count=3)
        for s in old:
            self.addCleanup(s.close)
        port = old[0].getsockname()[1]
        listener = self.listener(workers=2, grow=True,
                                 inherited=[(s.fileno(), int(s.family), port) for s in old])
        self.assertEqual(listener.worker_sockets,
                         [(s.fileno(), int(s.family), owner) for s, owner in zip(old, [0, 1, 0])])
        self.assertEqual(listener._sockets, [])


class OwnSocketTests(SynchronousTestCase):
    """
    A worker takes its own socket's whole queue per wake-up, and one
    connection per wake-up from the other slots' sockets.
    """

    def group(self, n: int) -> list[Any]:
        from mproxy.workers.binding import bind_sockets

        sockets = bind_sockets("127.0.0.1", 0, count=n)
        for s in sockets:
            self.addCleanup(s.close)
        return sockets

    def serving(self, slot: int, sockets: list[tuple[int, ...]],
                acceptors: int = 2) -> tuple[WorkerServer, MemoryReactorClock]:
        settings = WorkerSettings(slot=-1, channel=-1, http_port=80, https_port=443,
                                  header_timeout=30, idle_timeout=60, acceptors=acceptors,
                                  sockets={"http": sockets})
        reactor = MemoryReactorClock()
        server = WorkerServer(reactor, settings, ListLogger(), lambda *a, **k: None,
                              exit=lambda: None)
        channel = WorkerChannel(server)
        # a standby worker learns its slot when it is told to serve
        channel.serve(slot=slot, http3=False, alt_svc=0)

        def close() -> None:
            for reader in reactor.getReaders():
                if reader not in server.ports:
                    reader.socket.close()
            server.retire(0)
            reactor.advance(0)

        self.addCleanup(close)
        return server, reactor

    def queued(self, sockets: list[Any], each: int) -> None:
        """Queue C{each} connections on every one of C{sockets}."""
        port = sockets[0].getsockname()[1]
        for _ in range(200):
            if min(accept_queue(s) for s in sockets) >= each:
                break
            connect_clients(port, 1, self)
        self.assertGreaterEqual(min(accept_queue(s) for s in sockets), each)

    def test_own_whole_queue_others_helped(self) -> None:
        import socket

        from mproxy.workers.sockets import HelpingPort, OneAcceptPort

        sockets = self.group(2)
        self.queued(sockets, 3)
        other = accept_queue(sockets[0])
        entries = [(os.dup(s.fileno()), socket.AF_INET, owner)
                   for s, owner in zip(sockets, (0, 1))]
        server, reactor = self.serving(1, entries)
        foreign, mine = server.ports
        self.assertEqual((type(foreign), type(mine)), (HelpingPort, OneAcceptPort))
        self.assertEqual(mine.acceptors, 1)
        mine.doRead()
        self.assertEqual(accept_queue(sockets[1]), 0)
        # the other slot's connections are its own to take for a while
        foreign.doRead()
        self.assertEqual(accept_queue(sockets[0]), other)
        self.assertNotIn(foreign, reactor.getReaders())
        reactor.advance(HELP_AFTER)
        self.assertEqual(accept_queue(sockets[0]), 0)
        self.assertIn(foreign, reactor.getReaders())

    def test_shared_socket_by_the_workers_count(self) -> None:
        import socket

        (s,) = self.group(1)
        entries = [(os.dup(s.fileno()), socket.AF_INET, -1)]
        server, _ = self.serving(0, entries, acceptors=2)
        self.assertEqual(server.ports[0].acceptors, 2)

    def test_settings_without_owners_are_shared(self) -> None:
        import socket

        (s,) = self.group(1)
        server, _ = self.serving(0, [(os.dup(s.fileno()), socket.AF_INET)], acceptors=3)
        self.assertEqual(server.ports[0].acceptors, 3)

    def test_owners_survive_the_command_line(self) -> None:
        settings = WorkerSettings(slot=1, channel=3, http_port=80, https_port=443,
                                  header_timeout=30, idle_timeout=60,
                                  sockets={"http": [(7, 2, 0), (8, 2, 1)], "https": [(9, 10)]})
        self.assertEqual(WorkerSettings.from_json(settings.to_json()), settings)

    def test_child_descriptors_keep_owners(self) -> None:
        from mproxy.workers.settings import child_descriptors

        fds, _channel, sockets, _udp = child_descriptors(
            20, 21, True, {"http": [(10, 2, 0), (11, 2, 1)]}, [])
        self.assertEqual([owner for _fd, _family, owner in sockets["http"]], [0, 1])
        self.assertEqual([fds[fd] for fd, _family, _owner in sockets["http"]], [10, 11])


class HelpingPortTests(SynchronousTestCase):
    """
    A worker helping with another worker's socket takes the connections
    the owner has left there for L{HELP_AFTER} seconds, no sooner, and no
    newer ones.
    """

    def setUp(self) -> None:
        import socket

        from twisted.internet.protocol import Factory, Protocol

        from mproxy.workers.sockets import adopt_listening

        self.listener = socket.socket()
        self.addCleanup(self.listener.close)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.built: list[Any] = []

        def build() -> Protocol:
            self.built.append(Protocol())
            return self.built[-1]

        self.reactor = MemoryReactorClock()
        self.port = adopt_listening(self.reactor, self.listener.fileno(), socket.AF_INET,
                                    Factory.forProtocol(build), helping=True)
        self.addCleanup(self.close)

    def close(self) -> None:
        for protocol in self.built:
            protocol.transport.socket.close()
        if self.port.connected:
            self.port.connectionLost(None)

    def connect(self, n: int) -> None:
        connect_clients(self.listener.getsockname()[1], n, self)

    def test_taken_by_the_owner_meanwhile(self) -> None:
        self.connect(2)
        self.port.doRead()
        self.reactor.advance(HELP_AFTER / 2)
        self.assertEqual(self.built, [])
        for _ in range(2):
            self.listener.accept()[0].close()  # the owner takes them
        self.reactor.advance(HELP_AFTER / 2)
        self.assertEqual(self.built, [])
        self.assertIn(self.port, self.reactor.getReaders())

    def test_left_by_the_owner_taken_not_the_newer(self) -> None:
        self.connect(3)
        self.port.doRead()
        self.port.doRead()  # not reading meanwhile; a second wake-up changes nothing
        self.connect(2)
        self.reactor.advance(HELP_AFTER)
        self.assertEqual((len(self.built), accept_queue(self.listener)), (3, 2))
        self.port.doRead()
        self.reactor.advance(HELP_AFTER)
        self.assertEqual((len(self.built), accept_queue(self.listener)), (5, 0))

    def test_queue_not_readable_one_at_a_time(self) -> None:
        import mproxy.workers.sockets as sockets

        self.patch(sockets, "queued_connections", lambda sock: None)
        self.connect(2)
        self.port.doRead()
        self.reactor.advance(HELP_AFTER)
        self.assertEqual(len(self.built), 1)

    def test_closed_while_waiting(self) -> None:
        self.connect(1)
        self.port.doRead()
        self.port.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.built, [])
