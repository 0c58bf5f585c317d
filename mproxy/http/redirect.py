# -*- test-case-name: tests.test_redirect -*-
"""
HTTP → HTTPS and canonical-host redirects as a pure function.

The proxy resource calls::

    location = redirect_location(
        secure=request.isSecure(),
        host_header=request.getHeader("host") or "",
        uri=request.uri.decode("latin-1"),
        tls_enabled=options.tls_enabled,
        tls_redirect=options.tls_redirect,
        canonical_host=options.canonical_host,
        https_port=config.https_port,
        http_port=config.http_port,
    )
    if location is not None:
        request.setResponseCode(301)
        request.setHeader("location", location)
        request.setHeader("connection", "close")
        body = redirect_body(location) if request.method in (b"GET", b"HEAD") else b""

Rules (a non-default port is kept in the Location):
  - ACME HTTP-01 challenge paths (C{/.well-known/acme-challenge/...}) and
    internal requests are never redirected.
  - desired scheme is C{https} when the service has TLS on, TLS redirect on and
    the request came over plain HTTP; otherwise the current scheme.
  - desired host is the canonical host when set and different from the
    request's host (compared case-insensitively, port ignored).
  - the port of the desired scheme's listener is added when it is not the
    default (443 / 80).
"""

from __future__ import annotations

from html import escape

ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

__all__ = ["redirect_location", "redirect_body", "split_host_port", "ACME_CHALLENGE_PREFIX"]


def split_host_port(host_header: str) -> tuple[str, str]:
    """
    Split a Host header into host and port text (C{""} when absent).
    Handles bracketed IPv6 literals (C{[::1]:8443}).
    """
    h = host_header.strip()
    if h.startswith("["):
        end = h.find("]")
        if end != -1:
            rest = h[end + 1 :]
            return h[: end + 1], rest[1:] if rest.startswith(":") else ""
        return h, ""
    host, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, port
    return h, ""


def redirect_location(
    *,
    secure: bool,
    host_header: str,
    uri: str,
    tls_enabled: bool,
    tls_redirect: bool = True,
    canonical_host: str = "",
    https_port: int = 443,
    http_port: int = 80,
    internal: bool = False,
) -> str | None:
    """
    Decide whether a request must be redirected.

    @param secure: the request arrived over TLS.
    @param host_header: the request's Host header (may carry a port).
    @param uri: the request target as received: path plus query.
    @param tls_enabled: the service's TLS flag.
    @param tls_redirect: the service's C{--tls-redirect} flag.
    @param canonical_host: the service's C{--canonical-host} or C{""}.
    @param https_port: the port the HTTPS listener is reachable on.
    @param http_port: the port the plain HTTP listener is reachable on.
    @param internal: an internal request (on-demand TLS probe): never redirected.
    @return: the absolute C{Location} for a 301, or L{None} for no redirect.
    """
    if internal:
        return None
    if not uri.startswith("/"):
        # absolute-form request target or C{*}: keep only the path part
        if "://" in uri:
            after = uri.split("://", 1)[1]
            slash = after.find("/")
            uri = after[slash:] if slash != -1 else "/"
        else:
            uri = "/" + uri if uri != "*" else "/"
    if uri.startswith(ACME_CHALLENGE_PREFIX):
        return None
    current = "https" if secure else "http"
    desired = "https" if (tls_enabled and tls_redirect and not secure) else current
    host, _ = split_host_port(host_header)
    desired_host = host
    if canonical_host and canonical_host.lower() != host.lower():
        desired_host = canonical_host.lower()
    if desired == current and desired_host == host:
        return None
    if not desired_host:
        return None
    port = https_port if desired == "https" else http_port
    default = 443 if desired == "https" else 80
    port_text = f":{port}" if port and port != default else ""
    return f"{desired}://{desired_host}{port_text}{uri}"


def redirect_body(location: str) -> bytes:
    """
    The small HTML body sent with a 301 for GET/HEAD
    (C{Content-Type: text/html; charset=utf-8}).
    """
    href = escape(location, quote=True)
    return f'<a href="{href}">Moved Permanently</a>.\n'.encode()
