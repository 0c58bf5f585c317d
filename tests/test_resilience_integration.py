"""
Integration tests of resilience between deploys: the real C{mproxy run}, real
target processes on 127.0.0.1 (tests/resilience_app.py) that are killed with
SIGKILL and started again on the same port, and 20 concurrent keep-alive
clients (threads with their own connections, which never resend anything
themselves).

Latency bounds are asserted with generous limits; the figures measured are
printed (run with C{-e} / look at the test log) for the record.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess, child_env

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resilience_app.py")
CLIENTS = 20


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def report(name: str, **figures: Any) -> None:
    """
    The figures a test measured, for the record.
    """
    line = json.dumps({"test": name, **figures})
    sys.stderr.write(f"resilience figures: {line}\n")
    with open("resilience-figures.jsonl", "a") as f:
        f.write(line + "\n")


class _AppProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.listening.called and b"\n" in self.buffer:
            line = self.buffer.split(b"\n", 1)[0]
            if line.startswith(b"listening "):
                self.listening.callback(int(line.split()[1]))

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError("target app exited before listening"))
        self.ended.callback(None)


class App:
    """
    One target process; C{start} (again) listens on the port of its first
    start.
    """

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.args = args
        self.port = 0
        self.proto: _AppProtocol | None = None
        self.process: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @inlineCallbacks
    def start(self) -> Any:
        self.proto = _AppProtocol()
        argv = [sys.executable, APP, "--name", self.name, "--port", str(self.port), *self.args]
        self.process = reactor.spawnProcess(self.proto, sys.executable, argv, env=child_env())
        self.port = yield self.proto.listening
        return self.port

    @inlineCallbacks
    def kill(self) -> Any:
        if self.proto is None or self.proto.ended.called:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        yield self.proto.ended


class Load:
    """
    C{clients} threads, each with its own keep-alive connection to the
    proxy, sending requests until stopped.  A client whose connection fails
    counts a failure and opens a new one.  Each result: (start, seconds,
    status, body or error).
    """

    def __init__(self, port: int, clients: int = CLIENTS, path: str = "/work",
                 pause: tuple[float, float] = (0.005, 0.01), limit: int = 0) -> None:
        self.port = port
        self.clients = clients
        self.path = path
        self.pause = pause
        self.limit = limit
        self.results: list[tuple[float, float, int, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = 0
        while not self.stopping.is_set() and (not self.limit or sent < self.limit):
            start = time.monotonic()
            try:
                conn.request("GET", self.path, headers={"Host": "example.com"})
                r = conn.getresponse()
                body = r.read().decode("utf-8", "replace")
                result = (start, time.monotonic() - start, r.status, body[:40])
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                result = (start, time.monotonic() - start, 0, f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self.lock:
                self.results.append(result)
            sent += 1
            time.sleep(random.uniform(*self.pause))
        conn.close()

    def stop(self) -> Deferred[None]:
        self.stopping.set()
        return self.join()

    def join(self) -> Deferred[None]:
        pool = ThreadPool(1, 1)
        pool.start()

        def join() -> None:
            for t in self.threads:
                t.join(60)

        d = deferToThreadPool(reactor, pool, join)
        d.addBoth(lambda r: (pool.stop(), r)[1])
        return d

    def failed(self, since: float = 0.0) -> list[tuple[float, float, int, str]]:
        return [r for r in self.results if r[2] != 200 and r[0] >= since]


class ResilienceTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def proxy(self) -> Any:
        p = MproxyProcess(reactor, self.mktemp())
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        return p

    @inlineCallbacks
    def app(self, name: str, *args: str) -> Any:
        a = App(name, *args)
        yield a.start()
        self.addCleanup(a.kill)
        return a

    @inlineCallbacks
    def deploy(self, p: MproxyProcess, *args: str) -> Any:
        r = yield p.command("deploy", "web", *args)
        self.assertEqual(r.status, 0, r.err)

    @inlineCallbacks
    def health(self, p: MproxyProcess, address: str) -> Any:
        r = yield p.command("list", "--json")
        self.assertEqual(r.status, 0, r.err)
        row = json.loads(r.out)[0]
        return row["target_health"][address]

    @inlineCallbacks
    def until_health(self, p: MproxyProcess, address: str, state: str, limit: float) -> Any:
        """
        Poll C{list --json} until C{address} is in C{state}; fires with the
        seconds it took (the time of the answer that showed it).
        """
        start = time.monotonic()
        while True:
            h = yield self.health(p, address)
            took = time.monotonic() - start
            if h["health"] == state:
                return took, h
            if took > limit + 5:
                self.fail(f"{address} not {state} after {took:.1f}s: {h}")
            yield sleep(0.1)

    def transition_after(self, p: MproxyProcess, address: str, state: str,
                         since: float) -> float:
        """
        Seconds from the wall-clock time C{since} to the server's first
        log line saying C{address} became C{state} after it (the moment the
        server's state changed, which C{list} shows from then on; a C{list}
        process adds its own start-up on top).
        """
        for r in p.records:
            if (r.get("msg") == "Target health updated" and r.get("target") == address
                    and r.get("state") == state):
                at = datetime.datetime.fromisoformat(r["time"]).timestamp()
                if at >= since:
                    return at - since
        self.fail(f"no log line for {address} becoming {state}")

    def load(self, p: MproxyProcess, **kw: Any) -> Load:
        load = Load(p.http_port, **kw)  # type: ignore[arg-type]
        load.start()
        self.addCleanup(load.stop)
        return load

    @inlineCallbacks
    def test_kill_one_of_two_under_load(self) -> Any:
        """
        Two targets, one killed with SIGKILL under GET load: no request
        fails; C{list} shows it unhealthy within 3 s; started again on the
        same port it is back in rotation within 3 s.
        """
        p = yield self.proxy()
        a = yield self.app("a")
        b = yield self.app("b")
        yield self.deploy(p, "--target", f"{a.address},{b.address}")
        load = self.load(p)
        yield sleep(1.5)
        killed = time.monotonic()
        killed_wall = time.time()
        yield a.kill()
        down, h = yield self.until_health(p, a.address, "unhealthy", 3)
        self.assertTrue(h["last_error"])
        yield sleep(1)
        restarted = time.monotonic()
        restarted_wall = time.time()
        yield a.start()
        up, _ = yield self.until_health(p, a.address, "healthy", 3)
        server_down = self.transition_after(p, a.address, "unhealthy", killed_wall)
        server_up = self.transition_after(p, a.address, "healthy", restarted_wall)
        yield sleep(1)
        back = [r for r in load.results if r[0] > restarted + up and r[3] == "a"]
        yield load.stop()
        failed = load.failed()
        retried = [r for r in p.records if r.get("msg") == "Request" and r.get("attempts")]
        report("kill one of two", requests=len(load.results), failed=len(failed),
               unhealthy_in_list_s=round(down, 2), healthy_again_in_list_s=round(up, 2),
               unhealthy_in_server_s=round(server_down, 2),
               healthy_again_in_server_s=round(server_up, 2),
               retried=len(retried),
               ejections=sum(1 for r in p.records if r.get("msg") == "Target ejected"))
        self.assertEqual(failed, [])
        # the server's own transitions are the property; what the list
        # processes saw adds their start-up, which a loaded machine slows
        self.assertLess(server_down, 3)
        self.assertLess(server_up, 3)
        self.assertLess(down, 6)
        self.assertLess(up, 6)
        self.assertTrue(back, "the restarted target got no requests")
        self.assertGreater(len(load.results), 200)
        self.assertGreater(time.monotonic() - killed, 0)

    @inlineCallbacks
    def test_retry_timeout_bridges_a_restart(self) -> Any:
        """
        One target, C{--retry-timeout 10s}: the target is stopped and started
        again 2 s later under GET load: no request fails, and none waits
        longer than the gap plus 1 s.
        """
        p = yield self.proxy()
        a = yield self.app("a")
        yield self.deploy(p, "--target", a.address, "--retry-timeout", "10s")
        load = self.load(p)
        yield sleep(1.5)
        stopped = time.monotonic()
        yield a.kill()
        yield sleep(2)
        yield a.start()
        listening = time.monotonic()
        gap = listening - stopped
        yield sleep(2)
        yield load.stop()
        failed = load.failed()
        slowest = max(r[1] for r in load.results)
        report("retry-timeout bridges a restart", requests=len(load.results),
               failed=len(failed), gap_s=round(gap, 2), slowest_request_s=round(slowest, 2))
        self.assertEqual(failed, [])
        self.assertLess(slowest, gap + 1)
        self.assertTrue(any(r[0] > listening for r in load.results))

    @inlineCallbacks
    def test_lone_target_dies_503(self) -> Any:
        """
        One target, no retry timeout, the target dies: once that is detected
        clients get the 503 page within 1 s, C{list} shows it unhealthy and
        the log has one transition line.
        """
        p = yield self.proxy()
        a = yield self.app("a")
        yield self.deploy(p, "--target", a.address)
        load = self.load(p)
        yield sleep(1.5)
        yield a.kill()
        killed = time.monotonic()
        took, h = yield self.until_health(p, a.address, "unhealthy", 3)
        detected = killed + took
        yield sleep(3)  # health checks keep failing meanwhile
        yield load.stop()
        after = [r for r in load.results if r[0] >= detected]
        slowest = max(r[1] for r in after)
        transitions = [r for r in p.records if r.get("msg") == "Target health updated"
                       and r.get("target") == a.address and r.get("was") != "adding"]
        report("lone target dies", requests_after_detection=len(after),
               detected_in_list_s=round(took, 2), slowest_503_s=round(slowest, 3),
               transitions=len(transitions))
        self.assertTrue(after)
        self.assertEqual({r[2] for r in after}, {503})
        self.assertLess(slowest, 1)
        self.assertEqual([r["state"] for r in transitions], ["unhealthy"])
        h = yield self.health(p, a.address)
        self.assertEqual(h["health"], "unhealthy")

    @inlineCallbacks
    def test_target_closing_idle_connections(self) -> Any:
        """
        A target that closes keep-alive connections idle for 1 s, clients
        sending a request every 0.9-1.1 s, 200 requests: none fails.
        """
        p = yield self.proxy()
        a = yield self.app("a", "--idle-timeout", "1")
        yield self.deploy(p, "--target", a.address)
        load = self.load(p, pause=(0.9, 1.1), limit=10)
        yield load.join()
        failed = load.failed()
        retried = [r for r in p.records if r.get("msg") == "Request" and r.get("attempts")]
        report("target closes idle connections", requests=len(load.results),
               failed=len(failed), retried=len(retried))
        self.assertEqual(len(load.results), 200)
        self.assertEqual(failed, [])

    @inlineCallbacks
    def test_post_reset_not_retried_refused_retried(self) -> Any:
        """
        A POST that reached its target, which then reset the connection, is
        not sent again (502); a POST refused at connect is sent to the other
        target.
        """
        p = yield self.proxy()
        a = yield self.app("a")
        b = yield self.app("b")
        yield self.deploy(p, "--target", f"{a.address},{b.address}",
                          "--health-check-interval", "60s")
        yield b.kill()

        def post(path: str) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=30)
            conn.request("POST", path, body=b"hello", headers={"Host": "example.com"})
            r = conn.getresponse()
            out = r.status, r.read().decode()
            conn.close()
            return out

        pool = ThreadPool(1, 1)
        pool.start()
        self.addCleanup(pool.stop)
        answers = []
        for _ in range(2):
            answer = yield deferToThreadPool(reactor, pool, post, "/echo")
            answers.append(answer)
        self.assertEqual(answers, [(200, "a 5"), (200, "a 5")])
        retried = [r for r in p.records if r.get("msg") == "Request" and r.get("attempts")]
        self.assertEqual([(r["method"], r["status"], r["tried"]) for r in retried],
                         [("POST", 200, [b.address, a.address])])
        status, _ = yield deferToThreadPool(reactor, pool, post, "/reset")
        self.assertEqual(status, 502)
        yield sleep(0.2)
        last = [r for r in p.records if r.get("msg") == "Request"][-1]
        self.assertEqual((last["path"], last["status"], last.get("attempts")),
                         ("/reset", 502, None))
