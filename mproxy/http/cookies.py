# -*- test-case-name: tests.test_proxy -*-
"""
Cookies as the proxy sees them.

    cookie_lookup(cookie_header_values)(name) -> bytes | None   # lazy parse
    scope_cookie(set_cookie_value, prefix, host) -> bytes

The service reads request cookies (the rollout and writer-affinity
cookies) through L{cookie_lookup}, which parses the C{Cookie} headers only
when first asked.  L{scope_cookie} keeps a target's cookies under the path
prefix that was stripped before the target saw the request.
"""

from __future__ import annotations

from typing import Callable


def _no_cookies(name: bytes) -> bytes | None:
    return None


def cookie_lookup(values: list[bytes]) -> Callable[[bytes], bytes | None]:
    if not values:
        # most requests: no Cookie header, no closure to build
        return _no_cookies
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
    Scope a Set-Cookie under a stripped path prefix: when its Domain is
    absent or the request host, its Path becomes the prefix joined with the
    cookie's own path.  Unparseable values stay as they are.
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
