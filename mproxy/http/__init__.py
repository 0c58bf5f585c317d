"""
The data plane: HTTP listeners, the reverse proxy and the client toward
targets.  One module per concern:

  - L{mproxy.http.interfaces}: the contracts (exchange, request channel,
    upstream pool/exchange/receiver, and the router/service/claim view).
  - L{mproxy.http.proxy}: C{ProxyResource} and C{handle()}, the request
    path as named steps; C{build_http_factory}.
  - L{mproxy.http.call}: C{ProxyCall}, one request's state, and
    C{complete()} (claim release, log line, metrics).
  - L{mproxy.http.forwarding}: which request headers go to the target
    (X-Forwarded-*, X-Request-ID/-Start, hop-by-hop) and which response
    headers come back.
  - L{mproxy.http.paths}: dot-segment removal, the path routing sees, the
    target URI.
  - L{mproxy.http.cookies}: request cookie lookup, Set-Cookie scoping.
  - L{mproxy.http.policy}: pre-route answers (ACME HTTP-01, TLS-required
    503, redirects).
  - L{mproxy.http.redirect}: C{redirect_location}, the redirect rules.
  - L{mproxy.http.buffering}: request and response buffering.
  - L{mproxy.http.relay}: C{Relay}, the upstream exchange's receiver and
    the client's producer (stall timer, cancellation, tunnels).
  - L{mproxy.http.responses}: the proxy's own responses; C{fail()}, the one
    "started ? abort : error page" decision.
  - L{mproxy.http.pages}, L{mproxy.http.custompages}: error page bodies.
  - L{mproxy.http.reqlog}: the C{Request} log line.
  - L{mproxy.http.spool}: bounded body buffers (memory, then disk).
  - L{mproxy.http.server}: C{FastHTTPChannel}, C{ProxySite}, the TLS
    listeners' ALPN choice.
  - L{mproxy.http.parsing}: C{RequestReader}, HTTP/1.1 parsing and request
    rules.
  - L{mproxy.http.connection}: the channel's reading pauses, timer and
    closing.
  - L{mproxy.http.request}: C{FastRequest}, the HTTP/1.1 exchange;
    L{mproxy.http.compat}: its Twisted C{Request} face.
  - L{mproxy.http.generic}: C{GenericExchange} over standard Twisted
    requests (HTTP/2).
  - L{mproxy.http.batch}: batched socket writes.
  - L{mproxy.http.upstream}: the HTTP/1.1 client and keep-alive pools.
  - L{mproxy.http.localget}: the in-memory on-demand TLS policy request.
"""
