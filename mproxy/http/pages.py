# -*- test-case-name: tests.test_proxy -*-
"""
The proxy's own error pages.

    render_page(status: int, message: str = "") -> bytes

Built-in templates live in C{mproxy/pages/<status>.html} (404, 413, 502,
503, 504); 503 shows C{message} (HTML-escaped) when one is given, e.g. the
stop message.  Other statuses get C{<h1><code> <reason></h1>}.  Every page
is served as C{text/html; charset=utf-8} (L{CONTENT_TYPE}).

Custom pages (a service's C{--error-pages DIR}, reference 5.10):

    load_error_pages(directory) -> dict[int, str]
        # reads every <status>.html; raises ErrorPagesError("unable to load
        # error pages") when there is none or one cannot be read; the
        # result is cached for render_page
    render_page(status, message, directory=directory)

In a custom page C{{{ .Message }}} (Go template spelling, as kamal-proxy
pages use) or C{{{message}}} is replaced by the escaped message.  A status
without a custom page falls back to the built-in one.
"""

from __future__ import annotations

import html
import os
import re
from http import HTTPStatus

from mproxy.errors import ErrorPagesError

CONTENT_TYPE = b"text/html; charset=utf-8"
_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pages")
_DEFAULT_503 = (
    "This site is temporarily unavailable, probably for maintenance. "
    "Please try again soon."
)


def _load() -> dict[int, str]:
    out: dict[int, str] = {}
    for code in (404, 413, 502, 503, 504):
        try:
            with open(os.path.join(_DIR, f"{code}.html"), encoding="utf-8") as f:
                out[code] = f.read()
        except OSError:
            pass
    return out


_TEMPLATES = _load()
_CACHE: dict[int, bytes] = {}


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {499: "Client Closed Request"}.get(status, "Unknown Status")


_MESSAGE = re.compile(r"\{\{\s*(?:\.Message|message)\s*\}\}")
_custom: dict[str, dict[int, str]] = {}


def load_error_pages(directory: str) -> dict[int, str]:
    """
    (Re)load the custom pages of C{directory}.

    @raise ErrorPagesError: no C{<status>.html} file, or one unreadable.
    """
    pages: dict[int, str] = {}
    try:
        names = os.listdir(directory)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext != ".html" or not stem.isdigit():
                continue
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                pages[int(stem)] = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ErrorPagesError(f"unable to load error pages: {e}") from e
    if not pages:
        raise ErrorPagesError("unable to load error pages")
    _custom[directory] = pages
    return pages


def _custom_page(directory: str, status: int, message: str) -> bytes | None:
    pages = _custom.get(directory)
    if pages is None:
        try:
            pages = load_error_pages(directory)
        except ErrorPagesError:
            pages = _custom[directory] = {}
    tpl = pages.get(status)
    if tpl is None:
        return None
    text = html.escape(message)
    return _MESSAGE.sub(lambda _: text, tpl).encode("utf-8")


def render_page(status: int, message: str = "", directory: str = "") -> bytes:
    """
    The body of the page for C{status}: the custom page from C{directory}
    if there is one, else the built-in page.
    """
    if directory:
        page = _custom_page(directory, status, message)
        if page is not None:
            return page
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
