"""
One metrics scrape for all processes: the supervisor's own families
(deploys, target health, its process) with every worker's C{mproxy_*}
families added sample by sample (counters, histograms and gauges sum
across workers; a C{_created} time is the earliest).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


def merged_exposition(registry: Any, workers: Iterable[list[Any]]) -> bytes:
    """
    The text exposition of C{registry} plus the workers' families (each a
    list as L{mproxy.workers.worker.metric_families} gives it).
    """
    order: list[str] = []
    families: dict[str, tuple[str, str, dict[tuple[str, tuple], float]]] = {}

    def add(name: str, kind: str, doc: str, samples: Iterable[Any]) -> None:
        entry = families.get(name)
        if entry is None:
            entry = families[name] = (kind, doc, {})
            order.append(name)
        values = entry[2]
        for sample_name, labels, value in samples:
            key = (sample_name, tuple(sorted(labels.items())))
            if key not in values:
                values[key] = value
            elif sample_name.endswith("_created"):
                values[key] = min(values[key], value)
            else:
                values[key] += value

    for family in registry.collect():
        add(family.name, family.type, family.documentation,
            [(s.name, s.labels, s.value) for s in family.samples])
    for worker in workers:
        for name, kind, doc, samples in worker:
            add(name, kind, doc, samples)

    class Collected:
        def collect(self) -> list[Any]:
            out = []
            for name in order:
                kind, doc, values = families[name]
                m = Metric(name, doc, kind)
                for (sample_name, labels), value in values.items():
                    m.add_sample(sample_name, dict(labels), value)
                out.append(m)
            return out

    merged = CollectorRegistry(auto_describe=False)
    merged.register(Collected())  # type: ignore[arg-type]
    return generate_latest(merged)


class PooledMetricsResource(Resource):
    """
    The Prometheus exposition for any path, the workers' families asked for
    at each scrape (C{worker_families()}: a Deferred list of them).
    """

    isLeaf = True

    def __init__(self, metrics: Any, worker_families: Callable[[], Deferred[list[Any]]]) -> None:
        super().__init__()
        self.metrics = metrics
        self.worker_families = worker_families

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))

        def send(workers: list[Any]) -> None:
            if getattr(request, "_disconnected", False):
                return
            body = merged_exposition(self.metrics.registry, workers)
            if request.method == b"HEAD":
                request.setHeader(b"content-length", b"%d" % len(body))
            else:
                request.write(body)
            request.finish()

        def failed(f: Any) -> None:
            if getattr(request, "_disconnected", False):
                return
            request.setResponseCode(500)
            request.finish()

        self.worker_families().addCallbacks(send, failed)
        return NOT_DONE_YET

    render_HEAD = render_GET
