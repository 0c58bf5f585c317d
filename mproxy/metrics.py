"""
Prometheus metrics, served on C{--metrics-port} (off by default) for any
path.  Labels are bounded: the service name, the method (unknown methods
collapse to C{OTHER}) and the status code; never paths or hosts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from zope.interface import implementer

from mproxy.http.interfaces import IRequestMetrics

KNOWN_METHODS = frozenset(
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"]
)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@implementer(IRequestMetrics)
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "mproxy_http_requests_total",
            "HTTP requests completed",
            ["service", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mproxy_http_request_duration_seconds",
            "HTTP request duration",
            ["service", "method", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "mproxy_http_in_flight_requests",
            "Requests currently inside a service",
            ["service"],
            registry=self.registry,
        )
        self.deploys = Counter(
            "mproxy_deploys_total",
            "Deploys by outcome",
            ["service", "outcome"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, service: str, method: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (service, method, str(status))
        pair = self._children.get(key)
        if pair is None:
            pair = (self.requests.labels(*key), self.duration.labels(*key))
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def enter(self, service: str) -> None:
        self.inflight.labels(service).inc()

    def leave(self, service: str) -> None:
        self.inflight.labels(service).dec()

    def deploy(self, service: str, outcome: str) -> None:
        self.deploys.labels(service, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """
    The Prometheus text exposition for any path.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()

    render_HEAD = render_GET
