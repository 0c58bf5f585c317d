# -*- test-case-name: tests.test_tls_wiring -*-
"""
Glue between L{mproxy.tls} and the rest of mproxy, for C{tap.py}.

    certs = build_certificate_service(reactor, config, router, local_get=None)
    certs.setName("certs"); certs.setServiceParent(top)     # before the listeners
    controller = Controller(..., certificates=certs)

    # plain HTTP front, first thing for every request:
    body = certs.challenges.http01_response(path_bytes_without_query)
    if body is not None: answer 200 text/plain with body (no redirect, no routing)

    # HTTPS listener:
    factory = https_server_factory(certs, https_site)
    TCP4ServerEndpoint(reactor, config.https_port, interface=...).listen(factory)

    # SIGHUP reloads custom certificates:
    install_sighup_reload(reactor, certs.reload_static)
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.protocols.tls import TLSMemoryBIOFactory

from mproxy.tls.service import CertificateService, Lookup
from mproxy.tls.sni import ServerTLS, https_factory
from mproxy.tls.static import install_sighup_reload

__all__ = [
    "router_lookup",
    "build_certificate_service",
    "https_server_factory",
    "install_sighup_reload",
]


def router_lookup(router: Any) -> Lookup:
    """
    C{server_name -> (service_name, ServiceOptions) | None} from
    L{mproxy.router.Router.root_service_for} (the service serving C{/} for
    that name, with the router's exact / wildcard / default precedence).
    """

    def lookup(server_name: str) -> tuple[str, Any] | None:
        service = router.root_service_for(server_name)
        if service is None:
            return None
        return service.name, service.options

    return lookup


def build_certificate_service(
    reactor: Any,
    config: Any,
    router: Any,
    local_get: Callable[[str, str, str], Deferred] | None = None,
    **kwargs: Any,
) -> CertificateService:
    """
    The production L{CertificateService} from a L{mproxy.config.ServerConfig}
    (C{state_dir}, C{acme_directory}, C{acme_email}, C{acme_ca_bundle}).
    """
    return CertificateService.create(
        reactor,
        config.state_dir,
        directory_url=getattr(config, "acme_directory", "") or "",
        email=getattr(config, "acme_email", "") or None,
        ca_bundle=getattr(config, "acme_ca_bundle", "") or None,
        lookup=router_lookup(router),
        local_get=local_get,
        **kwargs,
    )


def https_server_factory(
    certs: CertificateService,
    site: Any,
    protocol_for_alpn: Callable[[bytes | None, Any], Any] | None = None,
) -> TLSMemoryBIOFactory:
    """
    The HTTPS port's factory: certificates chosen by C{certs.select} per SNI,
    TLS-ALPN-01 answered from C{certs.challenges}, then C{site}'s protocol
    (or C{protocol_for_alpn(negotiated, addr)}).
    """
    return https_factory(ServerTLS(certs.select, certs.challenges), site, protocol_for_alpn)
