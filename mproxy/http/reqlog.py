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

The line is written for every request, so for a logger that takes encoded
attributes (C{log_encoded}) the common record (no logged headers, no
retries) is encoded here in one string format, each string through the
encoder's own escaping: the same text as the record built as a dict and
encoded by the logger.
"""

from __future__ import annotations

from typing import Any

from mproxy.logging import encode_string as _s

_FIELDS = (
    ', "host": %s, "port": %d, "path": %s, "request_id": %s, "status": %d, "service": %s, '
    '"target": %s, "duration": %d, "method": %s, "req_content_length": %d, '
    '"req_content_type": %s, "resp_content_length": %d, "resp_content_type": %s, '
    '"client_addr": %s, "client_port": %s, "remote_addr": %s, "user_agent": %s, '
    '"proto": %s, "scheme": %s, "query": %s'
)


def log_request(logger: Any, call: Any, duration_ns: int) -> None:
    log_encoded = getattr(logger, "log_encoded", None)
    if log_encoded is None or call.log_extra or call.tried:
        _log_record(logger, call, duration_ns)
        return
    rq = call.rq
    res = call.res
    client_addr, client_port = rq.client_strings
    tls = rq.is_tls
    service = call.service
    remote = call.remote_addr
    log_encoded("INFO", "Request", _FIELDS % (
        _s(call.host.decode("latin-1")),
        res.https_port if tls else res.http_port,
        _s(call.path),
        _s(call.request_id.decode("latin-1")),
        call.status,
        _s(service.name) if service is not None else '""',
        _s(call.target),
        duration_ns,
        _s(rq.method.decode("latin-1")),
        rq.body_length,
        _s(call.req_ctype.decode("latin-1")),
        rq.sentLength,
        _s(call.resp_ctype.decode("latin-1")),
        _s(client_addr),
        _s(client_port),
        _s(remote.decode("latin-1")) if remote else _s(client_addr),
        _s(call.user_agent.decode("latin-1")),
        _s(rq.clientproto.decode("latin-1")),
        '"https"' if tls else '"http"',
        _s(rq.query.decode("latin-1")),
    ))


def _log_record(logger: Any, call: Any, duration_ns: int) -> None:
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
