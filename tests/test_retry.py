"""
Tests for L{mproxy.http.retry}: passive ejection and sending a request again,
through the proxy on a memory reactor; and the service's side of it
(L{mproxy.service.Service.retry}, waiting for a healthy target) on a fake
clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.http.retry import MAX_ATTEMPTS
from mproxy.service import NO_TARGET, Service
from mproxy.spec import ServiceOptions, TargetOptions
from mproxy.target import Claim, TargetState
from tests.test_proxy import OK, FakeTarget, Harness, header, upstream_headers


def refuse(h: Harness, index: int) -> None:
    factory = h.reactor.tcpClients[index][2]
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))


def reused_connection(h: Harness) -> tuple[Any, Any]:
    """
    One request answered on a connection, which is now idle in the pool.
    """
    h.get(b"/first")
    proto, t = h.upstream()
    proto.dataReceived(OK)
    t.clear()
    h.ct.clear()
    return proto, t


class EjectionTests(SynchronousTestCase):
    def test_refused_ejects(self) -> None:
        """
        A refused connect ejects the target (counted, logged).
        """
        h = Harness()
        h.get()
        refuse(h, 0)
        self.assertEqual(len(h.service.target.ejections), 1)
        self.assertIn("Connection was refused", h.service.target.ejections[0])
        self.assertIn(("ejected", "web", "10.0.0.2:3000"), h.metrics.events)
        self.assertIn("Target ejected", h.logger.messages())

    def test_fresh_connection_closed_ejects(self) -> None:
        """
        A new connection closed or reset before any response byte ejects the
        target.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(len(h.service.target.ejections), 1)

    def test_reused_connection_closed_not_ejected(self) -> None:
        """
        A re-used keep-alive connection closed by the target is how idle
        connections end: the target is not ejected.
        """
        h = Harness()
        proto, t = reused_connection(h)
        h.get()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(h.service.target.ejections, [])

    def test_any_response_is_not_a_failure(self) -> None:
        """
        A 500 from the target is its answer: relayed, nothing ejected or
        retried.
        """
        h = Harness()
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(h.output().startswith(b"HTTP/1.1 500 Oops\r\n"))
        self.assertEqual(h.service.target.ejections, [])
        self.assertEqual(h.service.retries, [])

    def test_target_timeout_not_ejected(self) -> None:
        """
        A target slow to answer (504) is not ejected: health checks judge.
        """
        h = Harness(target_timeout=3)
        h.get()
        h.upstream()
        h.reactor.advance(3.1)
        self.assertEqual(h.service.target.ejections, [])
        self.assertEqual(h.service.retries, [])


class ResendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.other = FakeTarget(self.h.reactor, "10.0.0.3:3000")

    def test_refused_get_sent_to_other_target(self) -> None:
        """
        A GET whose connect was refused goes to another target, on a new
        connection, naming it in X-Mproxy-Target; the log line has the
        attempts and the targets tried; the retry is counted.
        """
        h = self.h
        h.service.retry_results = [self.other]
        h.get()
        refuse(h, 0)
        self.assertEqual(h.service.retries, [("10.0.0.2:3000", ["10.0.0.2:3000"], 0.0)])
        self.assertEqual(h.service.claims[0].releases, 1)
        host, port = h.reactor.tcpClients[1][:2]
        self.assertEqual((host, port), ("10.0.0.3", 3000))
        h.connected = 1
        proto, t = h.upstream()
        self.assertEqual(header(upstream_headers(t.value()), b"X-Mproxy-Target"),
                         [b"10.0.0.3:3000"])
        proto.dataReceived(OK)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))
        log = h.requests_logged()[0]
        self.assertEqual((log["status"], log["target"], log["attempts"], log["tried"]),
                         (200, "10.0.0.3:3000", 2, ["10.0.0.2:3000", "10.0.0.3:3000"]))
        self.assertIn(("retried", "web"), h.metrics.events)
        self.assertIn("Retrying request", h.logger.messages())

    def test_unretried_log_unchanged(self) -> None:
        """
        A request sent once has no attempts/tried keys.
        """
        h = self.h
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(OK)
        self.assertNotIn("attempts", h.requests_logged()[0])

    def test_refused_post_streamed_body_sent_again(self) -> None:
        """
        A POST refused at connect is sent again, with the body it had
        queued, and the rest of the body follows to the new target.
        """
        h = self.h
        h.service.retry_results = [self.other]
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 6\r\n\r\nabc")
        refuse(h, 0)
        h.connected = 1
        proto, t = h.upstream()
        h.send(b"def")
        sent = t.value()
        self.assertTrue(sent.startswith(b"POST /x HTTP/1.1\r\n"))
        self.assertTrue(sent.endswith(b"\r\n\r\nabcdef"), sent)
        proto.dataReceived(OK)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_reset_post_not_retried(self) -> None:
        """
        A POST that reached the target, which then reset the connection, is
        not sent again: 502.
        """
        h = self.h
        h.service.retry_results = [self.other]
        proto, t = reused_connection(h)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertEqual(h.service.retries, [])

    def test_reset_post_without_body_not_retried(self) -> None:
        """
        Not idempotent and no Idempotency-Key: even without a body, a POST
        whose connection closed is not sent again.
        """
        h = self.h
        h.service.retry_results = [self.other]
        proto, t = reused_connection(h)
        h.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))

    def test_reused_closed_get_retried(self) -> None:
        """
        A GET on a re-used connection closed before any response byte is
        sent again on a new connection (never on the same one).
        """
        h = self.h
        h.service.retry_results = [h.service.target]
        proto, t = reused_connection(h)
        h.get(b"/again")
        self.assertTrue(t.value().startswith(b"GET /again "))
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(len(h.reactor.tcpClients), 2)
        proto2, t2 = h.upstream()
        self.assertTrue(t2.value().startswith(b"GET /again "))
        proto2.dataReceived(OK)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_idempotent_methods_and_key(self) -> None:
        """
        PUT, DELETE, OPTIONS, TRACE, HEAD and a POST with an Idempotency-Key
        are sent again after a closed connection; PATCH is not.
        """
        for request, again in [
            (b"PUT /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n", True),
            (b"DELETE /x HTTP/1.1\r\nHost: example.com\r\n\r\n", True),
            (b"OPTIONS /x HTTP/1.1\r\nHost: example.com\r\n\r\n", True),
            (b"TRACE /x HTTP/1.1\r\nHost: example.com\r\n\r\n", True),
            (b"HEAD /x HTTP/1.1\r\nHost: example.com\r\n\r\n", True),
            (b"POST /x HTTP/1.1\r\nHost: example.com\r\nIdempotency-Key: k1\r\n\r\n", True),
            (b"PATCH /x HTTP/1.1\r\nHost: example.com\r\n\r\n", False),
        ]:
            h = Harness()
            h.service.retry_results = [h.service.target]
            proto, t = reused_connection(h)
            h.send(request)
            proto.connectionLost(Failure(error.ConnectionDone()))
            self.assertEqual(len(h.service.retries), 1 if again else 0, request)

    def test_streamed_body_not_retried_after_close(self) -> None:
        """
        A PUT whose streamed body went to the closed connection is not sent
        again: the proxy no longer has the body.
        """
        h = self.h
        h.service.retry_results = [self.other]
        proto, t = reused_connection(h)
        h.send(b"PUT /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(h.service.retries, [])
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))

    def test_buffered_body_retried_after_close(self) -> None:
        """
        A buffered PUT body is sent again, whole, from the spool.
        """
        h = Harness(buffer_requests=True, buffer_memory=4)
        other = FakeTarget(h.reactor, "10.0.0.3:3000")
        h.service.retry_results = [other]
        proto, t = reused_connection(h)
        h.send(b"PUT /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 9\r\n\r\nabcdefghi")
        self.assertTrue(t.value().endswith(b"abcdefghi"))
        proto.connectionLost(Failure(error.ConnectionDone()))
        proto2, t2 = h.upstream()
        self.assertTrue(t2.value().endswith(b"\r\n\r\nabcdefghi"))
        proto2.dataReceived(OK)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_started_response_never_retried(self) -> None:
        """
        Once the response head arrived, a reset aborts the client: nothing
        is sent again.
        """
        h = self.h
        h.service.retry_results = [self.other]
        h.get()
        proto, t = h.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(h.service.retries, [])
        self.assertTrue(h.ct.disconnected or h.ct.disconnecting)

    def test_one_retry_without_retry_timeout(self) -> None:
        """
        With a retry timeout of 0 the request is sent again once: a second
        refused connect is the 502.
        """
        h = self.h
        third = FakeTarget(h.reactor, "10.0.0.4:3000")
        h.service.retry_results = [self.other, third]
        h.get()
        refuse(h, 0)
        refuse(h, 1)
        self.assertEqual(len(h.service.retries), 1)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        log = h.requests_logged()[0]
        self.assertEqual((log["attempts"], log["tried"]),
                         (2, ["10.0.0.2:3000", "10.0.0.3:3000"]))

    def test_no_healthy_target_left_503(self) -> None:
        """
        No other healthy target: the 503 page at once, counted.
        """
        h = self.h
        h.get()
        refuse(h, 0)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(("unavailable", "web"), h.metrics.events)

    def test_retry_timeout_waits_and_bounds_attempts(self) -> None:
        """
        With a retry timeout, the service is asked with the time left since
        the first failure, a held request goes on when the claim comes, and
        attempts stop at MAX_ATTEMPTS.
        """
        h = Harness(retry_timeout=10)
        d: Deferred[Any] = Deferred()
        h.service.retry_results = [d]
        h.get()
        h.reactor.advance(1)
        refuse(h, 0)
        self.assertEqual(h.service.retries[0][2], 10)
        other = FakeTarget(h.reactor, "10.0.0.3:3000")
        h.reactor.advance(3)
        d.callback(h.service.claims[0].__class__(other))
        self.assertEqual(h.reactor.tcpClients[1][:2], ("10.0.0.3", 3000))
        h.service.retry_results = [other] * 20
        for i in range(1, MAX_ATTEMPTS):
            refuse(h, i)
        self.assertEqual(h.service.retries[1][2], 7)
        self.assertEqual(len(h.reactor.tcpClients), MAX_ATTEMPTS)
        self.assertTrue(h.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))

    def test_client_gone_while_waiting(self) -> None:
        """
        A client that left while its request waited: the claim that comes
        later is released at once, nothing is sent.
        """
        h = Harness(retry_timeout=10)
        d: Deferred[Any] = Deferred()
        h.service.retry_results = [d]
        h.get()
        refuse(h, 0)
        h.client.connectionLost(Failure(error.ConnectionDone()))
        claim = h.service.claims[0].__class__(FakeTarget(h.reactor, "10.0.0.3:3000"))
        d.callback(claim)
        self.assertEqual(claim.releases, 1)
        self.assertEqual(len(h.reactor.tcpClients), 1)


def service(*targets: str, retry_timeout: float = 0.0) -> tuple[Service, LoadBalancer, Clock]:
    clock = Clock()
    lb = LoadBalancer(list(targets), [], clock)
    lb.mark_all_healthy()
    s = Service("web", ServiceOptions(), TargetOptions(retry_timeout=retry_timeout), lb, clock)
    return s, lb, clock


def no_cookie(name: bytes) -> None:
    return None


class ServiceRetryTests(SynchronousTestCase):
    def test_other_target_preferred(self) -> None:
        """
        C{retry} claims a healthy target not tried yet.
        """
        s, lb, clock = service("aa:1", "bb:2", "cc:3")
        first = s.select(b"GET", "/", no_cookie, False)
        assert isinstance(first, Claim)
        first.release()
        again = s.retry(first, [first.target.address], 0)
        self.assertIsInstance(again, Claim)
        self.assertNotEqual(again.target.address, first.target.address)

    def test_same_target_when_only_one(self) -> None:
        """
        The only target, still healthy (a closed idle connection), is
        claimed again.
        """
        s, lb, clock = service("aa:1")
        first = s.select(b"GET", "/", no_cookie, False)
        first.release()
        self.assertEqual(s.retry(first, ["aa:1"], 0).target.address, "aa:1")

    def test_no_healthy_target(self) -> None:
        """
        With none healthy and no time to wait: L{NO_TARGET}, marked as
        unavailable.
        """
        s, lb, clock = service("aa:1")
        first = s.select(b"GET", "/", no_cookie, False)
        first.release()
        lb.targets[0].eject("refused")
        self.assertIs(s.retry(first, ["aa:1"], 0), NO_TARGET)
        self.assertTrue(NO_TARGET.unavailable)
        self.assertIs(s.select(b"GET", "/", no_cookie, False), NO_TARGET)

    def test_wait_woken_by_health_transition(self) -> None:
        """
        With time to wait, the request is claimed the moment a target
        becomes healthy (no polling: nothing is scheduled but the deadline).
        """
        s, lb, clock = service("aa:1")
        first = s.select(b"GET", "/", no_cookie, False)
        first.release()
        lb.targets[0].eject("refused")
        d = s.retry(first, ["aa:1"], 5)
        self.assertIsInstance(d, Deferred)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(s.waiting, 1)
        clock.advance(2)
        self.assertNoResult(d)
        lb.targets[0].set_state(TargetState.HEALTHY)
        self.assertEqual(self.successResultOf(d).target.address, "aa:1")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(s.waiting, 0)

    def test_wait_expires(self) -> None:
        """
        When the wait runs out: L{NO_TARGET}.
        """
        s, lb, clock = service("aa:1")
        first = s.select(b"GET", "/", no_cookie, False)
        first.release()
        lb.targets[0].eject("refused")
        d = s.retry(first, ["aa:1"], 5)
        clock.advance(5)
        self.assertIs(self.successResultOf(d), NO_TARGET)
        self.assertEqual(s.waiting, 0)

    def test_select_waits_with_retry_timeout(self) -> None:
        """
        A request that finds no healthy target waits up to the retry
        timeout for one; without a retry timeout it is refused at once.
        """
        s, lb, clock = service("aa:1", retry_timeout=10)
        lb.targets[0].eject("refused")
        d = s.select(b"GET", "/", no_cookie, False)
        self.assertIsInstance(d, Deferred)
        clock.advance(9)
        lb.targets[0].set_state(TargetState.HEALTHY)
        self.assertIsInstance(self.successResultOf(d), Claim)
        lb.targets[0].eject("refused")
        d = s.select(b"GET", "/", no_cookie, False)
        clock.advance(10)
        self.assertIs(self.successResultOf(d), NO_TARGET)

    def test_deploy_wakes_waiting(self) -> None:
        """
        A deploy switching to healthy targets wakes waiting requests.
        """
        s, lb, clock = service("aa:1", retry_timeout=10)
        lb.targets[0].eject("refused")
        d = s.select(b"GET", "/", no_cookie, False)
        new = LoadBalancer(["nn:1"], [], clock)
        new.mark_all_healthy()
        s.active = new
        self.assertEqual(self.successResultOf(d).target.address, "nn:1")

    def test_retry_after_deploy_uses_new_balancer(self) -> None:
        """
        A request whose target was replaced by a deploy is sent to the new
        targets.
        """
        s, lb, clock = service("aa:1")
        first = s.select(b"GET", "/", no_cookie, False)
        first.release()
        new = LoadBalancer(["nn:1"], [], clock)
        new.mark_all_healthy()
        s.active = new
        self.assertEqual(s.retry(first, ["aa:1"], 0).target.address, "nn:1")
