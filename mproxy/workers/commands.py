"""
The AMP commands of a worker's channel (an AF_UNIX socket pair, one per
worker), both directions.

Supervisor to worker: L{SetServices} (the full routing as the state file's
records, with the targets' health; answered once the worker switched),
L{SetHealth}, L{DrainService}, L{GetInflight}, L{GetMetrics},
L{SetCertificates}, L{SetChallenges}, L{Serve} (start accepting on the
inherited sockets) and L{Retire} (stop accepting, drain, exit).

Worker to supervisor: L{Drained} (the load balancers a L{SetServices}
replaced have drained), L{Eject} (a connection to a target failed),
L{AskCertificate} (an on-demand TLS name without a certificate),
L{FetchCertificate} (the same, answered: held by the handshake),
L{Exhausted} (out of file descriptors) and L{Log} (a log line, when the supervisor's log is not a file descriptor the
worker can share).

Values that may be large (records, certificates, metrics) are JSON split
over as many AMP values as they need (L{BigJSON}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

#: the largest AMP value is 65535 bytes
_CHUNK = 60000


class BigJSON(amp.Argument):
    """
    Any JSON value, encoded as UTF-8 and split into C{name}, C{name.1},
    C{name.2}, ... of at most L{_CHUNK} bytes each.
    """

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:  # type: ignore[override]
        value = objects.get(str(name, "ascii"))
        if value is None and self.optional:
            return
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        strings[name] = chunks[0]
        for i, chunk in enumerate(chunks[1:], 1):
            strings[name + b".%d" % i] = chunk
        strings[name + b".n"] = b"%d" % len(chunks)

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:  # type: ignore[override]
        if self.optional and name not in strings:
            objects[str(name, "ascii")] = None
            return
        count = int(strings.pop(name + b".n", b"1"))
        parts = [strings.pop(name)]
        for i in range(1, count):
            parts.append(strings.pop(name + b".%d" % i))
        objects[str(name, "ascii")] = json.loads(b"".join(parts).decode("utf-8"))


# supervisor -> worker


class SetServices(amp.Command):
    """
    Serve exactly C{records} (L{mproxy.state.ServiceRecord.to_json} each);
    C{targets} names every target and gives its health
    (L{mproxy.controller.Controller.target_health_map}); C{health}, by
    address, is for the workers of an image before an upgrade, which do not
    know C{targets}.  Answered once the worker's router switched, with the
    requests in flight on the load balancers it replaced; those drain (cut
    after C{drain_timeout}) and their end is reported with L{Drained}
    carrying the same C{seq}.
    """

    arguments = [(b"seq", amp.Integer()), (b"records", BigJSON()),
                 (b"health", BigJSON()), (b"drain_timeout", amp.Float()),
                 (b"targets", BigJSON(optional=True))]
    response = [(b"draining", amp.Integer())]


class SetHealth(amp.Command):
    """
    Target C{address} (the one named C{key}, when given) is now (un)healthy.
    """

    arguments = [(b"address", amp.Unicode()), (b"healthy", amp.Boolean()),
                 (b"key", amp.Unicode(optional=True))]
    response: list = []


class DrainService(amp.Command):
    """
    Drain the service's load balancers (a pause or stop); answered when
    their requests in flight have ended or been cut at C{timeout}.
    """

    arguments = [(b"service", amp.Unicode()), (b"timeout", amp.Float())]
    response = [(b"requests", amp.Integer()), (b"cut", amp.Integer())]


class GetInflight(amp.Command):
    """
    Requests in flight, by service name.
    """

    arguments: list = []
    response = [(b"inflight", BigJSON())]


class GetMetrics(amp.Command):
    """
    The worker's C{mproxy_*} metric samples:
    C{[[family, type, help, [[sample, labels, value], ...]], ...]}.
    """

    arguments: list = []
    response = [(b"families", BigJSON())]


class SetCertificates(amp.Command):
    """
    What the handshakes need (see L{mproxy.workers.certs}): the default
    certificate, custom certificates by service, ACME certificates by
    directory and host, all as PEM.
    """

    arguments = [(b"snapshot", BigJSON())]
    response: list = []


class SetChallenges(amp.Command):
    """
    The pending ACME challenges: HTTP-01 key authorizations by token and
    TLS-ALPN-01 certificates (PEM) by domain.
    """

    arguments = [(b"http01", BigJSON()), (b"alpn", BigJSON())]
    response: list = []


class Serve(amp.Command):
    """
    Start accepting on the inherited listening sockets as the worker in
    C{slot}; answered once serving.  C{http3}: serve the inherited UDP
    socket too (one worker does: QUIC packets of one connection must reach
    the same process).  C{alt_svc}: the UDP port HTTP/3 is served on
    (advertised in HTTPS responses), or 0.
    """

    arguments = [(b"slot", amp.Integer()), (b"http3", amp.Boolean()),
                 (b"alt_svc", amp.Integer())]
    response = [(b"pid", amp.Integer())]


class Retire(amp.Command):
    """
    Stop accepting (this worker only), let in-flight requests finish for up
    to C{grace} seconds, then exit.  Answered at once.
    """

    arguments = [(b"grace", amp.Float())]
    response: list = []


# worker -> supervisor


class Drained(amp.Command):
    arguments = [(b"seq", amp.Integer()), (b"requests", amp.Integer()), (b"cut", amp.Integer())]
    requiresAnswer = False


class Eject(amp.Command):
    """
    A connection to target C{address} (the one the supervisor calls C{key},
    when known) failed: it is out of rotation here.
    """

    arguments = [(b"address", amp.Unicode()), (b"error", amp.Unicode()),
                 (b"key", amp.Unicode(optional=True))]
    requiresAnswer = False


class AskCertificate(amp.Command):
    arguments = [(b"server_name", amp.Unicode())]
    requiresAnswer = False


class FetchCertificate(amp.Command):
    """
    The certificate for an on-demand TLS name, as the supervisor would
    choose it for a handshake now (which may start its issuance): its PEM
    pair, or nothing.
    """

    arguments = [(b"server_name", amp.Unicode())]
    response = [(b"pem", BigJSON(optional=True))]


class Exhausted(amp.Command):
    """
    The worker refused a connection for lack of file descriptors (the
    supervisor logs it, at most once per window for all workers).
    """

    arguments = [(b"error", amp.Unicode())]
    requiresAnswer = False


class Log(amp.Command):
    arguments = [(b"line", amp.Unicode())]
    requiresAnswer = False
