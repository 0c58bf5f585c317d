"""
Prometheus metrics, served on C{--metrics-port} (off by default) for any
path.  Labels are bounded: the service name, the target address, the method
(unknown methods collapse to C{OTHER}) and the status code; never paths or
hosts.

Target health (C{mproxy_target_healthy}, 1 or 0 per service and target) is
read from the router when scraped (L{Metrics.watch_targets}); retries,
ejections and requests answered "no healthy targets" are counted as they
happen.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
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
        self.retries = Counter(
            "mproxy_retries_total",
            "Requests sent again because they could not be delivered to a target",
            ["service"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "mproxy_target_ejections_total",
            "Targets taken out of rotation after a refused, reset or timed-out connection",
            ["service", "target"],
            registry=self.registry,
        )
        self.no_target = Counter(
            "mproxy_no_healthy_target_total",
            "Requests answered with the 503 page because no target was healthy",
            ["service"],
            registry=self.registry,
        )
        self._targets: Callable[[], Iterable[tuple[str, str, bool]]] = lambda: ()
        self.registry.register(_HealthCollector(self))
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def watch_targets(self, source: Callable[[], Iterable[tuple[str, str, bool]]]) -> None:
        """
        C{source()} gives C{(service, target, healthy)} for every deployed
        target; it is asked at each scrape.
        """
        self._targets = source

    def retried(self, service: str) -> None:
        self.retries.labels(service).inc()

    def ejected(self, service: str, target: str) -> None:
        self.ejections.labels(service, target).inc()

    def unavailable(self, service: str) -> None:
        self.no_target.labels(service).inc()

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


class _HealthCollector:
    """
    C{mproxy_target_healthy}, built from the targets deployed at scrape time
    (so removed targets disappear).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        g = GaugeMetricFamily("mproxy_target_healthy",
                              "1 when the target is healthy (in rotation), else 0",
                              labels=["service", "target"])
        for service, target, healthy in self.metrics._targets():
            g.add_metric([service, target], 1.0 if healthy else 0.0)
        return [g]


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
