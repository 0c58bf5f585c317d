# -*- test-case-name: tests.test_proxy -*-
"""
Request and response buffering (C{--buffer-requests}, C{--buffer-responses}).

    buffer_request(call, forward)           # read the whole body, then forward
    hold_response(call, status, reason, headers, length) -> bool
    buffer_response_data(call, data)
    send_held_response(call)

A buffered request body is read into a L{mproxy.http.spool.Spool} (memory,
then a temporary file) before the target is contacted: a declared body over
C{max_request_body} is a 413 at once, a chunked one when it grows past it
(the target is never contacted).  A buffered response is held until it is
complete, then sent; past C{max_response_body} it is a 500.  Responses of
unknown length, event streams, C{X-Accel-Buffering: no} and tunnels are
never held.
"""

from __future__ import annotations

from typing import Any, Callable

from mproxy.http.call import ProxyCall, complete
from mproxy.http.responses import fail, send_page
from mproxy.http.spool import Spool, SpoolSender


def buffer_request(call: ProxyCall, forward: Callable[[], Any],
                   on_error: Callable[[int, str], None]) -> None:
    """
    Read the request body into a spool, then C{forward()} (which starts
    the upstream exchange and returns it) and send the spool to it.
    """
    rq = call.rq
    topts = call.topts
    limit = topts.max_request_body
    if limit and rq.body_length > limit:
        send_page(call, 413)
        return
    logger = call.res.logger
    spool = call.req_spool = Spool(topts.buffer_memory, limit, logger)

    def data(chunk: bytes) -> None:
        if call.done:
            return
        try:
            ok = spool.write(chunk)
        except OSError as e:
            logger.error("Error while proxying", target=call.target,
                         path=call.path, error=f"buffering request: {e}")
            send_page(call, 500)
            return
        if not ok:
            send_page(call, 413)

    def end() -> None:
        if call.done:
            return
        up = forward()
        if call.done:
            return
        sender = call.req_sender = SpoolSender(spool, up.write_body, up.end_body)
        up.set_body_producer(sender)
        sender.start()

    rq.send_continue()
    rq.set_body_consumer(data, end, on_error)


def _streaming(headers: list[tuple[bytes, bytes]]) -> bool:
    """
    Responses that are never held back: event streams and those asking for
    no buffering.
    """
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == b"text/event-stream":
                return True
        elif lname == b"x-accel-buffering":
            if value.strip().lower() == b"no":
                return True
    return False


def hold_response(call: ProxyCall, status: int, reason: bytes | None,
                  headers: list[tuple[bytes, bytes]], length: int | None) -> bool:
    """
    Whether the response is buffered; if so its head is kept and a spool
    made for its body.
    """
    topts = call.topts
    if not topts.buffer_responses or length is None or _streaming(headers):
        return False
    call.resp_head = (status, reason, headers, length)
    call.resp_spool = Spool(topts.buffer_memory, topts.max_response_body, call.res.logger)
    return True


def buffer_response_data(call: ProxyCall, data: bytes) -> None:
    spool = call.resp_spool
    assert spool is not None
    try:
        ok = spool.write(data)
    except OSError as e:
        call.res.logger.error("Error while proxying", target=call.target, path=call.path,
                              error=f"buffering response: {e}")
        fail(call, 500)
        return
    if not ok:
        call.res.logger.info("Response exceeded max response limit", path=call.path,
                             target=call.target)
        fail(call, 500)


def send_held_response(call: ProxyCall) -> None:
    """
    The buffered response is complete: send it, with backpressure.
    """
    rq = call.rq
    status, reason, out, length = call.resp_head
    rq.start_response(status, reason, out, length)

    def sent() -> None:
        rq.finish()
        complete(call)

    assert call.resp_spool is not None
    sender = SpoolSender(call.resp_spool, rq.write, sent)
    rq.registerProducer(sender, True)
    sender.start()
