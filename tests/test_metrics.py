"""
Tests for L{mproxy.metrics}.
"""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mproxy.metrics import Metrics, MetricsResource


class MetricsTests(SynchronousTestCase):
    def test_observe_counts_and_bounds_methods(self) -> None:
        m = Metrics()
        m.observe("app", "GET", 200, 0.003)
        m.observe("app", "GET", 200, 0.2)
        m.observe("app", "get", 404, 0.001)
        m.observe("", "BREW", 404, 0.001)
        text = m.exposition().decode()
        self.assertIn(
            'mproxy_http_requests_total{method="GET",service="app",status="200"} 2.0', text
        )
        self.assertIn(
            'mproxy_http_requests_total{method="OTHER",service="app",status="404"} 1.0', text
        )
        self.assertIn(
            'mproxy_http_requests_total{method="OTHER",service="",status="404"} 1.0', text
        )
        self.assertIn(
            'mproxy_http_request_duration_seconds_bucket{le="0.005",method="GET",'
            'service="app",status="200"} 1.0',
            text,
        )

    def test_inflight_gauge(self) -> None:
        m = Metrics()
        m.enter("app")
        m.enter("app")
        m.leave("app")
        self.assertIn('mproxy_http_in_flight_requests{service="app"} 1.0',
                      m.exposition().decode())

    def test_resource_serves_any_path(self) -> None:
        m = Metrics()
        m.deploy("app", "ok")
        r = MetricsResource(m)
        req = DummyRequest([b"anything"])
        body = r.render_GET(req)
        self.assertIn(b'mproxy_deploys_total{outcome="ok",service="app"} 1.0', body)
        self.assertTrue(req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))

    def test_target_health_gauge(self) -> None:
        """
        Target health is read from the source at each scrape, 1 or 0 per
        service and target; removed targets disappear.
        """
        m = Metrics()
        targets = [("app", "a:1", True), ("app", "b:2", False)]
        m.watch_targets(lambda: list(targets))
        text = m.exposition().decode()
        self.assertIn('mproxy_target_healthy{service="app",target="a:1"} 1.0', text)
        self.assertIn('mproxy_target_healthy{service="app",target="b:2"} 0.0', text)
        targets.pop()
        self.assertNotIn('target="b:2"', m.exposition().decode())

    def test_retries_ejections_unavailable(self) -> None:
        """
        Retries, ejections and "no healthy targets" answers are counted.
        """
        m = Metrics()
        m.retried("app")
        m.retried("app")
        m.ejected("app", "a:1")
        m.unavailable("app")
        text = m.exposition().decode()
        self.assertIn('mproxy_retries_total{service="app"} 2.0', text)
        self.assertIn('mproxy_target_ejections_total{service="app",target="a:1"} 1.0', text)
        self.assertIn('mproxy_no_healthy_target_total{service="app"} 1.0', text)
