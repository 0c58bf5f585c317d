# -*- test-case-name: tests.test_proxy -*-
"""
The responses the proxy makes itself, and what happens on an error.

    send_page(call, status, message="")   # error page (custom or built-in)
    send_response(call, status, headers, body)
    send_redirect(call, location)         # 301, connection closed after it
    fail(call, status, message="")        # THE error path
    internal_error(failure, call)         # an exception of the proxy's own: 500
    abort(call)                           # give up on a started response

L{fail} is the one place that decides what an error does to the client:
before the response started, the error page C{status}; after, the client
connection is aborted (a started response cannot be completed).  Either way
the upstream exchange, if any, is abandoned and the request completed.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from mproxy.http.call import ProxyCall, complete
from mproxy.http.custompages import render_for
from mproxy.http.pages import CONTENT_TYPE
from mproxy.http.redirect import redirect_body


def send_page(call: ProxyCall, status: int, message: str = "") -> None:
    """
    The proxy's error page C{status} (the service's custom page if it has
    one) as the whole response.
    """
    rq = call.rq
    body = render_for(call.service, status, message)
    call.status = status
    call.resp_ctype = CONTENT_TYPE
    rq.start_response(status, None, [
        (b"Content-Type", CONTENT_TYPE),
        (b"Content-Length", b"%d" % len(body)),
    ], len(body))
    rq.write(body)
    rq.finish()
    complete(call)


def send_response(call: ProxyCall, status: int, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> None:
    """
    A complete response of the proxy's own (C{headers} without framing).
    """
    rq = call.rq
    call.status = status
    for n, v in headers:
        if n.lower() == b"content-type":
            call.resp_ctype = v
    headers.append((b"Content-Length", b"%d" % len(body)))
    rq.start_response(status, None, headers, len(body))
    rq.write(body)
    rq.finish()
    complete(call)


def send_redirect(call: ProxyCall, location: str) -> None:
    """
    301 to C{location}, closing the connection after it.
    """
    rq = call.rq
    headers = [(b"Location", location.encode("latin-1", "replace"))]
    rq.close_after_response()
    body = b""
    if rq.method in (b"GET", b"HEAD"):
        body = redirect_body(location)
        headers.append((b"Content-Type", CONTENT_TYPE))
    send_response(call, 301, headers, body)


def fail(call: ProxyCall, status: int, message: str = "") -> None:
    """
    End the request on an error (see the module docstring).  Callers log
    the error themselves and check C{call.done} first.
    """
    if call.rq.started:
        abort(call)
        return
    up = call.up
    if up is not None:
        up.cancel()
    send_page(call, status, message)


def internal_error(failure: Failure, call: ProxyCall) -> None:
    """
    An exception in the proxy's own code while handling C{call} (an
    errback, or caught around a step): logged, and the request ends with
    a 500 unless it already ended.
    """
    if call.done:
        return
    call.res.logger.error("Error while proxying", target=call.target, path=call.path,
                          error=failure.getErrorMessage())
    fail(call, 500)


def abort(call: ProxyCall) -> None:
    """
    Abandon the upstream exchange and abort the client connection.
    """
    up = call.up
    if up is not None:
        up.cancel()
    call.rq.abort()
    complete(call)
