# -*- test-case-name: tests.test_proxy -*-
"""
Which headers go to the target and which come back: the forwarding rules.

Request (L{read_request_headers}, then L{add_forwarding_headers} once the
service is known, then L{add_target_headers} once the target is):
  - hop-by-hop headers, C{Forwarded}, C{Expect}, C{Upgrade},
    C{HTTP2-Settings} and every header named in C{Connection} are dropped,
    but a C{Connection} token never removes C{Content-Length},
    C{Transfer-Encoding} or C{Host}: the framing and routing of a forwarded
    message are the proxy's own (C{Content-Length} is re-written from the
    length the channel checked; C{Transfer-Encoding} by the upstream client,
    keeping codings such as gzip before C{chunked});
  - header names with an underscore are dropped (CGI-style apps read
    C{X_Forwarded_For} as C{X-Forwarded-For}), logged at debug level;
  - C{X-Forwarded-For/-Proto/-Host}: the client's kept and extended when
    the service forwards headers, else replaced; C{X-Request-ID} kept or
    made (L{new_request_id}); C{X-Request-Start} kept when forwarding
    headers, else the proxy's own (C{t=<unix ms>}); C{X-Mproxy-Target}
    names the target (appended to the client's when forwarding headers);
    C{TE: trailers} kept; a WebSocket handshake's C{Connection: Upgrade},
    C{Upgrade: websocket} re-added.

Response (L{response_headers}): hop-by-hop headers and those named in
C{Connection} (but never C{Content-Length}) are dropped, C{X-Writer-Affinity}
is consumed when the service sets a writer cookie, cookies under a stripped
prefix are scoped to it (L{mproxy.http.cookies.scope_cookie}).
"""

from __future__ import annotations

import os
import random
from typing import Any

from mproxy.http.call import ProxyCall
from mproxy.http.cookies import scope_cookie

# request headers that never go to the target (hop-by-hop; HTTP2-Settings
# belongs to an h2c upgrade offer, which is never passed on)
HOP = frozenset((
    b"connection", b"proxy-connection", b"keep-alive", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"http2-settings",
))

# response headers dropped on the way back
RESP_HOP = HOP | {b"x-writer-affinity"}

# Headers a token in Connection can never remove.  (Otherwise C{Connection:
# Content-Length} would forward a body without its length, and the target
# would read the body as a second request on a shared connection.)
_PROTECTED = frozenset((b"content-length", b"transfer-encoding", b"host"))
# Connection values (lower-cased) that name no header to drop
_NAMES_NOTHING = frozenset((b"keep-alive", b"close", b"upgrade"))

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
for _n in HOP:
    _SPECIAL.setdefault(_n, _H_HOP)

_rand = random.Random(os.urandom(16)).getrandbits
# a UUID's version (4) and variant (10) bits: cleared, then set
_UUID_KEEP = ((1 << 128) - 1) & ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> bytes:
    """
    A random (version 4) UUID, lower-case and hyphenated.
    """
    h = b"%032x" % (_rand(128) & _UUID_KEEP | _UUID_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


class RequestHeaders:
    """
    What one pass over a request's headers found.

    @ivar out: the headers to forward so far (in the client's order).
    @ivar codings: transfer codings before the final C{chunked} (C{b"gzip"}).
    @ivar declared_length: the client sent a Content-Length.
    """

    __slots__ = ("out", "host", "xff", "xfp", "xfh", "rid", "rstart", "cookies", "targets",
                 "te", "codings", "declared_length", "user_agent", "ctype")

    def __init__(self) -> None:
        self.out: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.xff: list[bytes] = []
        self.xfp = self.xfh = self.rid = self.rstart = b""
        self.cookies: list[bytes] = []
        self.targets: list[bytes] = []
        self.te = self.codings = self.user_agent = self.ctype = b""
        self.declared_length = False


def read_request_headers(raw_headers: list[tuple[bytes, bytes]], logger: Any) -> RequestHeaders:
    """
    Sort a request's headers: forwarded as they are, read, or re-written.
    """
    h = RequestHeaders()
    out = h.out
    conn_tokens: list[bytes] = []
    special = _SPECIAL
    for item in raw_headers:
        name = item[0]
        code = special.get(name.lower())
        if code is None:
            if b"_" in name:
                # X_Forwarded_For and X-Forwarded-For are one variable
                # to CGI-style apps: never let a client spoof that way
                logger.debug("Dropped request header with underscore",
                             header=name.decode("latin-1"))
                continue
            out.append(item)
            continue
        value = item[1]
        if code == _H_HOST:
            if h.host is None:
                h.host = value
            out.append(item)
        elif code == _H_UA:
            h.user_agent = value
            out.append(item)
        elif code == _H_CTYPE:
            h.ctype = value
            out.append(item)
        elif code == _H_COOKIE:
            h.cookies.append(value)
            out.append(item)
        elif code == _H_RID:
            h.rid = h.rid or value
        elif code == _H_RSTART:
            h.rstart = h.rstart or value
        elif code == _H_XFF:
            h.xff.append(value)
        elif code == _H_XFP:
            h.xfp = h.xfp or value
        elif code == _H_XFH:
            h.xfh = h.xfh or value
        elif code == _H_TARGET:
            h.targets.append(value)
        elif code == _H_CLEN:
            # re-written from the length the channel checked
            h.declared_length = True
        elif code == _H_CONNECTION:
            if value.lower() not in _NAMES_NOTHING:
                conn_tokens.append(value)
        elif code == _H_TE:
            h.te = value
        elif code == _H_TENC:
            # codings before the final "chunked" (e.g. gzip) stay
            i = value.rfind(b",")
            if i > 0:
                h.codings = value[:i].strip()
        # expect, forwarded, upgrade and the other hop-by-hop headers are
        # dropped
    if conn_tokens:
        h.out = drop_connection_tokens(out, conn_tokens)
    return h


def drop_connection_tokens(out: list[tuple[bytes, bytes]],
                           values: list[bytes]) -> list[tuple[bytes, bytes]]:
    """
    C{out} without the headers named in the C{Connection} values (never the
    framing or routing headers).
    """
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


def add_forwarding_headers(call: ProxyCall, h: RequestHeaders, client_ip: bytes,
                           now_ms: int) -> None:
    """
    The headers the proxy adds for a routed request (see the module
    docstring); also sets C{call.remote_addr} and C{call.trailers_ok}.
    """
    rq = call.rq
    topts = call.topts
    out = h.out
    xff = h.xff
    header = call.service.options.client_ip_header  # type: ignore[union-attr]
    if header:
        lname = header.encode("latin-1").lower()
        for n, v in rq.raw_headers:
            if n.lower() == lname and v:
                xff = [v]
                break
        call.remote_addr = b", ".join(xff)
    scheme = b"https" if rq.is_tls else b"http"
    host = call.host
    if topts.forward_headers:
        out.append((b"X-Forwarded-For", b", ".join(xff) + b", " + client_ip if xff else client_ip))
        out.append((b"X-Forwarded-Proto", h.xfp or scheme))
        if h.xfh or host:
            out.append((b"X-Forwarded-Host", h.xfh or host))
        rstart = h.rstart
    else:
        out.append((b"X-Forwarded-For", client_ip))
        out.append((b"X-Forwarded-Proto", scheme))
        if host:
            out.append((b"X-Forwarded-Host", host))
        rstart = b""
    out.append((b"X-Request-ID", call.request_id))
    out.append((b"X-Request-Start", rstart or b"t=%d" % now_ms))
    te = h.te
    if te and b"trailers" in te.lower():
        out.append((b"TE", b"trailers"))
        call.trailers_ok = True
    # only WebSocket handshakes reach here as upgrades (the channel drops
    # any other offer and serves the request as a normal one)
    if rq.upgrade:
        call.upgrade_type = b"websocket"
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    body_length = rq.body_length
    if body_length > 0 or (h.declared_length and body_length == 0):
        out.append((b"Content-Length", b"%d" % body_length))


def add_target_headers(call: ProxyCall, h: RequestHeaders) -> None:
    """
    Once the target is chosen: C{X-Mproxy-Target}, and a Host for a request
    that had none (HTTP/1.0).
    """
    addr = call.target.encode("latin-1")
    out = h.out
    if h.targets and call.topts.forward_headers:
        out.append((b"X-Mproxy-Target", b", ".join(h.targets) + b", " + addr))
    else:
        out.append((b"X-Mproxy-Target", addr))
    if not call.host:
        # an HTTP/1.0 request without Host: HTTP/1.1 needs one
        out.insert(0, (b"Host", addr))


def remove_target_headers(call: ProxyCall, h: RequestHeaders) -> None:
    """
    Undo L{add_target_headers} (the request goes to another target).
    """
    out = h.out
    if out and out[-1][0] == b"X-Mproxy-Target":
        out.pop()
    if not call.host and out and out[0][0] == b"Host":
        out.pop(0)


class ResponseHeaders:
    """
    A target's response head as it goes to the client.

    @ivar out: the headers to send.
    @ivar length: the Content-Length, C{None} when not given.
    @ivar upgrade: the target's C{Upgrade} value (for a 101).
    @ivar bad_length: the target's Content-Length is not a number.
    """

    __slots__ = ("out", "length", "upgrade", "bad_length")

    def __init__(self) -> None:
        self.out: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.upgrade = b""
        self.bad_length = False


def response_headers(call: ProxyCall, headers: list[tuple[bytes, bytes]]) -> ResponseHeaders:
    """
    The target's headers as the client gets them (see the module
    docstring); sets C{call.resp_ctype}.
    """
    r = ResponseHeaders()
    out = r.out
    claim: Any = call.claim
    conn_tokens: list[bytes] | None = None
    affinity = b""
    for item in headers:
        lname = item[0].lower()
        if lname in RESP_HOP:
            if lname == b"connection":
                # (most targets send just keep-alive or close: no header
                # to drop, nothing to look for)
                if item[1].lower() not in _NAMES_NOTHING:
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.append(item[1])
            elif lname == b"x-writer-affinity":
                affinity = item[1]
                if claim.set_cookie is None:
                    out.append(item)
            elif lname == b"upgrade":
                r.upgrade = item[1]
            continue
        if lname == b"content-length":
            try:
                r.length = int(item[1])
            except ValueError:
                r.bad_length = True
                return r
        elif lname == b"content-type":
            call.resp_ctype = item[1]
        out.append(item)
    if conn_tokens:
        out = r.out = drop_connection_tokens(out, conn_tokens)
    if call.prefix and call.topts.scope_cookie_paths:
        host = call.host.decode("latin-1")
        out = r.out = [(n, scope_cookie(v, call.prefix, host)) if n.lower() == b"set-cookie"
                       else (n, v) for n, v in out]
    set_cookie = claim.set_cookie
    if set_cookie is not None and affinity.strip().lower() != b"false":
        out.append((b"Set-Cookie", set_cookie))
    return r


def informational_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    A 1xx head's headers as relayed.
    """
    return [(n, v) for n, v in headers if n.lower() not in RESP_HOP]
