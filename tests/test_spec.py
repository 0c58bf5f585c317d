"""
Tests for L{mproxy.spec}: durations, targets, option validation and the JSON
form of the option value types.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mproxy.errors import InvalidOptions, InvalidTarget
from mproxy.spec import (
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
    format_duration,
    normalise_hosts,
    normalise_prefixes,
    from_json,
    given,
    parse_duration,
    parse_target,
    to_json,
)


class ParseDurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        """
        Go-style durations with one or several units parse into seconds.
        """
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration("30s"), 30.0)
        self.assertEqual(parse_duration("1m30s"), 90.0)
        self.assertEqual(parse_duration("2h"), 7200.0)
        self.assertEqual(parse_duration("1h2m3s"), 3723.0)
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertAlmostEqual(parse_duration("250us"), 0.00025)

    def test_bare_seconds(self) -> None:
        """
        A bare number is seconds, integral or not.
        """
        self.assertEqual(parse_duration("30"), 30.0)
        self.assertEqual(parse_duration("0.5"), 0.5)
        self.assertEqual(parse_duration("0"), 0.0)
        self.assertEqual(parse_duration(" 5 "), 5.0)

    def test_invalid(self) -> None:
        """
        Anything that is not a duration raises L{ValueError} naming the text.
        """
        for text in ["", " ", "abc", "-1", "5x", "1m-30s", "nan", "inf", "s", "30 s", "ms"]:
            with self.assertRaises(ValueError, msg=text) as cm:
                parse_duration(text)
            self.assertIn("invalid duration", str(cm.exception))

    def test_negative(self) -> None:
        """
        A negative duration is refused as such.
        """
        for text in ["-1", "-1s", "-0.5", "-1m30s"]:
            with self.assertRaises(ValueError, msg=text) as cm:
                parse_duration(text)
            self.assertEqual(str(cm.exception), f"invalid duration {text!r}: must not be negative")


class FormatDurationTests(SynchronousTestCase):
    def test_formats(self) -> None:
        """
        Durations are shown the way a user would type them.
        """
        self.assertEqual(format_duration(30), "30s")
        self.assertEqual(format_duration(30.0), "30s")
        self.assertEqual(format_duration(0.5), "500ms")
        self.assertEqual(format_duration(90), "1m30s")
        self.assertEqual(format_duration(7200), "2h")
        self.assertEqual(format_duration(3661), "1h1m1s")
        self.assertEqual(format_duration(0), "0s")
        self.assertEqual(format_duration(1.5), "1.5s")

    def test_round_trip(self) -> None:
        """
        What L{format_duration} prints, L{parse_duration} reads back.
        """
        for seconds in [0.5, 1, 30, 90, 7200, 3661, 1.5, 0.25]:
            self.assertEqual(parse_duration(format_duration(seconds)), seconds)


class ParseTargetTests(SynchronousTestCase):
    def test_host_and_port(self) -> None:
        """
        C{host:port} splits into host and integer port.
        """
        self.assertEqual(parse_target("web-1:3000"), ("web-1", 3000))
        self.assertEqual(parse_target("10.0.0.1:8080"), ("10.0.0.1", 8080))
        self.assertEqual(parse_target("my_app.internal:1"), ("my_app.internal", 1))
        self.assertEqual(parse_target("a+b:65535"), ("a+b", 65535))

    def test_default_port(self) -> None:
        """
        Without a port, port 80 is implied.
        """
        self.assertEqual(parse_target("web-1"), ("web-1", 80))
        self.assertEqual(parse_target("localhost"), ("localhost", 80))

    def test_ipv6(self) -> None:
        """
        IPv6 literals are accepted in brackets, with or without a port.
        """
        self.assertEqual(parse_target("[::1]:3000"), ("::1", 3000))
        self.assertEqual(parse_target("[fe80::1]"), ("fe80::1", 80))

    def test_invalid(self) -> None:
        """
        Anything else raises L{InvalidTarget} saying what is allowed.
        """
        for text in [
            "bad target!",
            "a",
            "",
            "http://web:3000",
            "web:3000/path",
            "web:",
            "web:0",
            "web:65536",
            "web:abc",
            "::1",
            "[::1]:0",
            "[::1]:99999",
            "-web:80",
            "_",
            "/",
        ]:
            with self.assertRaises(InvalidTarget, msg=text) as cm:
                parse_target(text)
            allowed = ("use host:port (a host name or IPv4 address, or an IPv6 address in "
                       "brackets; port 1-65535; no scheme or path)")
            if text:
                self.assertEqual(str(cm.exception), f"invalid target {text!r}: {allowed}")
            else:
                self.assertEqual(str(cm.exception), f"empty target: {allowed}")


class NormaliseTests(SynchronousTestCase):
    def test_hosts(self) -> None:
        """
        Hosts are lower-cased and trimmed; no hosts means the default host.
        """
        self.assertEqual(normalise_hosts([]), ("",))
        self.assertEqual(normalise_hosts(["Example.COM", " a.b "]), ("example.com", "a.b"))
        self.assertEqual(ServiceOptions().hosts, ("",))

    def test_prefixes(self) -> None:
        """
        Prefixes gain one leading slash and lose trailing ones; none means C{/}.
        """
        self.assertEqual(normalise_prefixes([]), ("/",))
        self.assertEqual(normalise_prefixes(["api/"]), ("/api",))
        self.assertEqual(normalise_prefixes(["/"]), ("/",))
        self.assertEqual(normalise_prefixes([""]), ("/",))
        self.assertEqual(normalise_prefixes(["//a/b//"]), ("/a/b",))
        self.assertEqual(normalise_prefixes(["/api", "api/"]), ("/api",))


def invalid(testcase: SynchronousTestCase, options: ServiceOptions) -> str:
    with testcase.assertRaises(InvalidOptions) as cm:
        options.validate()
    message = str(cm.exception)
    testcase.assertTrue(message.startswith("service options invalid: "), message)
    return message[len("service options invalid: ") :]


class ValidationTests(SynchronousTestCase):
    """
    Every message of kamal-proxy's option validation.
    """

    def test_defaults_valid(self) -> None:
        """
        The default options are valid.
        """
        ServiceOptions().validate()
        ServiceOptions(hosts=["a.example.com", "*.example.com"]).validate()

    def test_on_demand_needs_tls(self) -> None:
        """
        An on-demand URL without TLS is refused.
        """
        self.assertEqual(
            invalid(self, ServiceOptions(tls_on_demand_url="/allow")),
            "TLS must be enabled to use a TLS on-demand URL",
        )

    def test_on_demand_with_hosts(self) -> None:
        """
        An on-demand URL excludes hosts.
        """
        self.assertEqual(
            invalid(
                self,
                ServiceOptions(tls_enabled=True, tls_on_demand_url="/allow", hosts=["a.com"]),
            ),
            "cannot set hosts when using a TLS on-demand URL",
        )

    def test_on_demand_with_certificate(self) -> None:
        """
        An on-demand URL excludes a custom certificate.
        """
        self.assertEqual(
            invalid(
                self,
                ServiceOptions(
                    tls_enabled=True,
                    tls_on_demand_url="/allow",
                    tls_certificate_path="/c.pem",
                    tls_private_key_path="/k.pem",
                ),
            ),
            "cannot use a custom TLS certificate with a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(
                self,
                ServiceOptions(
                    tls_enabled=True, tls_on_demand_url="/allow", tls_private_key_path="/k.pem"
                ),
            ),
            "cannot use a custom TLS certificate with a TLS on-demand URL",
        )

    def test_on_demand_with_canonical_host(self) -> None:
        """
        An on-demand URL excludes a canonical host.
        """
        self.assertEqual(
            invalid(
                self,
                ServiceOptions(
                    tls_enabled=True, tls_on_demand_url="/allow", canonical_host="a.com"
                ),
            ),
            "cannot set a canonical host when using a TLS on-demand URL",
        )

    def test_on_demand_url_forms(self) -> None:
        """
        The on-demand URL is a local path or an absolute http(s) URL with a host.
        """

        def opts(url: str) -> ServiceOptions:
            return ServiceOptions(tls_enabled=True, tls_on_demand_url=url)

        opts("/allow").validate()
        opts("http://auth.internal:8080/allow").validate()
        opts("https://auth.example.com/allow?x=1").validate()
        self.assertEqual(
            invalid(self, opts("//evil.com/x")),
            "tls-on-demand-url must be a path or an absolute http(s) URL",
        )
        self.assertTrue(
            invalid(self, opts("allow-host")).startswith("unable to parse tls-on-demand-url: ")
        )
        self.assertTrue(
            invalid(self, opts("://x")).startswith("unable to parse tls-on-demand-url: ")
        )
        self.assertEqual(
            invalid(self, opts("ftp://a.com/x")), 'unsupported scheme "ftp" in tls-on-demand-url'
        )
        self.assertEqual(invalid(self, opts("http://")), "missing host in tls-on-demand-url")

    def test_tls_needs_hosts(self) -> None:
        """
        TLS without an on-demand URL needs configured hosts, none of them empty.
        """
        self.assertEqual(
            invalid(self, ServiceOptions(tls_enabled=True)), "host must be set when using TLS"
        )
        self.assertEqual(
            invalid(self, ServiceOptions(tls_enabled=True, hosts=["*.example.com", ""])),
            "host must be set when using TLS",
        )
        ServiceOptions(tls_enabled=True, hosts=["*.example.com"]).validate()

    def test_tls_on_root_only(self) -> None:
        """
        TLS settings belong to the service on C{/}.
        """
        self.assertEqual(
            invalid(
                self, ServiceOptions(tls_enabled=True, hosts=["a.com"], path_prefixes=["/api"])
            ),
            "TLS settings must be specified on the root path service",
        )
        ServiceOptions(tls_enabled=True, hosts=["a.com"], path_prefixes=["/", "/api"]).validate()

    def test_canonical_host_in_hosts(self) -> None:
        """
        The canonical host must be one of the hosts, listed Go-style.
        """
        self.assertEqual(
            invalid(
                self, ServiceOptions(hosts=["a.com", "b.com"], canonical_host="c.com")
            ),
            "canonical-host 'c.com' must be present in the hosts list: [a.com b.com]",
        )
        ServiceOptions(hosts=["a.com", "b.com"], canonical_host="b.com").validate()
        # Without hosts any canonical host is accepted.
        ServiceOptions(canonical_host="c.com").validate()

    def test_certificate_and_key_together(self) -> None:
        """
        A certificate path needs a key path and vice versa.
        """
        self.assertIn(
            "must be given together",
            invalid(self, ServiceOptions(hosts=["a.com"], tls_certificate_path="/c.pem")),
        )
        self.assertIn(
            "must be given together",
            invalid(self, ServiceOptions(hosts=["a.com"], tls_private_key_path="/k.pem")),
        )

    def test_bad_host(self) -> None:
        """
        Host names that cannot be host names are refused.
        """
        self.assertIn("invalid host", invalid(self, ServiceOptions(hosts=["a b.com"])))
        self.assertIn("invalid host", invalid(self, ServiceOptions(hosts=["a.*.com"])))


class DeployRequestTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """
        A request with targets and valid options validates.
        """
        DeployRequest("web", ["aa:1", "bb:2"], readers=["rr:3"]).validate()

    def test_no_targets(self) -> None:
        """
        At least one target is required.
        """
        with self.assertRaises(InvalidOptions) as cm:
            DeployRequest("web", []).validate()
        self.assertEqual(str(cm.exception), 'required flag(s) "target" not set')

    def test_empty_service(self) -> None:
        """
        The service name must not be empty.
        """
        self.assertRaises(InvalidOptions, DeployRequest("", ["aa:1"]).validate)

    def test_bad_target(self) -> None:
        """
        Writers and readers are both checked.
        """
        self.assertRaises(InvalidTarget, DeployRequest("web", ["bad target!"]).validate)
        self.assertRaises(
            InvalidTarget, DeployRequest("web", ["aa:1"], readers=["bad target!"]).validate
        )

    def test_duplicates_merged(self) -> None:
        """
        An address given twice is one target.
        """
        req = DeployRequest("web", ["aa:1", "bb:2", "aa:1"], readers=["rr:1", "rr:1"])
        self.assertEqual((req.targets, req.readers), (("aa:1", "bb:2"), ("rr:1",)))
        req.validate()

    def test_writer_and_reader(self) -> None:
        """
        One address cannot be both a writer and a reader.
        """
        with self.assertRaises(InvalidOptions) as cm:
            DeployRequest("web", ["aa:1"], readers=["aa:1"]).validate()
        self.assertEqual(str(cm.exception), "aa:1 is given both as a target and as a read target")

    def test_empty_target(self) -> None:
        """
        An empty address is refused, not taken for the service's name.
        """
        with self.assertRaises(InvalidTarget) as cm:
            DeployRequest("web", [""]).validate()
        self.assertTrue(str(cm.exception).startswith("empty target: use host:port"))

    def test_deploy_timeout(self) -> None:
        """
        A deploy timeout of zero (or less) is refused: it would fail even a
        healthy target.  With C{force} there is no wait, so any value goes.
        """
        for value in (0, -1):
            with self.assertRaises(InvalidOptions) as cm:
                DeployRequest("web", ["aa:1"], deploy_timeout=value).validate()
            self.assertEqual(str(cm.exception), "deploy-timeout must be greater than zero")
        DeployRequest("web", ["aa:1"], deploy_timeout=0, force=True).validate()
        with self.assertRaises(InvalidOptions) as cm:
            DeployRequest("web", ["aa:1"], drain_timeout=-1).validate()
        self.assertEqual(str(cm.exception), "drain-timeout must not be negative")
        DeployRequest("web", ["aa:1"], drain_timeout=0).validate()

    def test_target_options(self) -> None:
        """
        Health-check and target options out of range are refused by the
        request itself, whichever client sent it.
        """
        cases = [
            (HealthCheckConfig(port=70000), "invalid health-check-port 70000"),
            (HealthCheckConfig(port=-1), "invalid health-check-port -1"),
            (HealthCheckConfig(interval=0), "health-check-interval must be greater than zero"),
            (HealthCheckConfig(timeout=-2), "health-check-timeout must be greater than zero"),
        ]
        for hc, message in cases:
            with self.assertRaises(InvalidOptions) as cm:
                DeployRequest("web", ["aa:1"],
                              target_options=TargetOptions(health_check=hc)).validate()
            self.assertEqual(str(cm.exception), message)
        for kw, message in [
            ({"target_timeout": 0}, "target-timeout must be greater than zero"),
            ({"buffer_memory": -1}, "buffer-memory must not be negative"),
            ({"max_request_body": -1}, "max-request-body must not be negative"),
            ({"max_response_body": -5}, "max-response-body must not be negative"),
            ({"retry_timeout": -1}, "retry-timeout must not be negative"),
        ]:
            with self.assertRaises(InvalidOptions) as cm:
                DeployRequest("web", ["aa:1"], target_options=TargetOptions(**kw)).validate()
            self.assertEqual(str(cm.exception), message)

    def test_bad_options(self) -> None:
        """
        Service options are validated too.
        """
        self.assertRaises(
            InvalidOptions,
            DeployRequest("web", ["aa:1"], options=ServiceOptions(tls_enabled=True)).validate,
        )


class JSONTests(SynchronousTestCase):
    def test_service_options_round_trip(self) -> None:
        """
        Service options survive a trip through JSON text.
        """
        options = ServiceOptions(
            hosts=["a.com", "*.b.com"],
            path_prefixes=["/api", "/app"],
            strip_prefix=False,
            tls_enabled=False,
            canonical_host="a.com",
            writer_affinity_timeout=2.5,
            read_targets_accept_websockets=True,
            exclude_metrics_paths=["/up"],
            client_ip_header="CF-Connecting-IP",
        )
        text = json.dumps(to_json(options))
        back = from_json(ServiceOptions, json.loads(text))
        self.assertEqual(back, options)

    def test_target_options_round_trip(self) -> None:
        """
        Target options, with their nested health-check config, survive too.
        """
        options = TargetOptions(
            health_check=HealthCheckConfig(path="/health", port=9000, interval=0.5,
                                           timeout=2, host="h.internal"),
            target_timeout=10,
            buffer_requests=True,
            max_request_body=1024,
            log_request_headers=["X-A"],
            forward_headers=False,
        )
        text = json.dumps(to_json(options))
        back = from_json(TargetOptions, json.loads(text))
        self.assertEqual(back, options)
        self.assertIsInstance(back.health_check, HealthCheckConfig)

    def test_unknown_keys_ignored(self) -> None:
        """
        Keys from a newer version are ignored; missing keys take defaults.
        """
        back = from_json(ServiceOptions, {"hosts": ["a.com"], "future": 1})
        self.assertEqual(back, ServiceOptions(hosts=["a.com"]))

    def test_json_is_plain(self) -> None:
        """
        The JSON form uses lists, not tuples, and is serialisable.
        """
        data = to_json(ServiceOptions())
        self.assertEqual(data["hosts"], [""])
        self.assertEqual(data["path_prefixes"], ["/"])
        json.dumps(to_json(TargetOptions()))

    def test_request_round_trip(self) -> None:
        """
        A whole deploy request survives JSON, nested options included.
        """
        req = DeployRequest(
            "web", ["aa:1", "bb:2"], readers=["rr:1"],
            options=ServiceOptions(hosts=["a.com"]),
            target_options=TargetOptions(health_check=HealthCheckConfig(port=9)),
            deploy_timeout=5, drain_timeout=0.5, force=True,
        )
        back = from_json(DeployRequest, json.loads(json.dumps(to_json(req))))
        self.assertEqual(back, req)

    def test_wrong_types(self) -> None:
        """
        A value of the wrong type is a L{TypeError} naming the field; numbers
        are not booleans, and whole numbers are accepted for durations.
        """
        for cls, data, name in [
            (DeployRequest, {"service": "web", "targets": 5}, "targets"),
            (DeployRequest, {"service": "web", "targets": [1]}, "targets"),
            (DeployRequest, {"service": 1, "targets": []}, "service"),
            (DeployRequest, {"service": "w", "targets": [], "deploy_timeout": "x"},
             "deploy_timeout"),
            (DeployRequest, {"service": "w", "targets": [], "force": 1}, "force"),
            (TargetOptions, {"health_check": {"port": "80"}}, "port"),
            (TargetOptions, {"max_request_body": 1.5}, "max_request_body"),
            (ServiceOptions, {"hosts": "a.com"}, "hosts"),
        ]:
            with self.assertRaises(TypeError, msg=data) as cm:
                from_json(cls, data)
            self.assertIn(name, str(cm.exception))
        with self.assertRaises(TypeError):
            from_json(DeployRequest, {"service": "w", "targets": [], "options": 3})
        with self.assertRaises(TypeError):
            from_json(DeployRequest, [])
        self.assertEqual(from_json(HealthCheckConfig, {"interval": 2}).interval, 2.0)


class GivenTests(SynchronousTestCase):
    def test_given(self) -> None:
        """
        L{given} keeps the values that were given, so that the others take
        the defaults declared in L{mproxy.spec}.
        """
        self.assertEqual(given(a=1, b=None, c=False, d=""), {"a": 1, "c": False, "d": ""})
        self.assertEqual(HealthCheckConfig(**given(path=None, port=9)), HealthCheckConfig(port=9))
