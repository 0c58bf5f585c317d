# -*- test-case-name: tests.test_proxy -*-
"""
The request path: what routing sees and what the target gets.

    set_request_path(call)   # call.path (decoded), call.raw_path
    target_uri(call) -> bytes

Routing looks at the percent-decoded path with its dot-segments resolved
(L{remove_dot_segments}), so that no spelling of C{/public/../internal}
can escape a path prefix; the target gets that same resolved path, minus
the prefix when the service strips it, and the query as sent.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from mproxy.http.call import ProxyCall

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


def set_request_path(call: ProxyCall) -> None:
    """
    C{call.path}: the decoded path routing sees; C{call.raw_path}: the
    resolved encoded path when dot-segments were removed.
    """
    raw_path = call.rq.path
    # any dot-segment starts with "/." or "/%2e", or follows a "%2f"
    if b"/." in raw_path or b"%2" in raw_path:
        resolved = remove_dot_segments(raw_path)
        if resolved is not None:
            raw_path = call.raw_path = resolved
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path, encoding="utf-8", errors="surrogateescape")
    call.path = path


def target_uri(call: ProxyCall) -> bytes:
    """
    The request target sent to the target: the (resolved) path, minus a
    stripped prefix, plus the query as sent.
    """
    rq = call.rq
    query = rq.query
    raw = call.raw_path
    if call.target_path == call.path:
        if raw is None:
            if rq.uri.startswith(b"/"):
                return rq.uri
            raw = rq.path
        return raw + (b"?" + query if query else b"")
    match_path = call.target_path
    if raw is None:
        raw = rq.path
    # raw path minus the prefix when it is spelled plainly, else re-quoted
    encoded = match_path.encode("utf-8", "surrogateescape")
    cut = len(raw) - len(encoded)
    rest = raw[cut:] if cut >= 0 and raw[cut:] == encoded else None
    if rest is None or not rest.startswith(b"/"):
        rest = quote(match_path, safe="/:@!$&'()*+,;=-._~").encode("latin-1")
    return rest + (b"?" + query if query else b"")
