"""
A small target app for tests/test_resilience_integration.py, run as its own
process so that a test can kill it (-9) and start it again on the same port.

    python3 tests/resilience_app.py --name a [--port N] [--idle-timeout S]

  GET  /up      200 "OK" (the health check)
  GET  /...     200, the app's name as the body
  POST /reset   reads the request, then aborts the connection (no response)
  POST /...     200, the app's name and the body's length

C{--idle-timeout S} closes keep-alive connections idle for S seconds (as
Puma, gunicorn or Node do), without announcing it.  Prints C{listening
PORT} once it accepts connections.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server


class App(resource.Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.encode()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if request.path == b"/up":
            return b"OK"
        return self.name

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        if request.path == b"/reset":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return self.name + b" %d" % len(body)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--idle-timeout", type=float, default=None)
    args = p.parse_args()
    kw = {"timeout": args.idle_timeout} if args.idle_timeout else {}
    site = server.Site(App(args.name), **kw)
    site.displayTracebacks = False
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
