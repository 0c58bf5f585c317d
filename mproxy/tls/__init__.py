"""
Automatic and custom TLS for mproxy.

  - L{mproxy.tls.service}: C{CertificateService}, the IService that decides
    which certificate each handshake gets and which hosts need ACME
    certificates (deploy integration: C{validate}, C{update_service},
    C{remove_service}, C{status}).
  - L{mproxy.tls.hostcert}: C{HostCertificate}, one host's order/renewal
    state machine.
  - L{mproxy.tls.backoff}: C{RetryPolicy}, when the next order happens.
  - L{mproxy.tls.orders}: C{OrderRunner}, orders in a worker thread, one at
    a time per ACME account.
  - L{mproxy.tls.gate}: C{OnDemandGate}, which on-demand names may order.
  - L{mproxy.tls.status}: C{HostStatus} rows.
  - L{mproxy.tls.interfaces}: the contracts between these pieces.
  - L{mproxy.tls.redisstore}: C{RedisCluster}, what the nodes of a
    C{--cluster} share through Redis (called from worker threads only).
  - L{mproxy.tls.clusterstore}: the cluster's store, challenges, order
    guard (one order per name) and on-demand policy over the local ones.
  - L{mproxy.tls.listener}: C{ClusterListener}, the thread that brings
    other nodes' certificates and challenges in.
  - L{mproxy.tls.acme}: C{AcmeIssuer}, one blocking RFC 8555 order with
    certbot's C{acme} library (run in a worker thread).
  - L{mproxy.tls.challenges}: HTTP-01 and TLS-ALPN-01 responses.
  - L{mproxy.tls.sni}: C{ServerTLS} (SNI + ALPN) and C{https_factory}.
  - L{mproxy.tls.fasttls}: the HTTPS connections' TLS transport on the
    standard library's C{ssl} (one record per connection per iteration).
  - L{mproxy.tls.static}: custom certificate files, validation and reload.
  - L{mproxy.tls.ondemand}: the C{--tls-on-demand-url} policy check.
  - L{mproxy.tls.store}: the C{<state dir>/certs/} layout.
  - L{mproxy.tls.wiring}: the production service and helpers for C{tap.py}.
  - L{mproxy.tls.testing}: certificate factories, a fake issuer, clients.
"""

__all__: list[str] = []
