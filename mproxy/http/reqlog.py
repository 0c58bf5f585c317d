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
encoded by the logger.  A logger that can build it later
(C{log_encoded_later}: the worker's, whose lines are written when its
reactor turn ends) builds it after the turn's responses were sent, so
that the client does not wait for its log line.  Values that repeat from one request to the next
(host, method, content types, service and target, the client's fields)
are encoded once and remembered (a bounded cache).
"""

from __future__ import annotations

from typing import Any

from mproxy.logging import encode_string as _s

_FIELDS = (
    ', "host": %s, "port": %d, "path": %s, "request_id": %s, "status": %d, %s, '
    '"duration": %d, "method": %s, "req_content_length": %d, '
    '"req_content_type": %s, "resp_content_length": %d, "resp_content_type": %s, '
    '%s, "query": %s'
)
_SERVICE_TARGET = '"service": %s, "target": %s'
_CLIENT = ('"client_addr": %s, "client_port": %s, "remote_addr": %s, "user_agent": %s, '
           '"proto": %s, "scheme": %s')

#: how many encoded values each cache below keeps (then it starts again)
CACHE_SIZE = 1024

# Encoded values and runs of fields that repeat from request to request
# (the same Host, method and content types; one service and target; one
# client connection's address, user agent and protocol), each looked up
# once instead of encoded per request.  The keys are everything the text
# is made of.
_values: dict[bytes, str] = {}
_service_targets: dict[tuple[str | None, str], str] = {}
_clients: dict[tuple[Any, ...], str] = {}


def _value(b: bytes) -> str:
    """
    C{b} (Latin-1) as a JSON string, remembered.
    """
    text = _values.get(b)
    if text is None:
        if len(_values) >= CACHE_SIZE:
            _values.clear()
        text = _values[b] = _s(b.decode("latin-1"))
    return text


def log_request(logger: Any, call: Any, duration_ns: int) -> None:
    if call.log_extra or call.tried:
        _log_record(logger, call, duration_ns)
        return
    later = getattr(logger, "log_encoded_later", None)
    if later is not None:
        later("INFO", "Request", lambda: _fields(call, duration_ns))
        return
    log_encoded = getattr(logger, "log_encoded", None)
    if log_encoded is None:
        _log_record(logger, call, duration_ns)
        return
    log_encoded("INFO", "Request", _fields(call, duration_ns))


def _fields(call: Any, duration_ns: int) -> str:
    """
    The common record's attributes, encoded (the text after C{msg}).
    """
    rq = call.rq
    tls = rq.is_tls
    service = call.service
    name = None if service is None else service.name
    st_key = (name, call.target)
    service_target = _service_targets.get(st_key)
    if service_target is None:
        if len(_service_targets) >= CACHE_SIZE:
            _service_targets.clear()
        service_target = _service_targets[st_key] = _SERVICE_TARGET % (
            '""' if name is None else _s(name), _s(call.target))
    remote = call.remote_addr
    client_key = (rq.client_strings, remote, call.user_agent, rq.clientproto, tls)
    client = _clients.get(client_key)
    if client is None:
        if len(_clients) >= CACHE_SIZE:
            _clients.clear()
        client_addr, client_port = rq.client_strings
        client = _clients[client_key] = _CLIENT % (
            _s(client_addr),
            _s(client_port),
            _s(remote.decode("latin-1")) if remote else _s(client_addr),
            _s(call.user_agent.decode("latin-1")),
            _s(rq.clientproto.decode("latin-1")),
            '"https"' if tls else '"http"',
        )
    values = _values
    host = values.get(call.host) or _value(call.host)
    method = values.get(rq.method) or _value(rq.method)
    req_ctype = values.get(call.req_ctype) or _value(call.req_ctype)
    resp_ctype = values.get(call.resp_ctype) or _value(call.resp_ctype)
    query = rq.query
    res = call.res
    return _FIELDS % (
        host,
        res.https_port if tls else res.http_port,
        _s(call.path),
        _s(call.request_id.decode("latin-1")),
        call.status,
        service_target,
        duration_ns,
        method,
        rq.body_length,
        req_ctype,
        rq.sentLength,
        resp_ctype,
        client,
        _s(query.decode("latin-1")) if query else '""',
    )


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
