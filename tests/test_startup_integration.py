"""
Integration tests of start-up: the real C{mproxy run} with workers,
restarted with a saved state while a client is already connecting.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess, listen_upstream


def request_as_soon_as_accepted(port: int, host: str, deadline: float) -> tuple[float, bytes]:
    """
    Connect to C{port} as soon as anything accepts there, send one request
    for C{host} at once, and read the whole answer; returns when it
    connected (C{time.monotonic()}) and the answer.
    """
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    connected = time.monotonic()
    with s:
        s.settimeout(max(1.0, deadline - connected))
        s.sendall(f"GET /early HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                return connected, answer
            answer += data


class RequestDuringStartupTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def check_restart(self, stop: int) -> Any:
        app, port = listen_upstream(reactor, "one")
        self.addCleanup(port.stopListening)
        p = MproxyProcess(reactor, self.mktemp(), extra_args=("--workers", "2"))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command("deploy", f"127.0.0.1:{port.getHost().port}", "--host", "app.test")
        self.assertEqual(r.status, 0, r.err)
        yield p.stop(stop)
        restarted = p.start()
        started_at: list[float] = []
        restarted.addCallback(lambda record: started_at.append(time.monotonic()))
        early = deferToThread(request_as_soon_as_accepted, p.http_port, "app.test",
                              time.monotonic() + 60)
        yield restarted
        connected, answer = yield early
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertTrue(answer.endswith(b"one"), answer[-200:])
        # it was sent while the server was starting, before its workers served
        self.assertLess(connected, started_at[0])
        self.assertTrue(any(x.get("msg") == "Restored saved state" for x in p.records))

    def test_request_during_startup_after_stop(self) -> Any:
        """
        A request sent while a stopped server starts again waits in the
        listening socket's queue and is answered by the restored service:
        not refused, not a 404.
        """
        return self.check_restart(signal.SIGTERM)

    def test_request_during_startup_after_kill_9(self) -> Any:
        """
        The same after a crash (kill -9 of the supervisor): its workers let
        go of the ports as they retire, and the new server binds them.
        """
        return self.check_restart(signal.SIGKILL)
