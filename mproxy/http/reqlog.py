# -*- test-case-name: tests.test_proxy -*-
"""
The per-request log line.

    log_request(logger, call, duration_ns) -> None

writes one INFO C{Request} record through the injected
L{mproxy.logging.JSONLogger}, keys in this order: host, port, path,
request_id, status, service, target, duration (ns), method,
req_content_length, req_content_type, resp_content_length,
resp_content_type, client_addr, client_port, remote_addr, user_agent, proto,
scheme, query, then C{req_<header>} / C{resp_<header>} for the service's
C{log_request_headers} / C{log_response_headers}; a request that was sent
again also has C{attempts} and C{tried} (the targets, in order).
"""

from __future__ import annotations

from typing import Any


def log_request(logger: Any, call: Any, duration_ns: int) -> None:
    rq = call.rq
    res = call.res
    client_addr, client_port = rq.client_strings
    tls = rq.is_tls
    service = call.service
    rl = rq.body_length
    record = {
        "host": call.host.decode("latin-1"),
        "port": res.https_port if tls else res.http_port,
        "path": call.path,
        "request_id": call.request_id.decode("latin-1"),
        "status": call.status,
        "service": service.name if service is not None else "",
        "target": call.target,
        "duration": duration_ns,
        "method": rq.method.decode("latin-1"),
        "req_content_length": rl,
        "req_content_type": call.req_ctype.decode("latin-1"),
        "resp_content_length": rq.sentLength,
        "resp_content_type": call.resp_ctype.decode("latin-1"),
        "client_addr": client_addr,
        "client_port": client_port,
        "remote_addr": call.remote_addr.decode("latin-1") or client_addr,
        "user_agent": call.user_agent.decode("latin-1"),
        "proto": rq.clientproto.decode("latin-1"),
        "scheme": "https" if tls else "http",
        "query": rq.query.decode("latin-1"),
    }
    extra = call.log_extra
    if extra:
        record.update(extra)
    tried = call.tried
    if tried:
        record["attempts"] = len(tried) + 1
        record["tried"] = tried + [call.target] if call.target else list(tried)
    logger.info("Request", **record)
