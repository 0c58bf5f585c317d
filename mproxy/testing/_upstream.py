"""
L{UpstreamApp}, the web application tests deploy behind mproxy, and
L{listen_upstream}, which serves one on a real loopback port.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class UpstreamApp(Resource):
    """
    A web app for tests.

      - C{/up}: 200 while C{healthy} is true, else 503.
      - C{/slow?ms=N}: answers after N milliseconds.
      - C{/echo}: answers with the request body.
      - anything else: 200 with the app's name.

    Every request but C{/up} is counted in C{requests}.  After L{hold}, those
    requests get no answer until L{release} (the health endpoint still
    answers): a request in flight, for as long as a test wants.
    """

    isLeaf = True

    def __init__(self, reactor: Any, name: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.name = name
        self.healthy = True
        self.requests = 0
        self.health_checks = 0
        self.last_headers: dict[bytes, list[bytes]] = {}
        self._holding = False
        self._held: list[Any] = []

    @property
    def held(self) -> tuple[Any, ...]:
        """
        The requests held now (L{twisted.web.server.Request}s), oldest
        first; a request whose client went away is no longer held.
        """
        return tuple(self._held)

    def hold(self) -> None:
        """
        Hold every request from now on (but health checks) until L{release}.
        """
        self._holding = True

    def release(self) -> None:
        """
        Stop holding, and answer every held request as it would have been.
        """
        self._holding = False
        held, self._held = self._held, []
        for request in held:
            body = self._answer(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

    def render(self, request: Any) -> Any:
        if request.path == b"/up":
            self.health_checks += 1
            request.setResponseCode(200 if self.healthy else 503)
            return b"up" if self.healthy else b"down"
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        if self._holding:
            self._held.append(request)
            request.notifyFinish().addErrback(lambda _: self._forget(request))
            return NOT_DONE_YET
        return self._answer(request)

    def _forget(self, request: Any) -> None:
        if request in self._held:
            self._held.remove(request)

    def _answer(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"x-upstream", self.name.encode())
        if request.path == b"/slow":
            ms = int(request.args.get(b"ms", [b"1000"])[0])
            call = self.reactor.callLater(ms / 1000.0, self._finish_slow, request)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return NOT_DONE_YET
        if request.path == b"/echo":
            body = request.content.read()
        else:
            body = self.name.encode()
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _finish_slow(self, request: Any) -> None:
        request.write(self.name.encode())
        request.finish()


def listen_upstream(reactor: Any, name: str, port: int = 0) -> tuple[UpstreamApp, Any]:
    """
    Serve a new L{UpstreamApp} on 127.0.0.1; returns it and the listening port.
    """
    app = UpstreamApp(reactor, name)
    site = Site(app)
    site.displayTracebacks = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    return app, listening
