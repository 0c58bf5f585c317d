"""
End-to-end hardening tests: the real C{mproxy run} in a child process, a raw
HTTP/1.1 upstream and raw clients on 127.0.0.1, probing what an attacker
sends (request smuggling through C{Connection}, h2c upgrades, underscore
headers, dot-segments) and what a broken target answers.
"""

from __future__ import annotations

import signal
from typing import Any

import httptools
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from mproxy.testing import MproxyProcess


class RawUpstream(Factory):
    """
    A keep-alive HTTP/1.1 target that records every request but health
    checks as C{(method, url, headers, body)} and answers C{<method> <url>}.
    It would accept an h2c upgrade (a 101, then silence) if one reached it;
    C{/badstatus} answers with status 700.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        #: for each recorded request, the number of the connection it came on
        self.connection_of: list[int] = []
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        return _UpstreamConnection(self)


class _UpstreamConnection(Protocol):
    def __init__(self, factory: RawUpstream) -> None:
        self.factory = factory
        self.parser = httptools.HttpRequestParser(self)
        self.upgraded = False

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.number = self.factory.connections

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if self.url == b"/up":
            self.answer(b"up")
            return
        self.factory.requests.append((method, self.url, self.headers, self.body))
        self.factory.connection_of.append(self.number)
        if any(n.lower() == b"upgrade" for n, v in self.headers):
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: h2c\r\n\r\n")
            return
        if self.url == b"/badstatus":
            self.transport.write(b"HTTP/1.1 700 Odd\r\nContent-Length: 0\r\n\r\n")
            return
        self.answer(method + b" " + self.url)

    def answer(self, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class RawClient(Protocol):
    """
    Sends raw bytes and collects responses (one L{Deferred} per expected
    response, firing with C{(status, headers, body)}).
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.waiting: list[Deferred[tuple[int, dict[bytes, bytes], bytes]]] = []
        self.responses: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.closed: Deferred[None] = Deferred()

    def send(self, data: bytes) -> Deferred[tuple[int, dict[bytes, bytes], bytes]]:
        d: Deferred[tuple[int, dict[bytes, bytes], bytes]] = Deferred()
        self.waiting.append(d)
        self.transport.write(data)
        return d

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        r = (self.parser.get_status_code(), self.headers, self.body)
        self.responses.append(r)
        if self.waiting:
            self.waiting.pop(0).callback(r)

    def connectionLost(self, reason: Any) -> None:
        for d in self.waiting:
            d.errback(reason)
        self.waiting = []
        self.closed.callback(None)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


class HardeningTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def serving(self, *deploy_args: str) -> Any:
        self.target = RawUpstream()
        port = reactor.listenTCP(0, self.target, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # one worker: the clients' requests then share one upstream pool, the
        # case a smuggled request would poison (workers each have their own)
        p = MproxyProcess(reactor, self.mktemp(), extra_args=("--workers", "1"))
        yield p.start()
        self.addCleanup(p.stop, signal.SIGKILL)
        r = yield p.command("deploy", f"127.0.0.1:{port.getHost().port}", *deploy_args)
        self.assertEqual(r.status, 0, r.err)
        self.proxy = p

    @inlineCallbacks
    def client(self) -> Any:
        c = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.http_port),
                                  RawClient())
        self.addCleanup(c.transport.loseConnection)
        return c

    @inlineCallbacks
    def test_connection_content_length_smuggling(self) -> None:
        """
        An attacker's C{Connection: Content-Length} (and C{Host}) request
        whose body spells a second request: the target, on a keep-alive
        connection shared with another client, sees the body as a body and
        no second request, and the other client gets its own response.
        """
        yield self.serving()
        attacker = yield self.client()
        victim = yield self.client()
        smuggled = (b"GET /smuggled HTTP/1.1\r\nHost: other.example\r\n"
                    b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
        for i in range(5):
            status, _, body = yield attacker.send(
                b"POST /attack HTTP/1.1\r\nHost: app.example\r\n"
                b"Connection: Content-Length, Host\r\nContent-Length: %d\r\n\r\n%s"
                % (len(smuggled), smuggled))
            self.assertEqual((status, body), (200, b"POST /attack"))
            status, _, body = yield victim.send(
                b"GET /victim/%d HTTP/1.1\r\nHost: app.example\r\n\r\n" % i)
            self.assertEqual((status, body), (200, b"GET /victim/%d" % i))
        urls = [url for method, url, headers, body in self.target.requests]
        self.assertEqual(urls, [u for i in range(5) for u in (b"/attack", b"/victim/%d" % i)])
        for method, url, headers, body in self.target.requests:
            self.assertEqual(header(headers, b"host"), [b"app.example"])
            if url == b"/attack":
                self.assertEqual(body, smuggled)
                self.assertEqual(header(headers, b"content-length"), [b"%d" % len(smuggled)])
        # one pooled connection carried every request
        self.assertEqual(len(set(self.target.connection_of)), 1)

    @inlineCallbacks
    def test_h2c_offer_never_reaches_target(self) -> None:
        """
        With a target that would accept h2c, a client's C{Upgrade: h2c}
        (with or without a body, as C{curl --http2} sends it) is proxied as a
        normal request: the target never sees Upgrade or HTTP2-Settings, the
        client gets the target's answer, and its next request on the same
        connection is routed by the proxy (C{/internal} is outside the
        service's prefix: 404).
        """
        yield self.serving("--path-prefix", "/public", "--strip-path-prefix=false")
        c = yield self.client()
        h2c = (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
        status, _, body = yield c.send(b"GET /public HTTP/1.1\r\nHost: x\r\n" + h2c + b"\r\n")
        self.assertEqual((status, body), (200, b"GET /public"))
        status, _, body = yield c.send(b"POST /public/form HTTP/1.1\r\nHost: x\r\n" + h2c
                                       + b"Content-Length: 7\r\n\r\na=1&b=2")
        self.assertEqual((status, body), (200, b"POST /public/form"))
        status, _, _ = yield c.send(b"GET /internal HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 404)
        self.assertEqual([(m, u, b) for m, u, h, b in self.target.requests],
                         [(b"GET", b"/public", b""), (b"POST", b"/public/form", b"a=1&b=2")])
        for method, url, headers, body in self.target.requests:
            names = {n.lower() for n, v in headers}
            self.assertFalse(names & {b"upgrade", b"http2-settings", b"connection"}, names)

    @inlineCallbacks
    def test_underscore_headers_dropped(self) -> None:
        """
        Header names with underscores never reach the target.
        """
        yield self.serving("--forward-headers=false")
        c = yield self.client()
        status, _, _ = yield c.send(
            b"GET /x HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Proto: https\r\n"
            b"X-Request-Start: t=1\r\nX-Kept: yes\r\n\r\n")
        self.assertEqual(status, 200)
        headers = self.target.requests[0][2]
        self.assertEqual([n for n, v in headers if b"_" in n], [])
        self.assertEqual(header(headers, b"x-kept"), [b"yes"])
        self.assertEqual(header(headers, b"x-forwarded-for"), [b"127.0.0.1"])
        # and with forward headers off, the client's X-Request-Start is replaced
        start = header(headers, b"x-request-start")
        self.assertEqual(len(start), 1)
        self.assertRegex(start[0].decode(), r"^t=\d{13}$")

    @inlineCallbacks
    def test_dot_segments_cannot_escape_prefix(self) -> None:
        """
        C{/public/../internal} in plain and percent-encoded spellings is
        C{/internal}: the proxy's 404, never the target; a path that stays
        under the prefix reaches the target resolved.
        """
        yield self.serving("--path-prefix", "/public", "--strip-path-prefix=false")
        c = yield self.client()
        for path in (b"/public/../internal", b"/public/%2e%2e/internal",
                     b"/public/%2E%2e/internal", b"/public/..%2finternal",
                     b"/public%2F..%2Finternal"):
            status, _, _ = yield c.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status, 404, path)
        status, _, body = yield c.send(b"GET /public/a/./b/../c?q=/.. HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((status, body), (200, b"GET /public/a/c?q=/.."))
        self.assertEqual([u for m, u, h, b in self.target.requests], [b"/public/a/c?q=/.."])

    @inlineCallbacks
    def test_bad_status_and_transfer_codings(self) -> None:
        """
        A target's status 700 becomes a 502; a C{Transfer-Encoding: gzip,
        chunked} body reaches the target with its gzip coding.
        """
        yield self.serving()
        c = yield self.client()
        status, _, _ = yield c.send(b"GET /badstatus HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 502)
        c = yield self.client()
        status, _, body = yield c.send(
            b"POST /gz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n")
        self.assertEqual((status, body), (200, b"POST /gz"))
        method, url, headers, body = self.target.requests[-1]
        self.assertEqual(header(headers, b"transfer-encoding"), [b"gzip, chunked"])
        self.assertEqual(body, b"\x1f\x8b\x08\x00")
