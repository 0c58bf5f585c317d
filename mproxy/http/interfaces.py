# -*- test-case-name: tests.test_interfaces -*-
"""
The contracts of the data plane, as L{zope.interface} interfaces.

What the proxy drives:
  - L{IExchange}: one client request/response as the proxy sees it
    (L{mproxy.http.request.FastRequest} for HTTP/1.1,
    L{mproxy.http.h2exchange.H2Request} for HTTP/2,
    L{mproxy.http.generic.GenericExchange} over any standard Twisted
    request); L{ITunnelExchange} adds what a WebSocket tunnel needs.
  - L{IRequestChannel}: what a L{FastRequest} needs from the connection it
    arrived on (L{mproxy.http.server.FastHTTPChannel}).

Toward targets (L{mproxy.http.upstream}):
  - L{IUpstreamPool}, L{IUpstreamExchange}, and L{IUpstreamReceiver}, which
    the proxy implements to hear the target's response.

The view of the control plane the data plane uses:
  - L{IRouter} → L{IRouteMatch} → L{IProxiedService}, whose C{select} gives
    an L{IClaim} on an L{IProxiedTarget} or an L{IRefusal} (or a Deferred of
    either, while the service is paused);
  - L{IRequestMetrics}, L{IHTTP01Responder}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface
from twisted.internet.interfaces import IPushProducer

__all__ = [
    "IExchange", "ITunnelExchange", "IRequestChannel", "IUpstreamReceiver",
    "IUpstreamExchange", "IUpstreamPool", "IRouter", "IRouteMatch",
    "IProxiedService", "IClaim", "IProxiedTarget", "IRefusal", "IRequestMetrics",
    "IHTTP01Responder",
]


class IExchange(Interface):
    """
    One client request and its response, as the proxy resource drives it.
    """

    method = Attribute("C{bytes}: the request method")
    uri = Attribute("C{bytes}: the request target as received (origin form)")
    path = Attribute("C{bytes}: C{uri} without its query, percent-encoded")
    query = Attribute("C{bytes}: the query string without C{?} (C{b''} if none)")
    clientproto = Attribute("C{bytes}: C{HTTP/1.0}, C{HTTP/1.1} or C{HTTP/2.0}")
    raw_headers = Attribute("C{list[tuple[bytes, bytes]]}: request headers as received")
    body_length = Attribute(
        "C{int}: 0 no body, n declared length, -1 chunked (length unknown)")
    upgrade = Attribute(
        "C{bool}: a WebSocket handshake (then the exchange provides L{ITunnelExchange})")
    is_tls = Attribute("C{bool}: the request arrived over TLS")
    client = Attribute("the peer's address object (C{.host}, C{.port})")
    client_strings = Attribute("C{tuple[str, str]}: the peer's host and port, for logs")
    started = Attribute("C{bool}: the response was started (L{start_response})")
    sentLength = Attribute("C{int}: response body bytes written so far")
    body_producer = Attribute(
        "L{IPushProducer}: pauses reading the request body from the client")

    def set_lost_handler(fn):
        """
        C{fn()} is called if the client goes away before the response is
        finished (C{None}: nothing is, from now on).
        """

    def set_body_consumer(on_data, on_end, on_error):
        """
        Deliver the request body from now on: C{on_data(bytes)} per piece
        (already de-chunked), C{on_end()} at its end, C{on_error(status,
        message)} if it is malformed (400) or stalls (408).
        """

    def send_continue():
        """
        Answer C{Expect: 100-continue} (if it was asked): the body is read now.
        """

    def send_informational(code, headers):
        """
        Relay a 1xx (not 100, not 101) response head, if the protocol can.
        """

    def start_response(code, reason, headers, length):
        """
        Prepare the response head (sent with the first L{write} or by
        L{finish}).  C{headers} hold no framing or connection headers;
        C{length} is the body length if known (matching a Content-Length in
        C{headers}), else C{None} (streamed).
        """

    def close_after_response():
        """
        Close the client connection after this response (call before
        L{start_response}).
        """

    def write(data):
        """
        Send a piece of the response body.
        """

    def finish(trailers=None):
        """
        End the response (with trailers, where the protocol can).
        """

    def abort():
        """
        Abort the client connection (a started response cannot be completed).
        """

    def registerProducer(producer, streaming):
        """
        C{producer} (an L{IPushProducer}) is paused while the client's
        connection is full.
        """


class ITunnelExchange(IExchange):
    """
    An exchange that can become a byte tunnel after a 101 (WebSocket).
    """

    def take_over(on_data):
        """
        Every byte the client sends from now on goes to C{on_data}.
        """

    def tunnel_write(data):
        """
        Send raw bytes to the client (the pending 101 head first).
        """

    def close_connection():
        """
        Close the client connection once what was written is sent.
        """

    def set_shutdown_handler(fn):
        """
        C{fn()} ends the tunnel when the server shuts down (shutdown does not
        wait for tunnels).
        """


class IRequestChannel(Interface):
    """
    What a L{mproxy.http.request.FastRequest} needs from its connection.
    """

    transport = Attribute("the connection's transport")
    peer = Attribute("the peer's address")
    local = Attribute("the local address")
    is_tls = Attribute("C{bool}")
    batcher = Attribute("the L{mproxy.http.batch.WriteBatcher} for the transport")
    body_producer = Attribute("L{IPushProducer} pausing reading for the request body")
    client_strings = Attribute("C{tuple[str, str]}: peer host and port, for logs")

    def pause_reading(reason):
        """
        Stop reading from the client for C{reason} (until L{resume_reading}).
        """

    def resume_reading(reason):
        """
        C{reason} no longer holds reading back.
        """

    def request_done(request):
        """
        C{request}'s response is finished: go on with the next request.
        """

    def abort():
        """
        Abort the connection.
        """

    def close():
        """
        Close once everything written was sent.
        """

    def start_tunnel(request, on_data):
        """
        After C{request}'s 101: every byte read goes to C{on_data}.
        """


class IUpstreamReceiver(Interface):
    """
    Hears one exchange with a target (called from the reactor).
    """

    def upstream_informational(status, headers):
        """
        A 1xx response other than 101.
        """

    def upstream_response(status, reason, headers):
        """
        The response head (once).
        """

    def upstream_data(data):
        """
        A piece of the body (after a 101: of the tunnelled stream).
        """

    def upstream_done(trailers):
        """
        The body is complete (after a 101: the target closed the tunnel).
        """

    def upstream_failed(error):
        """
        The exchange failed (an L{mproxy.http.upstream.UpstreamError}: 502 or
        504, with the C{kind} of failure that says whether the request could
        be sent again); nothing else follows.
        """


class IUpstreamExchange(IPushProducer):
    """
    One request to a target; as a push producer it pauses the response.
    """

    body_ended = Attribute("C{bool}: the request body is complete (or there is none)")

    def write_body(data):
        """
        Send a piece of the request body.
        """

    def end_body():
        """
        The request body is complete.
        """

    def write_raw(data):
        """
        Send bytes as they are (tunnels).
        """

    def set_body_producer(producer):
        """
        C{producer} is paused while the target cannot take more of the body.
        """

    def set_tunnel_producer(producer):
        """
        After a 101: C{producer} is paused while the target's side is full.
        """

    def cancel():
        """
        Abandon the exchange; the receiver hears nothing more.
        """

    def close():
        """
        End a tunnel gracefully.
        """


class IUpstreamPool(Interface):
    """
    Connections to one target.
    """

    def request(method, target, headers, receiver, *, body_length=0, timeout=30.0,
                codings=b"", fresh=False, replay=None):
        """
        Start a request; returns an L{IUpstreamExchange} whose progress goes
        to C{receiver} (an L{IUpstreamReceiver}).  The pool never sends a
        request twice by itself.  C{fresh}: on a new connection, not an idle
        one.  C{replay}: an exchange of this same request (from any pool)
        whose connect failed; its queued body, and its end, are sent first.
        """

    def close_idle():
        """
        Close idle keep-alive connections.
        """

    def close():
        """
        Close idle connections now and the others when done; no new ones.
        """


class IRouter(Interface):
    """
    Host and path routing, as the proxy asks it.
    """

    def match(host, path):
        """
        The L{IRouteMatch} for a Host header and a decoded, dot-segment-free
        path, or C{None}.
        """


class IRouteMatch(Interface):
    service = Attribute("the L{IProxiedService} matched")
    prefix = Attribute("C{str}: the matched path prefix (C{/} for all)")

    def target_path(path):
        """
        The path the target sees (the prefix stripped if the service strips).
        """


class IProxiedService(Interface):
    name = Attribute("C{str}")
    options = Attribute("L{mproxy.spec.ServiceOptions}")
    target_options = Attribute("L{mproxy.spec.TargetOptions}")

    def select(method, path, cookie, websocket):
        """
        An L{IClaim} on a target for this request, an L{IRefusal}, or a
        L{Deferred} firing with one of them (while paused, or waiting for a
        healthy target).  C{cookie(name)} reads a request cookie.
        """

    def retry(failed, tried, wait):
        """
        For a request that could not be delivered on the claim C{failed}
        (already released): an L{IClaim} on another healthy target (one whose
        address is not in C{tried} if there is one), an L{IRefusal} (503, no
        healthy target), or a L{Deferred} of either while it waits up to
        C{wait} seconds for a target to become healthy.
        """


class IProxiedTarget(Interface):
    address = Attribute("C{str}: C{host:port}")
    pool = Attribute("the target's L{IUpstreamPool}")

    def eject(error):
        """
        A connection to the target was refused, reset or timed out: take it
        out of rotation until a health check passes.  Returns C{True} when
        this call took it out (it was healthy).
        """


class IClaim(Interface):
    """
    A request's hold on a target (counted for drains).
    """

    target = Attribute("the L{IProxiedTarget}")
    set_cookie = Attribute("C{bytes | None}: a Set-Cookie value to add to the response")

    def set_canceller(fn):
        """
        C{fn()} is called if a drain's deadline passes first (C{None}: forget).
        """

    def mark_upgraded():
        """
        The request became a tunnel.
        """

    def release():
        """
        The request is over.
        """


class IRefusal(Interface):
    """
    A service's answer instead of a target: a status and a message.
    """

    status = Attribute("C{int}: 503 (stopped, unhealthy), 504 (pause expired), 200 (health)")
    message = Attribute("C{str}")
    unavailable = Attribute("C{bool}: a 503 because no target was healthy")


class IRequestMetrics(Interface):
    def enter(service):
        """
        A request entered C{service}.
        """

    def leave(service):
        """
        It left.
        """

    def observe(service, method, status, seconds):
        """
        A request completed.
        """

    def retried(service):
        """
        A request was sent again after a failed delivery.
        """

    def ejected(service, target):
        """
        A refused, reset or timed-out connection took C{target} out of
        rotation.
        """

    def unavailable(service):
        """
        A request got the 503 page because no target was healthy.
        """


class IHTTP01Responder(Interface):
    def http01_response(path):
        """
        The key authorization for an ACME HTTP-01 challenge path, or C{None}.
        """
