# -*- test-case-name: tests.test_workers -*-
"""
The supervisor's side of its workers: L{WorkerPool} starts them, replaces
one that dies, and is the controller's L{IDataPlane}: every routing change,
health transition, certificate and challenge goes to every worker, and
drains, in-flight counts and metrics come back summed.

The API the upgrade builds on:

  - L{WorkerPool.start_generation}C{(count)}: start C{count} workers; fires
    with their L{Generation} once every one is serving (holding the current
    routing, health and certificates, accepting on the listening sockets);
  - L{WorkerPool.retire}C{(generation, grace)}: each of its workers stops
    accepting (the sockets stay open in the others), lets its in-flight
    requests finish for up to C{grace} seconds, and exits; fires when all
    have exited;
  - L{WorkerPool.channels}: C{[(pid, fd, generation), ...]}, the channel
    descriptor of every worker, to be kept across an exec;
  - L{WorkerPool.adopt}C{(channels)}: take over such workers in the new
    image (they are not its children: their end is seen as their channel
    closing, then C{waitpid(WNOHANG)} when possible).

A worker that exits while its generation serves is replaced in its slot at
once (its connections are lost; the other workers go on serving), and the
supervisor logs both.  A worker that does not answer is not waited for by
a switch: a dead worker's acknowledgements and drains count as done.

Starting processes is the L{ProcessSpawner}'s job (injected: unit tests
connect in-memory workers instead).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.protocols import amp
from zope.interface import implementer

from mproxy.target import Drained
from mproxy.workers import commands as c
from mproxy.workers.interfaces import IDataPlane, Switch
from mproxy.workers.settings import child_descriptors

#: A replacement for a worker that died before serving is started after this.
RESPAWN_DELAY = 1.0


class Generation:
    """
    Workers started together (L{WorkerPool.start_generation}).
    """

    def __init__(self, number: int, count: int) -> None:
        self.number = number
        self.count = count
        self.workers: list[WorkerHandle] = []
        self.retiring = False
        #: taken over from the image before an upgrade: its workers know the
        #: targets of that image's supervisor only by address
        self.adopted = False

    def __repr__(self) -> str:
        return f"<Generation {self.number} workers={[w.pid for w in self.workers]}>"


class WorkerHandle:
    """
    One worker as the pool sees it.
    """

    def __init__(self, slot: int, generation: Generation) -> None:
        self.slot = slot
        self.generation = generation
        self.pid: int | None = None
        self.channel: SupervisorChannel | None = None
        self.process: Any = None
        self.serving = False
        self.gone = False
        self.started_at = 0.0
        self.ready: Deferred[WorkerHandle] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.drains: dict[int, Deferred[Drained]] = {}

    def __repr__(self) -> str:
        return f"<Worker {self.generation.number}.{self.slot} pid={self.pid}>"


class SupervisorChannel(amp.AMP):
    """
    The supervisor's end of a worker's channel.
    """

    def __init__(self, pool: WorkerPool, worker: WorkerHandle) -> None:
        super().__init__()
        self.pool = pool
        self.worker = worker

    @c.Drained.responder
    def drained(self, seq: int, requests: int, cut: int) -> dict:
        d = self.worker.drains.pop(seq, None)
        if d is not None:
            d.callback(Drained(requests, cut))
        return {}

    @c.Eject.responder
    def eject(self, address: str, error: str, key: str | None = None) -> dict:
        self.pool.on_eject(address, error, key)
        return {}

    @c.AskCertificate.responder
    def ask_certificate(self, server_name: str) -> dict:
        self.pool.on_ask_certificate(server_name)
        return {}

    @c.FetchCertificate.responder
    def fetch_certificate(self, server_name: str) -> dict:
        from mproxy.tls.certs import CertifiedKey
        from mproxy.workers.certs import _pem

        found = self.pool.on_ask_certificate(server_name)
        return {"pem": _pem(found) if isinstance(found, CertifiedKey) else None}

    @c.Exhausted.responder
    def exhausted(self, error: str) -> dict:
        self.pool.on_exhausted(error)
        return {}

    @c.Log.responder
    def log(self, line: str) -> dict:
        self.pool.write_line(line)
        return {}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.pool._channel_lost(self.worker)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, worker: WorkerHandle) -> None:
        self.pool = pool
        self.worker = worker

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        if getattr(value, "signal", None):
            how = f"killed by signal {value.signal}"
        else:
            how = f"exit status {getattr(value, 'exitCode', None)}"
        self.pool._worker_ended(self.worker, how)


class ProcessSpawner:
    """
    Starts a worker process (C{python -m mproxy.workers}) with its channel
    and the listening sockets at descriptors above all of the supervisor's
    (their numbers are on its command line).

    @param listening: C{{kind: [(fd, family, owner), ...]}} of the
        supervisor's listening TCP sockets (C{owner}: the slot whose own
        socket it is, or C{-1}; every worker gets all of them, a standby
        worker's slot being known only once it serves); C{udp}: the HTTP/3
        sockets (the worker of slot 0 serves them, the others close them).
    @param settings: the L{mproxy.workers.worker.WorkerSettings} fields
        other than the slot and descriptors.
    """

    def __init__(self, reactor: Any, listening: dict[str, list[tuple[int, ...]]],
                 udp: list[tuple[int, int]], settings: dict[str, Any],
                 log_to_fd: bool, python: str = sys.executable,
                 env: dict[str, str] | None = None) -> None:
        self.reactor = reactor
        self.listening = listening
        self.udp = udp
        self.settings = settings
        self.log_to_fd = log_to_fd
        self.python = python
        self.env = env

    def spawn(self, pool: WorkerPool, worker: WorkerHandle) -> None:
        from mproxy.workers.settings import WorkerSettings

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            fds, channel_fd, sockets, udp = child_descriptors(
                child.fileno(), devnull, self.log_to_fd, self.listening, self.udp)
            settings = WorkerSettings(slot=worker.slot, channel=channel_fd, sockets=sockets,
                                      udp=udp,
                                      log="fd" if self.log_to_fd else "channel",
                                      **self.settings)
            env = dict(os.environ if self.env is None else self.env)
            worker.process = self.reactor.spawnProcess(
                _WorkerProcess(pool, worker), self.python,
                [self.python, "-m", "mproxy.workers", settings.to_json()],
                env=env, childFDs=fds)
            worker.pid = worker.process.pid
        finally:
            child.close()
            os.close(devnull)
        channel = pool.channel_for(worker)
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX,
                                           Factory.forProtocol(lambda: channel))
        parent.close()


def _sum(results: list[tuple[bool, Any]]) -> Drained:
    out = Drained()
    for ok, value in results:
        if ok and isinstance(value, Drained):
            out += value
    return out


@implementer(IDataPlane)
class WorkerPool(Service):
    """
    See the module docstring.

    @param spawner: C{spawn(pool, worker)} starts a worker: sets its
        C{pid}, connects a channel built by L{channel_for}, and makes the
        pool's C{_worker_ended(worker, how)} be called when it ends.
    @param on_eject: called with C{(address, error, key)} when a worker could
        not reach a target (C{key}: the controller's name of that target, or
        C{None} from a worker that does not know it).
    @param on_ask_certificate: called with an on-demand TLS name a worker
        has no certificate for; returns the certificate the supervisor has
        for it now, if any (sent to a worker that waits for it).
    @param write_line: writes a log line a worker sent.
    @param on_exhausted: called when a worker ran out of file descriptors.
    """

    def __init__(self, reactor: Any, logger: Any, spawner: Any, count: int,
                 grace: float = 10.0, spares: int = 0,
                 on_eject: Callable[[str, str, str | None], None] = lambda a, e, k: None,
                 on_ask_certificate: Callable[[str], Any] = lambda n: None,
                 write_line: Callable[[str], None] | None = None,
                 on_exhausted: Callable[[str], None] = lambda e: None) -> None:
        self.reactor = reactor
        self.logger = logger
        self.spawner = spawner
        self.count = count
        self.grace = grace
        self.on_eject = on_eject
        self.on_ask_certificate = on_ask_certificate
        self.on_exhausted = on_exhausted
        self.write_line = write_line or (lambda line: None)
        self.spares = spares
        #: started workers waiting to replace one that dies (so that a
        #: replacement serves without waiting for a process to start)
        self.standby: list[WorkerHandle] = []
        self.generations: list[Generation] = []
        self._next_generation = 1
        self.seq = 0
        self.records: list[dict[str, Any]] = []
        self.health: dict[str, bool] = {}
        #: every target's key and health (the controller's target_health_map)
        self.targets: dict[str, Any] | None = None
        self.drain_timeout = 30.0
        self.certificates: dict[str, Any] = {"default": None, "static": {}, "hosts": [],
                                             "directories": ["", ""]}
        self.challenges: tuple[dict[str, str], dict[str, Any]] = ({}, {})
        self.alt_svc = 0
        self._inflight: dict[str, int] = {}
        #: called after each change is sent, in the next reactor turn (when
        #: the controller has finished making it: certificates for new
        #: hosts are loaded then); what they send reaches the workers before
        #: the change counts as switched
        self.after_apply: list[Callable[[], None]] = []

    # workers

    @property
    def workers(self) -> list[WorkerHandle]:
        """
        Every worker with a channel, of every generation.
        """
        return [w for g in self.generations for w in g.workers
                if w.channel is not None and not w.gone]

    def channel_for(self, worker: WorkerHandle) -> SupervisorChannel:
        channel = SupervisorChannel(self, worker)
        worker.channel = channel
        return channel

    def _start(self, worker: WorkerHandle) -> None:
        """
        Start C{worker}, send it the current state, and have it serve.
        """
        worker.started_at = self.reactor.seconds()
        self.spawner.spawn(self, worker)
        self._activate(worker)

    def _activate(self, worker: WorkerHandle) -> None:
        """
        Send a started C{worker} the current state, and have it serve.
        """
        ch = worker.channel
        assert ch is not None
        quiet = lambda f: None  # noqa: E731 - a dead worker's answers do not matter
        ch.callRemote(c.SetCertificates, snapshot=self.certificates).addErrback(quiet)
        ch.callRemote(c.SetChallenges, http01=self.challenges[0],
                      alpn=self.challenges[1]).addErrback(quiet)
        ch.callRemote(c.SetServices, seq=self.seq, records=self.records, health=self.health,
                      drain_timeout=float(self.drain_timeout),
                      targets=self.targets).addErrback(quiet)
        d = ch.callRemote(c.Serve, slot=worker.slot, http3=worker.slot == 0,
                          alt_svc=self.alt_svc)

        def serving(answer: dict) -> None:
            worker.serving = True
            if not worker.ready.called:
                worker.ready.callback(worker)

        d.addCallbacks(serving, quiet)

    def start_generation(self, count: int | None = None) -> Deferred[Generation]:
        """
        Start a generation of C{count} workers (default: the pool's count);
        fires once all serve, or fails when one ends before it serves.
        """
        generation = Generation(self._next_generation, count or self.count)
        self._next_generation += 1
        self.generations.append(generation)
        for slot in range(generation.count):
            worker = WorkerHandle(slot, generation)
            generation.workers.append(worker)
            self._start(worker)
        d = DeferredList([w.ready for w in generation.workers], fireOnOneErrback=True,
                         consumeErrors=True)

        def started(_: object) -> Generation:
            self.logger.info("Workers started", generation=generation.number,
                             pids=[w.pid for w in generation.workers])
            self._fill_standby()
            return generation

        def failed(f: Any) -> Any:
            return f.value.subFailure

        return d.addCallbacks(started, failed)

    # standby workers

    def _fill_standby(self) -> None:
        while self.running and len(self.standby) < self.spares:
            spare = WorkerHandle(-1, Generation(0, 0))
            self.standby.append(spare)
            spare.started_at = self.reactor.seconds()
            try:
                self.spawner.spawn(self, spare)
            except Exception as e:
                self.standby.remove(spare)
                self.logger.error("Unable to start a standby worker", error=str(e))
                return

    def _standby_ended(self, spare: WorkerHandle) -> None:
        spare.gone = True
        if spare in self.standby:
            self.standby.remove(spare)
            if self.running:
                self.reactor.callLater(RESPAWN_DELAY, self._fill_standby)
        if not spare.ended.called:
            spare.ended.callback(None)

    def _take_standby(self, worker: WorkerHandle) -> bool:
        """
        Make a standby worker serve as C{worker}.
        """
        while self.standby:
            spare = self.standby.pop(0)
            if spare.gone or spare.channel is None:
                continue
            worker.pid, worker.process, worker.started_at = (
                spare.pid, spare.process, spare.started_at)
            worker.channel = spare.channel
            spare.channel.worker = worker
            if spare.process is not None:
                spare.process.proto.worker = worker
            self._activate(worker)
            self.reactor.callLater(0, self._fill_standby)
            return True
        return False

    def _worker_ended(self, worker: WorkerHandle, how: str) -> None:
        if worker in self.standby or worker.slot < 0:
            self._standby_ended(worker)
            return
        if worker.gone:
            return
        was_serving = worker.serving
        worker.gone = True
        worker.serving = False
        for d in worker.drains.values():
            d.callback(Drained())
        worker.drains.clear()
        generation = worker.generation
        if not worker.ready.called:
            worker.ready.errback(RuntimeError(f"worker {worker.slot} ended before serving ({how})"))
        if not worker.ended.called:
            worker.ended.callback(None)
        if generation.retiring or not self.running:
            self.logger.debug("Worker exited", pid=worker.pid, slot=worker.slot, status=how)
            if all(w.gone for w in generation.workers) and generation in self.generations:
                self.generations.remove(generation)
            return
        self.logger.error("Worker exited unexpectedly: replacing it", pid=worker.pid,
                          slot=worker.slot, status=how)
        replacement = WorkerHandle(worker.slot, generation)
        generation.workers[generation.workers.index(worker)] = replacement
        # one that never served may fail again at once: do not spin
        delay = 0 if was_serving else RESPAWN_DELAY

        def replaced(w: WorkerHandle) -> None:
            self.logger.info("Worker replaced", pid=w.pid, slot=w.slot, was=worker.pid,
                             seconds=round(self.reactor.seconds() - worker_died, 3))

        worker_died = self.reactor.seconds()
        replacement.ready.addCallbacks(replaced, lambda f: None)
        if delay:
            self.reactor.callLater(delay, self._restart, replacement)
        else:
            self._restart(replacement)

    def _restart(self, worker: WorkerHandle) -> None:
        if worker.generation.retiring or not self.running:
            return
        if self._take_standby(worker):
            return
        try:
            self._start(worker)
        except Exception as e:
            self._worker_ended(worker, f"could not start: {e}")

    def _channel_lost(self, worker: WorkerHandle) -> None:
        worker.channel = None
        if worker.process is None and not worker.gone:
            # adopted: not our child, its channel closing is its end
            self._reap_adopted(worker)

    def retire(self, generation: Generation, grace: float) -> Deferred[None]:
        """
        Retire C{generation}'s workers (see the module docstring).
        """
        generation.retiring = True
        for w in generation.workers:
            if w.channel is not None and not w.gone:
                w.channel.callRemote(c.Retire, grace=float(grace)).addErrback(lambda f: None)
        d = DeferredList([w.ended for w in generation.workers], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def channels(self) -> list[tuple[int, int, int]]:
        """
        C{(pid, channel fd, generation number)} of every worker.
        """
        out = []
        for w in self.workers:
            transport = w.channel.transport if w.channel is not None else None
            if transport is not None and w.pid is not None:
                out.append((w.pid, transport.fileno(), w.generation.number))
        return out

    def adopt(self, channels: Sequence[tuple[int, int, int]]) -> list[Generation]:
        """
        Take over the workers of an earlier image of this process (their
        channel descriptors survived an exec); they serve as they did.
        """
        by_number: dict[int, Generation] = {}
        for pid, fd, number in channels:
            generation = by_number.get(number)
            if generation is None:
                generation = by_number[number] = Generation(number, 0)
                generation.adopted = True
                self.generations.append(generation)
                self._next_generation = max(self._next_generation, number + 1)
            worker = WorkerHandle(len(generation.workers), generation)
            generation.workers.append(worker)
            generation.count += 1
            worker.pid = pid
            worker.serving = True
            worker.ready.callback(worker)
            channel = self.channel_for(worker)
            self.reactor.adoptStreamConnection(fd, socket.AF_UNIX,
                                               Factory.forProtocol(lambda ch=channel: ch))
            os.close(fd)
        return list(by_number.values())

    def _reap_adopted(self, worker: WorkerHandle, tries: int = 20) -> None:
        try:
            pid, status = os.waitpid(worker.pid or -1, os.WNOHANG)
        except ChildProcessError:
            pid, status = worker.pid or 0, 0
        if pid == 0 and tries > 0:
            self.reactor.callLater(0.05, self._reap_adopted, worker, tries - 1)
            return
        self._worker_ended(worker, f"exit status {os.waitstatus_to_exitcode(status)}"
                           if pid else "channel closed")

    # IService

    def startService(self) -> None:
        super().startService()

    def stop_standby(self) -> Deferred[None]:
        """
        Stop the standby workers (no more are started); fires once they exited.
        """
        self.spares = 0
        standby, self.standby = self.standby, []
        for spare in standby:
            if spare.channel is not None and not spare.gone:
                spare.channel.callRemote(c.Retire, grace=0.0).addErrback(lambda f: None)
        d = DeferredList([s.ended for s in standby], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        ds = [self.retire(g, self.grace) for g in list(self.generations)]
        ds.append(self.stop_standby())
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    # IDataPlane

    def _broadcast(self, command: Any, **arguments: Any) -> list[Deferred[Any]]:
        return [w.channel.callRemote(command, **arguments)  # type: ignore[union-attr]
                for w in self.workers]

    def _ask_serving(self, command: Any) -> list[Deferred[Any]]:
        """
        Ask C{command} of the workers that serve: one still starting has no
        requests or metrics yet, and may take seconds to answer.
        """
        return [w.channel.callRemote(command)  # type: ignore[union-attr]
                for w in self.workers if w.serving]

    def apply(self, records: Any, drain_timeout: float, targets: Any = None) -> Switch:
        self.seq += 1
        self.targets = targets
        seq = self.seq
        self.records = [r.to_json() for r in records]
        self.drain_timeout = drain_timeout
        addresses = {a for r in records for slot in (r.active, r.rollout) if slot is not None
                     for a in slot.writers + slot.readers}
        self.health = {a: h for a, h in self.health.items() if a in addresses}
        acks = []
        drains = []
        # Workers adopted after an upgrade get no keys: theirs came from the
        # supervisor image before, whose keys differ from this one's, and
        # every deployment would look new to them.
        for w in self.workers:
            ch = w.channel
            assert ch is not None
            drained: Deferred[Drained] = Deferred()
            w.drains[seq] = drained
            drains.append(drained)
            acks.append(ch.callRemote(c.SetServices, seq=seq, records=self.records,
                                      health=self.health, drain_timeout=float(drain_timeout),
                                      targets=None if w.generation.adopted else self.targets))

        barrier: Deferred[None] = Deferred()
        self.reactor.callLater(0, self._barrier, barrier)

        def draining(results: list[tuple[bool, Any]]) -> int:
            return sum(v["draining"] for ok, v in results if ok)

        switched = DeferredList(acks, consumeErrors=True).addCallback(draining)
        switched.addCallback(lambda n: barrier.addCallback(lambda _: n))
        return Switch(switched, DeferredList(drains, consumeErrors=True).addCallback(_sum))

    def _barrier(self, done: Deferred[None]) -> None:
        """
        Run the L{after_apply} hooks, then fire C{done} once every worker
        has handled what they sent (the channel is ordered: an answer to a
        later command means the earlier ones were handled).
        """
        for hook in self.after_apply:
            hook()
        d = DeferredList(self._broadcast(c.GetInflight), consumeErrors=True)
        d.addCallback(lambda _: done.callback(None))

    def set_health(self, address: str, healthy: bool, key: str | None = None) -> None:
        self.health[address] = healthy
        if key is not None and self.targets is not None:
            self.targets["states"][key] = "healthy" if healthy else "unhealthy"
        for w in self.workers:
            assert w.channel is not None
            w.channel.callRemote(c.SetHealth, address=address, healthy=healthy,
                                 key=None if w.generation.adopted else key
                                 ).addErrback(lambda f: None)

    def drain_service(self, name: str, timeout: float) -> Deferred[Drained]:
        ds = [d.addCallback(lambda a: Drained(a["requests"], a["cut"]))
              for d in self._broadcast(c.DrainService, service=name, timeout=float(timeout))]
        return DeferredList(ds, consumeErrors=True).addCallback(_sum)

    def refresh(self) -> Deferred[None]:
        def summed(results: list[tuple[bool, Any]]) -> None:
            total: dict[str, int] = {}
            for ok, answer in results:
                if ok:
                    for name, n in answer["inflight"].items():
                        total[name] = total.get(name, 0) + n
            self._inflight = total

        d = DeferredList(self._ask_serving(c.GetInflight), consumeErrors=True)
        return d.addCallback(summed)

    def inflight(self, service: str) -> int:
        return self._inflight.get(service, 0)

    # certificates, metrics

    def set_certificates(self, snapshot: dict[str, Any]) -> None:
        self.certificates = snapshot
        for d in self._broadcast(c.SetCertificates, snapshot=snapshot):
            d.addErrback(lambda f: None)

    def set_challenges(self, http01: dict[str, str], alpn: dict[str, Any]) -> Deferred[None]:
        """
        Fires once every worker holds the challenges.
        """
        self.challenges = (http01, alpn)
        ds = self._broadcast(c.SetChallenges, http01=http01, alpn=alpn)
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def metric_families(self) -> Deferred[list[Any]]:
        """
        Every serving worker's C{mproxy_*} metric families (one list each).
        """
        ds = self._ask_serving(c.GetMetrics)

        def collected(results: list[tuple[bool, Any]]) -> list[Any]:
            return [answer["families"] for ok, answer in results if ok]

        return DeferredList(ds, consumeErrors=True).addCallback(collected)
