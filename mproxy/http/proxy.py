# -*- test-case-name: tests.test_proxy -*-
"""
The reverse-proxy resource and the HTTP site factory.

    site = build_http_factory(reactor, router, logger, *,
                              http_port=80, https_port=443, secure=False,
                              pools=None, metrics=None, challenges=None,
                              header_timeout=None, idle_timeout=None,
                              body_timeout=None)

returns a L{mproxy.http.server.ProxySite} (a L{twisted.web.server.Site})
whose root resource is a L{ProxyResource}.  C{site.shutdown(timeout)}
returns a Deferred (see L{ProxySite.shutdown}); when C{pools} (a
L{mproxy.http.upstream.PoolRegistry}) is given its idle connections are
closed first.  C{metrics}, if given, is an L{mproxy.metrics.Metrics}-like
object: C{metrics.enter(service)} / C{metrics.leave(service)} around the
time a request is inside a service, C{metrics.observe(service, method,
status, seconds)} when it completes (unrouted requests with service
C{""}); requests whose target-view path is one of the service's
C{exclude_metrics_paths} are not counted (reference 7.3).  C{challenges}
(a L{mproxy.tls.challenges.ChallengeStore}) answers ACME HTTP-01 requests
before routing.  Requests over TLS to a
service without TLS get a 503; HTTPS and canonical-host redirects
(L{mproxy.tls.redirect.redirect_location}) are answered with a 301.

For each request L{ProxyResource} routes on Host and path
(C{router.match}), asks the service for a target (C{service.select}),
forwards the request to the target's pool (C{claim.target.pool}, an
L{mproxy.http.upstream.UpstreamPool}) and streams the response back,
then writes one C{Request} log line (L{mproxy.http.reqlog}).  It works with
L{mproxy.http.server.FastRequest} (fast path, streamed request bodies,
upgrades) and with any standard L{twisted.web.server.Request} (HTTP/2).

Statuses the proxy produces itself: 301 (redirects), 400 (malformed
chunked body), 404 (no route), 408 (request body stalled for 60 s), 413
(buffered request too large), 499 (client went away; log only), 500
(buffered response too large), 502 (target unreachable or broken response;
ERROR C{Error while proxying}), 503 (refusals, TLS request to a non-TLS
service), 504 (target timeout, drain deadline, pause expiry).  A client
that leaves a response unread for C{SEND_TIMEOUT} (60 s) is dropped.
"""

from __future__ import annotations

import os
import random
import re
import time
from typing import Any, Callable
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mproxy.http import reqlog
from mproxy.http.custompages import render_for
from mproxy.http.pages import CONTENT_TYPE
from mproxy.http.generic import GenericExchange
from mproxy.http.server import FastRequest, ProxySite
from mproxy.http.spool import Spool, SpoolSender
from mproxy.tls.redirect import redirect_body, redirect_location

_HTTP01_PREFIX = b"/.well-known/acme-challenge/"

#: seconds a client may leave a response unread (its socket full) before
#: the exchange is abandoned
SEND_TIMEOUT = 60.0

# request headers that never go to the target (hop-by-hop; HTTP2-Settings
# belongs to an h2c upgrade offer, which is never passed on)
_HOP = frozenset((
    b"connection", b"proxy-connection", b"keep-alive", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"http2-settings",
))

# Headers a token in Connection can never remove: the framing and routing of
# a forwarded message are the proxy's own.  (Otherwise C{Connection:
# Content-Length} would forward a body without its length, and the target
# would read the body as a second request on a shared connection.)
_PROTECTED = frozenset((b"content-length", b"transfer-encoding", b"host"))

# special request headers: code per lower-cased name
_H_HOST, _H_XFF, _H_XFP, _H_XFH, _H_RID, _H_RSTART, _H_UA, _H_CTYPE, _H_COOKIE, \
    _H_TARGET, _H_EXPECT, _H_FORWARDED, _H_CLEN, _H_CONNECTION, _H_TE, \
    _H_TENC, _H_HOP = range(17)
_SPECIAL = {
    b"host": _H_HOST, b"x-forwarded-for": _H_XFF, b"x-forwarded-proto": _H_XFP,
    b"x-forwarded-host": _H_XFH, b"x-request-id": _H_RID, b"x-request-start": _H_RSTART,
    b"user-agent": _H_UA, b"content-type": _H_CTYPE, b"cookie": _H_COOKIE,
    b"x-mproxy-target": _H_TARGET, b"expect": _H_EXPECT, b"forwarded": _H_FORWARDED,
    b"content-length": _H_CLEN, b"connection": _H_CONNECTION, b"te": _H_TE,
    b"transfer-encoding": _H_TENC,
}
for _n in _HOP:
    _SPECIAL.setdefault(_n, _H_HOP)

# response headers dropped on the way back
_RESP_HOP = _HOP | {b"x-writer-affinity"}

_rand = random.Random(os.urandom(16)).getrandbits


def new_request_id() -> bytes:
    """
    A random (version 4) UUID, lower-case and hyphenated.
    """
    n = _rand(128) & ~(0xF000 << 64) | (0x4000 << 64)
    n = n & ~(0xC000 << 48) | (0x8000 << 48)
    h = b"%032x" % n
    return h[:8] + b"-" + h[8:12] + b"-" + h[12:16] + b"-" + h[16:20] + b"-" + h[20:]


_SEPARATOR = re.compile(rb"/|%2[fF]")
_DOT = re.compile(rb"%2[eE]")


def remove_dot_segments(raw_path: bytes) -> bytes | None:
    """
    The request path (as received, percent-encoded) with its dot-segments
    resolved, or C{None} when it has none.

    Routing looks at the decoded path, so a segment is a dot-segment when it
    decodes to C{.} or C{..} (C{%2e%2e}, C{.%2E} count).  A C{%2f} decodes
    to C{/} for the router too, so for finding and resolving dot-segments it
    separates segments like C{/}: C{/public/..%2finternal} is
    C{/internal}, and cannot reach the target as a path under C{/public}
    that a target decoding C{%2f} would resolve itself.  When nothing is
    resolved the path is left exactly as sent (an encoded slash inside a
    segment stays encoded); when something is, the result is joined with
    plain C{/}, while every other escape in the remaining segments is kept
    as it was.
    """
    segments = _SEPARATOR.split(raw_path)
    if len(segments) < 2 or segments[0]:
        return None  # not an absolute path ("*")
    out: list[bytes] = []
    found = False
    last_dot = False
    for seg in segments[1:]:
        last_dot = False
        if seg and len(seg) <= 6:
            d = _DOT.sub(b".", seg) if b"%" in seg else seg
            if d == b".":
                found = last_dot = True
                continue
            if d == b"..":
                found = last_dot = True
                if out:
                    out.pop()
                continue
        out.append(seg)
    if not found:
        return None
    if last_dot:
        out.append(b"")
    return b"/" + b"/".join(out)


def _client_host(addr: Any) -> str:
    return getattr(addr, "host", "") or ""


def _cookie_lookup(values: list[bytes]) -> Callable[[bytes], bytes | None]:
    parsed: dict[bytes, bytes] | None = None

    def cookie(name: bytes) -> bytes | None:
        nonlocal parsed
        if parsed is None:
            parsed = {}
            for v in values:
                for part in v.split(b";"):
                    k, sep, val = part.strip().partition(b"=")
                    if sep and k not in parsed:
                        parsed[k] = val.strip().strip(b'"')
        return parsed.get(name)

    return cookie


def scope_cookie(value: bytes, prefix: str, host: str) -> bytes:
    """
    Scope a Set-Cookie under a stripped path prefix (reference 5.11): when
    its Domain is absent or the request host, its Path becomes the prefix
    joined with the cookie's own path.  Unparseable values stay as they are.
    """
    parts = value.split(b";")
    first = parts[0].strip()
    if b"=" not in first or not first.split(b"=", 1)[0].strip():
        return value
    h = host
    if h.startswith("["):
        h = h[: h.find("]") + 1]
    elif ":" in h:
        h = h.split(":", 1)[0]
    path = b""
    rest: list[bytes] = []
    for attr in parts[1:]:
        attr = attr.strip()
        if not attr:
            continue
        k, _, v = attr.partition(b"=")
        lk = k.strip().lower()
        if lk == b"path":
            path = v.strip()
            continue
        if lk == b"domain":
            d = v.strip().lstrip(b".").decode("latin-1").lower()
            if d != h.lower():
                return value
        rest.append(attr)
    segments = [p for p in (prefix.encode("latin-1") + b"/" + path).split(b"/") if p]
    new_path = b"/" + b"/".join(segments)
    return b"; ".join([first, b"Path=" + new_path] + rest)


class ProxyResource(Resource):
    """
    The reverse proxy (see the module docstring).
    """

    isLeaf = True

    def __init__(self, router: Any, logger: Any, *, clock: Any, http_port: int = 80,
                 https_port: int = 443, metrics: Any = None,
                 challenges: Any = None,
                 now_ns: Callable[[], int] = time.monotonic_ns,
                 wallclock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.router = router
        self.logger = logger
        self.clock = clock
        self.http_port = http_port
        self.https_port = https_port
        self.metrics = metrics
        self.challenges = challenges
        self.now_ns = now_ns
        self.wallclock = wallclock

    def render(self, request: Any) -> Any:
        rq = request if isinstance(request, FastRequest) else GenericExchange(request)
        _ProxyCall(self, rq).start()
        return NOT_DONE_YET


class _ProxyCall:
    """
    One proxied request: the receiver of the upstream exchange.
    """

    __slots__ = (
        "res", "rq", "start_ns", "host", "path", "target_path", "request_id", "status",
        "service", "target", "claim", "up", "resp_ctype", "req_ctype", "user_agent",
        "remote_addr", "done", "tunnel", "upgrade_type", "log_extra", "trailers_ok",
        "topts", "body_started", "req_spool", "resp_spool", "resp_head", "prefix",
        "metered", "held", "stall_timer", "raw_path", "codings",
    )

    def __init__(self, res: ProxyResource, rq: Any) -> None:
        self.res = res
        self.rq = rq
        self.start_ns = res.now_ns()
        self.status = 200
        self.service: Any = None
        self.target = ""
        self.claim: Any = None
        self.up: Any = None
        self.resp_ctype = b""
        self.req_ctype = b""
        self.user_agent = b""
        self.remote_addr = b""
        self.request_id = b""
        self.host = b""
        self.path = ""
        self.target_path = ""
        self.done = False
        self.tunnel = False
        self.upgrade_type = b""
        self.log_extra: dict[str, str] | None = None
        self.trailers_ok = False
        self.topts: Any = None
        self.body_started = False
        self.req_spool: Spool | None = None
        self.resp_spool: Spool | None = None
        self.resp_head: Any = None
        self.prefix = ""
        self.metered = False
        self.held: Deferred[Any] | None = None
        self.stall_timer: Any = None
        self.raw_path: bytes | None = None
        self.codings = b""

    # --- request ----------------------------------------------------------------

    def start(self) -> None:
        rq = self.rq
        res = self.res
        out: list[tuple[bytes, bytes]] = []
        xff: list[bytes] = []
        xfp = xfh = rid = rstart = b""
        cookies: list[bytes] = []
        targets: list[bytes] = []
        conn_tokens: list[bytes] = []
        host = None
        te = b""
        codings = b""
        declared_length = False
        special = _SPECIAL
        for item in rq.raw_headers:
            name = item[0]
            lname = name.lower()
            code = special.get(lname)
            if code is None:
                if b"_" in name:
                    # X_Forwarded_For and X-Forwarded-For are one variable
                    # to CGI-style apps: never let a client spoof that way
                    res.logger.debug("Dropped request header with underscore",
                                     header=name.decode("latin-1"))
                    continue
                out.append(item)
                continue
            value = item[1]
            if code == _H_HOST:
                if host is None:
                    host = value
                out.append(item)
            elif code == _H_UA:
                self.user_agent = value
                out.append(item)
            elif code == _H_CTYPE:
                self.req_ctype = value
                out.append(item)
            elif code == _H_COOKIE:
                cookies.append(value)
                out.append(item)
            elif code == _H_RID:
                if not rid:
                    rid = value
            elif code == _H_RSTART:
                if not rstart:
                    rstart = value
            elif code == _H_XFF:
                xff.append(value)
            elif code == _H_XFP:
                if not xfp:
                    xfp = value
            elif code == _H_XFH:
                if not xfh:
                    xfh = value
            elif code == _H_TARGET:
                targets.append(value)
            elif code == _H_CLEN:
                # re-written below from the length the channel checked
                declared_length = True
            elif code == _H_CONNECTION:
                conn_tokens.append(value)
            elif code == _H_TE:
                te = value
            elif code == _H_TENC:
                # codings before the final "chunked" (e.g. gzip) stay
                i = value.rfind(b",")
                if i > 0:
                    codings = value[:i].strip()
            # expect, forwarded, upgrade and the other hop-by-hop headers are
            # dropped
        if conn_tokens:
            out = self._drop_connection_tokens(out, conn_tokens)
        self.request_id = rid or new_request_id()
        self.host = host or b""
        raw_path = rq.path
        if b"/." in raw_path or b"%2" in raw_path:
            resolved = remove_dot_segments(raw_path)
            if resolved is not None:
                raw_path = self.raw_path = resolved
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path, encoding="utf-8", errors="surrogateescape")
        self.path = path
        challenges = res.challenges
        if challenges is not None and raw_path.startswith(_HTTP01_PREFIX):
            body = challenges.http01_response(raw_path)
            if body is not None:
                self.remote_addr = b", ".join(xff)
                self._respond(200, [(b"Content-Type", b"text/plain")], body)
                return
        match = res.router.match(self.host.decode("latin-1"), path)
        if match is None:
            self.remote_addr = b", ".join(xff)
            self._page(404)
            return
        service = self.service = match.service
        opts = service.options
        topts = self.topts = service.target_options
        # the path the target sees (reference 2.3)
        if match.prefix != "/" and opts.strip_prefix:
            self.target_path = match.target_path(path)
            self.prefix = match.prefix
        else:
            self.target_path = path
        if res.metrics is not None:
            excluded = opts.exclude_metrics_paths
            if not excluded or self.target_path not in excluded:
                self.metered = True
                res.metrics.enter(service.name)
        if rq.is_tls and not opts.tls_enabled:
            self.remote_addr = b", ".join(xff)
            self._page(503)
            return
        if opts.tls_enabled or opts.canonical_host:
            location = redirect_location(
                secure=rq.is_tls, host_header=self.host.decode("latin-1"),
                uri=rq.uri.decode("latin-1"), tls_enabled=opts.tls_enabled,
                tls_redirect=opts.tls_redirect, canonical_host=opts.canonical_host,
                https_port=res.https_port, http_port=res.http_port,
            )
            if location is not None:
                self.remote_addr = b", ".join(xff)
                self._redirect(location)
                return
        if opts.client_ip_header:
            h = opts.client_ip_header.encode("latin-1").lower()
            for n, v in rq.raw_headers:
                if n.lower() == h and v:
                    xff = [v]
                    break
        self.remote_addr = b", ".join(xff)
        # forwarded headers
        client_ip = _client_host(rq.client).encode("latin-1")
        scheme = b"https" if rq.is_tls else b"http"
        if topts.forward_headers:
            out.append((b"X-Forwarded-For", b", ".join(xff) + b", " + client_ip if xff else client_ip))
            out.append((b"X-Forwarded-Proto", xfp or scheme))
            if xfh or self.host:
                out.append((b"X-Forwarded-Host", xfh or self.host))
        else:
            out.append((b"X-Forwarded-For", client_ip))
            out.append((b"X-Forwarded-Proto", scheme))
            if self.host:
                out.append((b"X-Forwarded-Host", self.host))
        out.append((b"X-Request-ID", self.request_id))
        if not (rstart and topts.forward_headers):
            rstart = b"t=%d" % int(res.wallclock() * 1000)
        out.append((b"X-Request-Start", rstart))
        if te and b"trailers" in te.lower():
            out.append((b"TE", b"trailers"))
            self.trailers_ok = True
        # only WebSocket upgrades reach here as upgrades (the channel drops
        # any other offer and serves the request as a normal one)
        websocket = rq.upgrade
        if websocket:
            self.upgrade_type = b"websocket"
            out.append((b"Connection", b"Upgrade"))
            out.append((b"Upgrade", b"websocket"))
        rq.set_lost_handler(self.client_lost)
        body_length = rq.body_length
        if body_length > 0 or (declared_length and body_length == 0):
            out.append((b"Content-Length", b"%d" % body_length))
        self.codings = codings
        try:
            result = service.select(rq.method, self.target_path, _cookie_lookup(cookies), websocket)
        except Exception:
            self._internal_error(Failure())
            return
        if isinstance(result, Deferred):
            self.held = result
            result.addCallback(self._selected, out, targets)
            result.addErrback(self._internal_error)
            return
        self._selected(result, out, targets)

    @staticmethod
    def _drop_connection_tokens(out: list[tuple[bytes, bytes]],
                                values: list[bytes]) -> list[tuple[bytes, bytes]]:
        names = set()
        for v in values:
            for tok in v.split(b","):
                tok = tok.strip().lower()
                if tok and tok not in (b"close", b"keep-alive", b"upgrade") \
                        and tok not in _PROTECTED:
                    names.add(tok)
        if not names:
            return out
        return [(n, v) for n, v in out if n.lower() not in names]

    def _selected(self, result: Any, out: list[tuple[bytes, bytes]],
                  targets: list[bytes]) -> None:
        rq = self.rq
        was_held = self.held is not None
        self.held = None
        if self.done:
            # the client left while the request was held
            if hasattr(result, "release"):
                result.release()
            return
        if not hasattr(result, "release"):
            status = result.status
            if status == 200:
                self.status = 200
                rq.start_response(200, None, [(b"Content-Length", b"0")], 0)
                rq.finish()
                self._complete()
            else:
                if was_held and status == 504:
                    self.res.logger.warn("Rejecting request due to expired pause",
                                         service=self.service.name, path=self.path)
                self._page(status, result.message)
            return
        claim = self.claim = result
        target = claim.target
        self.target = target.address
        addr = self.target.encode("latin-1")
        topts = self.topts
        if targets and topts.forward_headers:
            out.append((b"X-Mproxy-Target", b", ".join(targets) + b", " + addr))
        else:
            out.append((b"X-Mproxy-Target", addr))
        if not self.host:
            # an HTTP/1.0 request without Host: HTTP/1.1 needs one
            out.insert(0, (b"Host", addr))
        claim.set_canceller(self.drain_cancel)
        body_length = rq.body_length
        if body_length and topts.buffer_requests and not self.upgrade_type:
            self._buffer_request(out)
            return
        up = self._forward(out)
        if self.done:
            return
        if body_length:
            up.set_body_producer(rq.body_producer)
            rq.send_continue()
            rq.set_body_consumer(up.write_body, up.end_body, self.body_error)

    def _forward(self, out: list[tuple[bytes, bytes]]) -> Any:
        self.up = up = self.claim.target.pool.request(
            self.rq.method, self._target_uri(), out, self, body_length=self.rq.body_length,
            timeout=self.topts.target_timeout, codings=self.codings,
        )
        return up

    # --- request buffering (reference 5.4) --------------------------------------

    def _buffer_request(self, out: list[tuple[bytes, bytes]]) -> None:
        rq = self.rq
        topts = self.topts
        limit = topts.max_request_body
        if limit and rq.body_length > limit:
            self._page(413)
            return
        spool = self.req_spool = Spool(topts.buffer_memory, limit, self.res.logger)

        def data(chunk: bytes) -> None:
            if self.done:
                return
            try:
                ok = spool.write(chunk)
            except OSError as e:
                self.res.logger.error("Error while proxying", target=self.target,
                                      path=self.path, error=f"buffering request: {e}")
                self._page(500)
                return
            if not ok:
                self._page(413)

        def end() -> None:
            if self.done:
                return
            up = self._forward(out)
            if self.done:
                return
            sender = SpoolSender(spool, up.write_body, up.end_body)
            up.set_body_producer(sender)
            sender.start()

        rq.send_continue()
        rq.set_body_consumer(data, end, self.body_error)

    def _target_uri(self) -> bytes:
        rq = self.rq
        query = rq.query
        raw = self.raw_path
        prefix_stripped = self.target_path != self.path
        if not prefix_stripped:
            if raw is None:
                if rq.uri.startswith(b"/"):
                    return rq.uri
                raw = rq.path
            return raw + (b"?" + query if query else b"")
        match_path = self.target_path
        if raw is None:
            raw = rq.path
        # raw path minus the prefix when it is spelled plainly, else re-quoted
        cut = len(raw) - len(match_path.encode("utf-8", "surrogateescape"))
        rest = raw[cut:] if cut >= 0 and raw[cut:] == match_path.encode("utf-8", "surrogateescape") else None
        if rest is None or not rest.startswith(b"/"):
            rest = quote(match_path, safe="/:@!$&'()*+,;=-._~").encode("latin-1")
        return rest + (b"?" + query if query else b"")

    def body_error(self, status: int, message: str) -> None:
        """
        The client's request body is malformed (bad chunked framing, 400) or
        stopped arriving (408).
        """
        if self.done:
            return
        if status == 408:
            self.res.logger.info("Request body timed out", path=self.path)
        else:
            self.res.logger.info("Malformed chunked request", path=self.path, error=message)
        up = self.up
        if up is not None:
            up.cancel()
        if not self.rq.started:
            self._page(status)
        else:
            self.rq.abort()
            self._complete()

    # --- upstream receiver ------------------------------------------------------

    def upstream_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status == 100 or self.done:
            return
        self.rq.send_informational(status, [(n, v) for n, v in headers
                                            if n.lower() not in _RESP_HOP])

    def upstream_response(self, status: int, reason: bytes,
                          headers: list[tuple[bytes, bytes]]) -> None:
        if self.done:
            return
        rq = self.rq
        out: list[tuple[bytes, bytes]] = []
        length: int | None = None
        conn_tokens: list[bytes] | None = None
        affinity = b""
        up_upgrade = b""
        for item in headers:
            lname = item[0].lower()
            if lname in _RESP_HOP:
                if lname == b"connection":
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.append(item[1])
                elif lname == b"x-writer-affinity":
                    affinity = item[1]
                    if self.claim.set_cookie is None:
                        out.append(item)
                elif lname == b"upgrade":
                    up_upgrade = item[1]
                continue
            if lname == b"content-length":
                try:
                    length = int(item[1])
                except ValueError:
                    self._fail_response(502, "invalid Content-Length from target")
                    return
            elif lname == b"content-type":
                self.resp_ctype = item[1]
            out.append(item)
        if conn_tokens:
            out = self._drop_connection_tokens(out, conn_tokens)
        if self.prefix and self.topts.scope_cookie_paths:
            host = self.host.decode("latin-1")
            out = [(n, scope_cookie(v, self.prefix, host)) if n.lower() == b"set-cookie" else (n, v)
                   for n, v in out]
        set_cookie = self.claim.set_cookie
        if set_cookie is not None and affinity.strip().lower() != b"false":
            out.append((b"Set-Cookie", set_cookie))
        if self.topts.log_response_headers:
            self._log_headers("resp_", self.topts.log_response_headers, out)
        self.status = status
        if status == 101:
            if not self.upgrade_type or up_upgrade.lower() != self.upgrade_type.lower():
                self._fail_response(502, "target switched to an unexpected protocol")
                return
            out.append((b"Connection", b"Upgrade"))
            out.append((b"Upgrade", up_upgrade))
            self.tunnel = True
            self.claim.mark_upgraded()
            rq.start_response(101, reason or None, out, None)
            rq.tunnel_write(b"")
            rq.on_shutdown = self.drain_cancel  # 1001 and close, as at a drain deadline
            rq.take_over(self.up.write_raw)
            rq.registerProducer(self, True)
            self.up.set_tunnel_producer(rq.body_producer)
            return
        topts = self.topts
        if topts.buffer_responses and length is not None and not self._streaming(out):
            self.resp_head = (status, reason or None, out, length)
            self.resp_spool = Spool(topts.buffer_memory, topts.max_response_body,
                                    self.res.logger)
            return
        rq.start_response(status, reason or None, out, length)
        rq.registerProducer(self, True)

    @staticmethod
    def _streaming(headers: list[tuple[bytes, bytes]]) -> bool:
        """
        Responses that are never held back: event streams and those asking
        for no buffering (responses of unknown length are not buffered
        either).
        """
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type":
                if value.split(b";", 1)[0].strip().lower() == b"text/event-stream":
                    return True
            elif lname == b"x-accel-buffering":
                if value.strip().lower() == b"no":
                    return True
        return False

    def upstream_data(self, data: bytes) -> None:
        if self.done:
            return
        if self.tunnel:
            self.rq.tunnel_write(data)
        elif self.resp_spool is not None:
            try:
                ok = self.resp_spool.write(data)
            except OSError as e:
                self._fail_response(500, f"buffering response: {e}")
                return
            if not ok:
                self.up.cancel()
                self.res.logger.info("Response exceeded max response limit", path=self.path,
                                     target=self.target)
                self._page(500)
        else:
            self.rq.write(data)

    def upstream_done(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.done:
            return
        rq = self.rq
        if self.resp_spool is not None:
            status, reason, out, length = self.resp_head
            rq.start_response(status, reason, out, length)

            def sent() -> None:
                rq.finish()
                self._complete()

            sender = SpoolSender(self.resp_spool, rq.write, sent)
            rq.registerProducer(sender, True)
            sender.start()
            return
        if self.tunnel:
            rq.close_connection()
        else:
            rq.finish(trailers if self.trailers_ok else None)
        self._complete()

    def upstream_failed(self, error: Any) -> None:
        if self.done:
            return
        self._fail_response(error.status, error.message)

    def _fail_response(self, status: int, message: str) -> None:
        up = self.up
        if up is not None:
            up.cancel()
        self.res.logger.error("Error while proxying", target=self.target, path=self.path,
                              error=message)
        if self.rq.started:
            self.rq.abort()
            self._complete()
        else:
            self._page(status)

    # --- IPushProducer towards the client: the upstream, plus a send timeout

    def pauseProducing(self) -> None:
        up = self.up
        if up is not None:
            up.pauseProducing()
        if self.stall_timer is None and not self.done:
            self.stall_timer = self.res.clock.callLater(SEND_TIMEOUT, self._client_stalled)

    def resumeProducing(self) -> None:
        t = self.stall_timer
        if t is not None:
            self.stall_timer = None
            if t.active():
                t.cancel()
        up = self.up
        if up is not None:
            up.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _client_stalled(self) -> None:
        """
        The client has not read anything for SEND_TIMEOUT seconds.
        """
        self.stall_timer = None
        if self.done:
            return
        self.res.logger.info("Client stopped reading", path=self.path, target=self.target)
        up = self.up
        if up is not None:
            up.cancel()
        self.rq.abort()
        self._complete()

    # --- cancellation ---------------------------------------------------------

    def client_lost(self) -> None:
        """
        The client hung up: abandon the upstream request; log 499 unless a
        response was already under way.
        """
        if self.done:
            return
        up = self.up
        if up is not None:
            if self.tunnel:
                up.close()
            else:
                up.cancel()
        if not self.rq.started:
            self.status = 499
        # A request held by a paused service is not cancelled: the service's
        # Deferred still fires, and a claim it brings is released at once.
        self._complete()

    def drain_cancel(self) -> None:
        """
        A drain's deadline passed while this request was in flight.
        """
        if self.done:
            return
        up = self.up
        if up is not None:
            up.cancel()
        rq = self.rq
        if self.tunnel:
            # RFC 6455 close frame, code 1001 "going away", unmasked
            rq.tunnel_write(b"\x88\x02\x03\xe9")
            rq.close_connection()
            self._complete()
        elif not rq.started:
            self.res.logger.info("Request cancelled due to draining", path=self.path,
                                 target=self.target)
            self._page(504)
        else:
            rq.abort()
            self._complete()

    # --- responses ----------------------------------------------------------------

    def _page(self, status: int, message: str = "") -> None:
        rq = self.rq
        body = render_for(self.service, status, message)
        self.status = status
        self.resp_ctype = CONTENT_TYPE
        rq.start_response(status, None, [
            (b"Content-Type", CONTENT_TYPE),
            (b"Content-Length", b"%d" % len(body)),
        ], len(body))
        rq.write(body)
        rq.finish()
        self._complete()

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        rq = self.rq
        self.status = status
        for n, v in headers:
            if n.lower() == b"content-type":
                self.resp_ctype = v
        headers.append((b"Content-Length", b"%d" % len(body)))
        rq.start_response(status, None, headers, len(body))
        rq.write(body)
        rq.finish()
        self._complete()

    def _redirect(self, location: str) -> None:
        """
        301 to C{location}, closing the connection (reference 5.9).
        """
        rq = self.rq
        headers = [(b"Location", location.encode("latin-1", "replace"))]
        if hasattr(rq, "keep_alive"):
            rq.keep_alive = False
        else:
            headers.append((b"Connection", b"close"))
        body = b""
        if rq.method in (b"GET", b"HEAD"):
            body = redirect_body(location)
            headers.append((b"Content-Type", CONTENT_TYPE))
        self._respond(301, headers, body)

    def _internal_error(self, failure: Failure) -> None:
        if self.done:
            return
        self.res.logger.error("Error while proxying", target=self.target, path=self.path,
                              error=failure.getErrorMessage())
        if self.rq.started:
            self.rq.abort()
            self._complete()
        else:
            self._page(500)

    def _log_headers(self, prefix: str, names: Any, headers: list[tuple[bytes, bytes]]) -> None:
        extra = self.log_extra
        if extra is None:
            extra = self.log_extra = {}
        for name in names:
            lname = name.lower().encode("latin-1")
            values = [v.decode("latin-1") for n, v in headers if n.lower() == lname]
            extra[prefix + name.lower().replace("-", "_")] = ",".join(values)

    def _complete(self) -> None:
        if self.done:
            return
        self.done = True
        t = self.stall_timer
        if t is not None:
            self.stall_timer = None
            if t.active():
                t.cancel()
        if self.req_spool is not None:
            self.req_spool.close()
        if self.resp_spool is not None:
            self.resp_spool.close()
        claim = self.claim
        if claim is not None:
            claim.set_canceller(None)
            claim.release()
            if self.topts.log_request_headers:
                self._log_headers("req_", self.topts.log_request_headers, self.rq.raw_headers)
        res = self.res
        duration = res.now_ns() - self.start_ns
        reqlog.log_request(res.logger, self, duration)
        metrics = res.metrics
        if metrics is not None:
            service = self.service
            if service is None:
                metrics.observe("", self.rq.method.decode("latin-1"), self.status, duration / 1e9)
            elif self.metered:
                metrics.leave(service.name)
                metrics.observe(service.name, self.rq.method.decode("latin-1"), self.status,
                                duration / 1e9)


def build_http_factory(reactor: Any, router: Any, logger: Any, *, http_port: int = 80,
                       https_port: int = 443, secure: bool = False, pools: Any = None,
                       metrics: Any = None,
                       header_timeout: float | None = None,
                       idle_timeout: float | None = None,
                       challenges: Any = None,
                       body_timeout: float | None = None) -> ProxySite:
    """
    The site for an HTTP (C{secure=False}) or HTTPS (C{secure=True}: wrap
    it in TLS; ALPN C{h2} gets Twisted's HTTP/2 stack) listener.
    """
    from mproxy.http import server as _srv

    resource = ProxyResource(router, logger, clock=reactor, http_port=http_port,
                             https_port=https_port, metrics=metrics, challenges=challenges)
    site = ProxySite(
        resource, reactor, secure=secure,
        header_timeout=_srv.HEADER_TIMEOUT if header_timeout is None else header_timeout,
        idle_timeout=_srv.IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
        body_timeout=_srv.BODY_TIMEOUT if body_timeout is None else body_timeout,
    )
    if pools is not None:
        site.on_shutdown.append(pools.close_idle)

    def failed(request: Any, failure: Failure) -> None:
        logger.error("Error while proxying", error=failure.getErrorMessage(),
                     path=getattr(request, "uri", b"").decode("latin-1"))

    site.on_render_failed = failed
    return site
