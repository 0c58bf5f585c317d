# -*- test-case-name: tests.test_http_server -*-
"""
L{TwistedRequestFace}: the L{twisted.web.server.Request} attributes of a
L{mproxy.http.request.FastRequest}, built only when somebody asks.

The proxy never touches them (it reads C{raw_headers} and writes through the
exchange API); ordinary Twisted resources served by a
L{mproxy.http.server.FastHTTPChannel} do, and get what they expect:
C{requestHeaders}, C{responseHeaders}, C{cookies}, C{received_cookies},
C{args}, C{postpath}, C{content} (the body collected in memory when no
consumer was set), C{notifyFinish()}, C{getHeader()}, and a response head
made from C{responseHeaders} when they write without C{start_response}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.python.failure import Failure
from twisted.web import http as _http
from twisted.web import server as _server
from twisted.web.http_headers import Headers


class TwistedRequestFace:
    """
    See the module docstring (a mixin of L{FastRequest}).
    """

    raw_headers: list[tuple[bytes, bytes]]
    finished: Any
    query: bytes
    path: bytes
    code: int
    code_message: bytes
    is_tls: bool
    client: Any
    method: bytes
    uri: bytes
    _disconnected: bool
    _queue: list[bytes] | None
    _req_headers: Headers | None = None
    _resp_headers: Headers | None = None
    _cookies: list[bytes] | None = None
    _received_cookies: dict[bytes, bytes] | None = None
    _args: dict[bytes, list[bytes]] | None = None
    _notifications: list[Any] | None = None
    _adapter_cache: dict[Any, Any] | None = None
    _postpath: list[bytes] | None = None
    _content: Any = None

    @property
    def requestHeaders(self) -> Headers:  # type: ignore[override]
        h = self._req_headers
        if h is None:
            h = Headers()
            for name, value in self.raw_headers:
                h.addRawHeader(name, value)
            self._req_headers = h
        return h

    @requestHeaders.setter
    def requestHeaders(self, value: Headers) -> None:
        self._req_headers = value

    @property
    def responseHeaders(self) -> Headers:  # type: ignore[override]
        h = self._resp_headers
        if h is None:
            h = self._resp_headers = Headers()
        return h

    @responseHeaders.setter
    def responseHeaders(self, value: Headers) -> None:
        self._resp_headers = value

    @property
    def cookies(self) -> list[bytes]:  # type: ignore[override]
        if self._cookies is None:
            self._cookies = []
        return self._cookies

    @cookies.setter
    def cookies(self, value: list[bytes]) -> None:
        self._cookies = value

    @property
    def received_cookies(self) -> dict[bytes, bytes]:  # type: ignore[override]
        if self._received_cookies is None:
            self._received_cookies = {}
            self.parseCookies()
        return self._received_cookies

    @received_cookies.setter
    def received_cookies(self, value: dict[bytes, bytes]) -> None:
        self._received_cookies = value

    @property
    def args(self) -> dict[bytes, list[bytes]]:  # type: ignore[override]
        if self._args is None:
            self._args = _http.parse_qs(self.query, 1) if self.query else {}
        return self._args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value

    @property
    def postpath(self) -> list[bytes]:  # type: ignore[override]
        if self._postpath is None:
            self._postpath = [_server.unquote(s) for s in self.path[1:].split(b"/")]
        return self._postpath

    @postpath.setter
    def postpath(self, value: list[bytes]) -> None:
        self._postpath = value

    @property
    def content(self) -> Any:  # type: ignore[override]
        """
        Resources other than the proxy may read the body here: it is only
        collected (in memory) when a body consumer was never set.
        """
        if self._content is None:
            self._content = BytesIO(b"".join(self._queue or ()))
        return self._content

    @content.setter
    def content(self, value: Any) -> None:
        self._content = value

    @property
    def _adapterCache(self) -> dict[Any, Any]:
        if self._adapter_cache is None:
            self._adapter_cache = {}
        return self._adapter_cache

    def notifyFinish(self) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
            return d
        if self._disconnected:
            d.errback(Failure(ConnectionError("connection lost")))
            return d
        if self._notifications is None:
            self._notifications = []
        self._notifications.append(d)
        return d

    def getHeader(self, key: Any) -> Any:
        if isinstance(key, str):
            v = self.getHeader(key.encode("ascii"))
            return v.decode("latin-1") if v is not None else None
        k = key.lower()
        found = None
        for name, value in self.raw_headers:
            if name.lower() == k:
                found = value
        return found

    def _generic_start(self) -> None:
        headers: list[tuple[bytes, bytes]] = []
        length = None
        h = self._resp_headers
        if h is not None:
            for name, values in h.getAllRawHeaders():
                lname = name.lower()
                if lname == b"content-length":
                    try:
                        length = int(values[0])
                    except ValueError:
                        continue
                elif lname in (b"transfer-encoding", b"connection"):
                    continue
                for v in values:
                    headers.append((name, v))
        if self._cookies:
            for c in self._cookies:
                headers.append((b"Set-Cookie", c))
        self.start_response(self.code, self.code_message, headers, length)

    def isSecure(self) -> bool:
        return self.is_tls

    def getClientAddress(self) -> Any:
        return self.client

    def __repr__(self) -> str:
        return f"<FastRequest {self.method!r} {self.uri!r}>"
