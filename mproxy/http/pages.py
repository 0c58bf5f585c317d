# -*- test-case-name: tests.test_proxy -*-
"""
The proxy's own error pages.

    render_page(status: int, message: str = "") -> bytes

Built-in pages (404, 413, 502, 503, 504) are C{mproxy/pages/layout.html}
filled from L{PAGES}; 503 shows C{message} (HTML-escaped) when one is given, e.g. the
stop message.  Other statuses get C{<h1><code> <reason></h1>}.  Every page
is served as C{text/html; charset=utf-8} (L{CONTENT_TYPE}).

Custom pages per service (C{--error-pages DIR}) are in
L{mproxy.http.custompages}, which falls back to these.
"""

from __future__ import annotations

import html
import os
from http import HTTPStatus

CONTENT_TYPE = b"text/html; charset=utf-8"
_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pages")
_DEFAULT_503 = (
    "This site is temporarily unavailable, probably for maintenance. "
    "Please try again soon."
)


#: status → (title, accent colour, text); every built-in page is the one
#: layout (C{mproxy/pages/layout.html}) filled with these.
PAGES: dict[int, tuple[str, str, str]] = {
    404: ("Not Found", "#6e7781",
          "The page you were looking for doesn’t exist. Check the address, "
          "or go back to where you came from."),
    413: ("Content Too Large", "#9a6700",
          "The request you sent is larger than this site accepts. "
          "Try again with a smaller upload."),
    502: ("Bad Gateway", "#cf222e",
          "The server behind this site sent an invalid response or could not "
          "be reached. Please try again in a moment."),
    503: ("Service Temporarily Unavailable", "#0969da", "{{message}}"),
    504: ("Gateway Timeout", "#bc4c00",
          "The server behind this site did not respond in time. "
          "Please try again in a moment."),
}


def _load() -> dict[int, str]:
    with open(os.path.join(_DIR, "layout.html"), encoding="utf-8") as f:
        layout = f.read()
    out: dict[int, str] = {}
    for code, (title, accent, text) in PAGES.items():
        page = layout.replace("{{code}}", str(code)).replace("{{title}}", title)
        out[code] = page.replace("{{accent}}", accent).replace("{{text}}", text)
    return out


_TEMPLATES = _load()
_CACHE: dict[int, bytes] = {}


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {499: "Client Closed Request"}.get(status, "Unknown Status")


def render_page(status: int, message: str = "") -> bytes:
    """
    The body of the built-in page for C{status}.
    """
    if not message:
        page = _CACHE.get(status)
        if page is not None:
            return page
    tpl = _TEMPLATES.get(status)
    if tpl is None:
        page = f"<h1>{status} {html.escape(reason_phrase(status), quote=False)}</h1>".encode("utf-8")
    elif "{{message}}" in tpl:
        text = html.escape(message) if message else _DEFAULT_503
        page = tpl.replace("{{message}}", text).encode("utf-8")
    else:
        page = tpl.encode("utf-8")
    if not message:
        _CACHE[status] = page
    return page
