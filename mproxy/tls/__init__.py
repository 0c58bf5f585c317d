"""
Automatic and custom TLS for mproxy.

  - L{mproxy.tls.service}: C{CertificateService}, the IService that decides
    which certificate each handshake gets and obtains/renews ACME
    certificates in the background (deploy integration: C{validate},
    C{update_service}, C{remove_service}, C{status}).
  - L{mproxy.tls.acme}: C{AcmeIssuer}, one blocking RFC 8555 order with
    certbot's C{acme} library (run in a worker thread).
  - L{mproxy.tls.challenges}: HTTP-01 and TLS-ALPN-01 responses.
  - L{mproxy.tls.sni}: C{ServerTLS} (SNI + ALPN) and C{https_factory}.
  - L{mproxy.tls.static}: custom certificate files, validation and reload.
  - L{mproxy.tls.ondemand}: the C{--tls-on-demand-url} policy check.
  - L{mproxy.tls.store}: the C{<state dir>/certs/} layout.
  - L{mproxy.tls.wiring}: helpers for C{tap.py}.
  - L{mproxy.tls.testing}: certificate factories, a fake issuer, clients.
"""

__all__: list[str] = []
