# -*- test-case-name: tests.test_custompages -*-
"""
Custom error pages per service (C{mproxy deploy ... --error-pages DIR}).

    validate(options)                         # at deploy; may raise
    load(directory) -> PageSet                # (re)parse DIR, cache it
    render_for(service, status, message="")  # -> bytes, for the proxy

Which files count
=================
Only files named C{<status>.html} where status is a 4xx or 5xx code
(C{404.html}, C{502.html}, C{503.html} ...) are templates.  Any other
C{*.html} file (C{index.html}, C{error404.html}) is ignored -- not read, not
parsed -- so a directory shared with other assets still works.  Loading
fails with L{ErrorPagesError} C{unable to load error pages: <reason>} when
the directory is missing, is not a directory or cannot be listed, holds no
C{*.html} at all, holds C{*.html} files but none named C{<status>.html},
or when a status template cannot be read, is not UTF-8 or does not parse.

Template syntax
===============
A small, logic-less subset of Go's C{html/template} so that pages written
for kamal-proxy work unchanged.  Nothing in a template is ever evaluated as
code; the only data is the 503 stop message (C{mproxy stop --message}), empty
for every other error.

    {{ .Message }}   {{.Message}}   {{ Message }}   {{message}}
        the message, HTML-escaped (C{& < > " '}); the name is
        case-insensitive and the leading dot optional.
    {{ if .Message }} ... {{ else }} ... {{ end }}
        the first part when there is a message, else the (optional)
        second part; may nest.
    {{/* comment */}}
        dropped.
    {{- ... }} / {{ ... -}}
        Go's trim markers: also remove the whitespace before / after.

Any other action (C{{{ .Foo }}}, C{{{ range }}}, an unclosed C{{{} or
C{{{ if }}} without C{{{ end }}}) is a parse error, reported with the file
name and line at deploy time.

Caching
=======
Parsed pages are cached per directory (absolute path, as stored in the
service options).  Every deploy that names a directory re-reads it, and the
new pages then serve every service using that directory (even if that deploy
later fails, e.g. on health checks: the files on disk are what they are).
A service restored from the state file at start-up loads its directory on
its first error; if that fails the built-in pages are used until the next
deploy names the directory.

A status without a custom template falls back to the built-in page
(L{mproxy.http.pages.render_page}), and so does every error for a request
that matched no service.  Responses produced by a target are never touched:
the proxy only calls this for its own errors.
"""

from __future__ import annotations

import html
import os
import re
from typing import Any

from mproxy.errors import ErrorPagesError
from mproxy.http.pages import render_page

__all__ = ["PageSet", "Template", "load", "validate", "render_for", "clear_cache"]

_STATUS_FILE = re.compile(r"^([45][0-9][0-9])\.html$")
_MESSAGE = re.compile(r"^\.?message$", re.IGNORECASE)
_SPACE = " \t\r\n"
_PREFIX = "unable to load error pages: "


class _If:
    __slots__ = ("then", "otherwise", "has_else", "line")

    def __init__(self, line: int) -> None:
        self.then: list[_Node] = []
        self.otherwise: list[_Node] = []
        self.has_else = False
        self.line = line


class _Message:
    __slots__ = ()


_MSG = _Message()
_Node = str | _Message | _If


class TemplateError(ValueError):
    """
    A template does not parse; C{str(e)} is C{"<line>: <reason>"}.
    """


class Template:
    """
    A parsed page: literal text, message slots and if/else blocks.
    """

    def __init__(self, source: str) -> None:
        self.nodes = _parse(source)
        self._plain = self._render("").encode("utf-8")

    def _render(self, message: str) -> str:
        out: list[str] = []
        escaped = html.escape(message, quote=True)
        _emit(self.nodes, bool(message), escaped, out)
        return "".join(out)

    def render(self, message: str = "") -> bytes:
        if not message:
            return self._plain
        return self._render(message).encode("utf-8")


def _emit(nodes: list[_Node], has: bool, escaped: str, out: list[str]) -> None:
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n is _MSG:
            out.append(escaped)
        else:
            assert isinstance(n, _If)
            _emit(n.then if has else n.otherwise, has, escaped, out)


class _Parser:
    """
    One template's parse: literal text and actions into a node tree.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.root: list[_Node] = []
        self.stack: list[_If] = []

    def target(self) -> list[_Node]:
        if not self.stack:
            return self.root
        top = self.stack[-1]
        return top.otherwise if top.has_else else top.then

    def line_at(self, i: int) -> int:
        return self.text.count("\n", 0, i) + 1

    def parse(self) -> list[_Node]:
        text = self.text
        pos = 0
        trim_next = False
        n = len(text)
        while True:
            i = text.find("{{", pos)
            literal = text[pos:] if i < 0 else text[pos:i]
            if trim_next:
                literal = literal.lstrip(_SPACE)
            j = i + 2
            trim_left = i >= 0 and text.startswith("-", j) and j + 1 < n and text[j + 1] in _SPACE
            if trim_left:
                literal = literal.rstrip(_SPACE)
                j += 2
            if literal:
                self.target().append(literal)
            if i < 0:
                break
            body_start = j
            while body_start < n and text[body_start] in _SPACE:
                body_start += 1
            if text.startswith("/*", body_start):
                pos, trim_next = self.comment(body_start, self.line_at(i))
            else:
                pos, trim_next = self.action(j, self.line_at(i))
        if self.stack:
            raise TemplateError(f"{self.stack[-1].line}: {{{{if}}}} without {{{{end}}}}")
        return self.root

    def comment(self, start: int, line: int) -> tuple[int, bool]:
        """
        C{{{/* ... */}}} starting at C{start}: where the text goes on, and
        whether a C{-}}} trims what follows.
        """
        text = self.text
        n = len(text)
        k = text.find("*/", start + 2)
        if k < 0:
            raise TemplateError(f"{line}: unclosed comment")
        end = k + 2
        while end < n and text[end] in _SPACE:
            end += 1
        trim_next = end > k + 2 and text.startswith("-}}", end)
        if trim_next:
            end += 1
        if not text.startswith("}}", end):
            raise TemplateError(f"{line}: comment ends before closing delimiter")
        return end + 2, trim_next

    def action(self, j: int, line: int) -> tuple[int, bool]:
        """
        The action whose body starts at C{j}: where the text goes on, and
        whether a C{-}}} trims what follows.
        """
        text = self.text
        k = text.find("}}", j)
        if k < 0:
            raise TemplateError(f"{line}: unclosed action")
        body = text[j:k]
        trim_next = len(body) >= 2 and body[-1] == "-" and body[-2] in _SPACE
        if trim_next:
            body = body[:-2]
        words = body.split()
        stack = self.stack
        if len(words) == 1 and _MESSAGE.match(words[0]):
            self.target().append(_MSG)
        elif len(words) == 2 and words[0] == "if" and _MESSAGE.match(words[1]):
            block = _If(line)
            self.target().append(block)
            stack.append(block)
        elif words == ["else"]:
            if not stack or stack[-1].has_else:
                raise TemplateError(f"{line}: unexpected {{{{else}}}}")
            stack[-1].has_else = True
        elif words == ["end"]:
            if not stack:
                raise TemplateError(f"{line}: unexpected {{{{end}}}}")
            stack.pop()
        elif not words:
            raise TemplateError(f"{line}: missing value for command")
        else:
            shown = "{{" + body[:60] + "}}"
            raise TemplateError(
                f"{line}: unsupported action {shown} (only .Message, if/else/end "
                "on .Message and comments are allowed)"
            )
        return k + 2, trim_next


def _parse(text: str) -> list[_Node]:
    return _Parser(text).parse()


class PageSet:
    """
    The custom templates of one directory, by status.
    """

    def __init__(self, directory: str, templates: dict[int, Template]) -> None:
        self.directory = directory
        self.templates = templates

    def render(self, status: int, message: str = "") -> bytes | None:
        """
        The custom page for C{status}, or C{None} when there is none.
        """
        tpl = self.templates.get(status)
        if tpl is None:
            return None
        return tpl.render(message)


_EMPTY = PageSet("", {})
_CACHE: dict[str, PageSet] = {}


def _fail(reason: str) -> ErrorPagesError:
    return ErrorPagesError(_PREFIX + reason)


def _os_reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _read(directory: str) -> PageSet:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise _fail(f"{directory}: no such directory")
    except NotADirectoryError:
        raise _fail(f"{directory}: not a directory")
    except OSError as e:
        raise _fail(f"{directory}: {_os_reason(e)}")
    html_names = sorted(
        name for name in names
        if name.endswith(".html") and os.path.isfile(os.path.join(directory, name))
    )
    if not html_names:
        raise _fail(f"no *.html files in {directory}")
    templates: dict[int, Template] = {}
    for name in html_names:
        m = _STATUS_FILE.match(name)
        if m is None:
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise _fail(f"{path}: {_os_reason(e)}")
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"{path}: not valid UTF-8")
        try:
            templates[int(m.group(1))] = Template(source)
        except TemplateError as e:
            raise _fail(f"{path}:{e}")
    if not templates:
        raise _fail(
            f"no <status>.html templates (such as 404.html or 503.html) in {directory}"
        )
    return PageSet(directory, templates)


def load(directory: str) -> PageSet:
    """
    Read and parse C{directory} now and cache the result (replacing any
    earlier version of the same directory).

    @raise ErrorPagesError: C{unable to load error pages: <reason>}; the
        cache keeps the previous version then.
    """
    pages = _read(directory)
    _CACHE[directory] = pages
    return pages


def validate(options: Any) -> None:
    """
    For C{Controller.deploy}: load the directory the options name, if any.
    """
    directory = options.error_pages
    if directory:
        load(directory)


def _pages_for(directory: str) -> PageSet:
    pages = _CACHE.get(directory)
    if pages is None:
        try:
            pages = load(directory)
        except ErrorPagesError:
            # e.g. restored from the state file and the directory is gone:
            # built-in pages until the next deploy names it again.
            pages = _CACHE[directory] = _EMPTY
    return pages


def render_for(service: Any, status: int, message: str = "") -> bytes:
    """
    The body of the proxy's own error page C{status} for a request routed to
    C{service} (C{None} when nothing matched): the service's custom
    C{<status>.html} when it has one, the built-in page otherwise.
    """
    if service is not None:
        directory = service.options.error_pages
        if directory:
            page = _pages_for(directory).render(status, message)
            if page is not None:
                return page
    return render_page(status, message)


def clear_cache() -> None:
    """
    Forget every loaded directory (tests).
    """
    _CACHE.clear()
