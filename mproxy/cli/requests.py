"""
The deploy request the C{deploy} flags describe, in either spelling:
C{deploy HOST:PORT} (the service is named after the first host) and
C{deploy SERVICE --target HOST:PORT}.

Only the checks about the flags themselves are made here; every check of the
values is the request's own (L{DeployRequest.validate}), which the server runs
too, and flags not given take the defaults of L{mproxy.spec}.
"""

from __future__ import annotations

import os
from typing import Any

from mproxy.errors import InvalidOptions
from mproxy.spec import (
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
    given,
)


def deploy_request(ns: Any) -> DeployRequest:
    """
    Turn parsed C{deploy} flags into a checked L{DeployRequest}.

    @raise InvalidOptions: for any invalid combination.
    @raise InvalidTarget: for a malformed target.
    """
    if ns.target is not None:
        if not ns.target:
            raise InvalidOptions("--target is empty: give at least one host:port")
        service = ns.positional
        targets = tuple(ns.target)
    else:
        targets = (ns.positional,)
        service = ns.host[0].lower() if ns.host else "default"
    _check_body_limits(ns)
    req = DeployRequest(
        service=service,
        targets=targets,
        readers=tuple(ns.read_target or ()),
        options=_service_options(ns),
        target_options=_target_options(ns),
        **given(
            deploy_timeout=ns.deploy_timeout, drain_timeout=ns.drain_timeout, force=ns.force
        ),
    )
    req.validate()
    return req


def _check_body_limits(ns: Any) -> None:
    # Whether the buffering flag was given, not its value: Kamal sends
    # --buffer-requests=false --max-request-body=N, and the limit is then
    # simply not enforced (nothing is buffered).
    if ns.max_request_body is not None and ns.buffer_requests is None:
        raise InvalidOptions("max-request-body can only be set when request buffering is enabled")
    if ns.max_response_body is not None and ns.buffer_responses is None:
        raise InvalidOptions(
            "max-response-body can only be set when response buffering is enabled"
        )


def _service_options(ns: Any) -> ServiceOptions:
    return ServiceOptions(
        hosts=ns.host or (),
        path_prefixes=ns.path_prefix or (),
        tls_enabled=bool(ns.tls),
        canonical_host=(ns.canonical_host or "").lower(),
        **given(
            strip_prefix=ns.strip_path_prefix,
            tls_certificate_path=_abspath(ns.tls_certificate_path),
            tls_private_key_path=_abspath(ns.tls_private_key_path),
            tls_on_demand_url=ns.tls_on_demand_url,
            tls_redirect=ns.tls_redirect,
            tls_staging=ns.tls_staging,
            error_pages=_abspath(ns.error_pages),
            writer_affinity_timeout=ns.writer_affinity_timeout,
            read_targets_accept_websockets=ns.read_target_websockets,
            exclude_metrics_paths=ns.exclude_metrics_path,
            client_ip_header=ns.client_ip_header,
        ),
    )


def _target_options(ns: Any) -> TargetOptions:
    health = HealthCheckConfig(
        **given(
            path=ns.health_check_path,
            port=ns.health_check_port,
            interval=ns.health_check_interval,
            timeout=ns.health_check_timeout,
            host=ns.health_check_host,
        )
    )
    return TargetOptions(
        health_check=health,
        # X-Forwarded-* from clients are trusted by default only without TLS.
        forward_headers=not ns.tls if ns.forward_headers is None else ns.forward_headers,
        **given(
            target_timeout=ns.target_timeout,
            retry_timeout=ns.retry_timeout,
            buffer_requests=ns.buffer_requests,
            buffer_responses=ns.buffer_responses,
            buffer_memory=ns.buffer_memory,
            max_request_body=ns.max_request_body,
            max_response_body=ns.max_response_body,
            log_request_headers=ns.log_request_header,
            log_response_headers=ns.log_response_header,
            scope_cookie_paths=ns.scope_cookie_paths,
        ),
    )


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None
