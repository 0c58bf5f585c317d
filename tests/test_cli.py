"""
Tests for the C{mproxy} command line (L{mproxy.cli}): parsing, both deploy
spellings, error reporting, and whole commands run against an in-memory
server on a fake reactor.
"""

from __future__ import annotations

import json
import os
from io import StringIO
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

import mproxy
from mproxy.cli import parsing
from mproxy.cli.main import main
from mproxy.cli.output import (
    NO_SERVICES,
    ProgressPrinter,
    can_colour,
    can_rewrite,
    deploy_summary,
    format_table,
)
from mproxy.cli.requests import deploy_request
from mproxy.cli.streams import Streams
from mproxy.config import SERVER_OPTIONS
from mproxy.control.server import ControlProtocol
from mproxy.controller import Controller
from mproxy.errors import InvalidOptions
from mproxy.logging import ListLogger
from mproxy.router import Router
from mproxy.spec import HealthCheckConfig
from mproxy.target import Target

ALLOWED = ("use host:port (a host name or IPv4 address, or an IPv6 address in "
           "brackets; port 1-65535; no scheme or path)")


def run(argv: Sequence[str], reactor: Any = None) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    status = main(list(argv), Streams(out, err), reactor)
    return status, out.getvalue(), err.getvalue()


class AutoProbe:
    """
    Answers every probe at once with the status set for its address (200 by
    default), or never when the status is C{None}.
    """

    def __init__(self) -> None:
        self.status: dict[str, int | None] = {}

    def __call__(self, target: Target, config: HealthCheckConfig) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        code = self.status.get(target.address, 200)
        if code is not None:
            d.callback(code)
        return d


class FakeReactor(MemoryReactorClock):
    """
    A memory reactor whose UNIX connections reach an in-memory control
    server (or fail as if no server were running), and whose C{run} pumps
    them, advancing the clock when nothing else happens, until stopped.
    """

    def __init__(self, server: bool = True) -> None:
        super().__init__()
        self.router = Router()
        self.probe = AutoProbe()
        self.controller = Controller(self.router, self, self.probe, None, ListLogger())
        self.server = server
        self.pumps: list[iosim.IOPump] = []
        self.paths: list[str] = []

    def connectUNIX(self, address: str, factory: Any, timeout: float = 30,
                    checkPID: int = 0) -> Any:
        connector = super().connectUNIX(address, factory, timeout, checkPID)
        self.paths.append(address)
        if not self.server:
            factory.clientConnectionFailed(
                connector, Failure(ConnectError(2, "No such file or directory"))
            )
            return connector
        client = factory.buildProtocol(None)
        server = ControlProtocol(self.controller, ListLogger())
        self.pumps.append(
            iosim.connect(server, iosim.makeFakeServer(server), client,
                          iosim.makeFakeClient(client), greet=False)
        )
        return connector

    def run(self, installSignalHandlers: bool = True) -> None:  # type: ignore[override]
        self.running = True
        self.hasRun = True
        hooks, self.whenRunningHooks = self.whenRunningHooks, []
        for f, a, kw in hooks:
            f(*a, **kw)
        for _ in range(10000):
            if not self.running:
                return
            for p in self.pumps:
                p.flush()
            if self.running:
                self.advance(0.5)
        raise AssertionError("the command never finished")


class GeneralTests(SynchronousTestCase):
    def test_version(self) -> None:
        """
        C{--version} prints the version.
        """
        self.assertEqual(run(["--version"]), (0, f"mproxy {mproxy.__version__}\n", ""))

    def test_overview(self) -> None:
        """
        No arguments, C{help}, C{-h} and C{--help} print the overview.
        """
        for argv in ([], ["help"], ["-h"], ["--help"]):
            status, out, err = run(argv)
            self.assertEqual(status, 0)
            self.assertIn("Usage:", out)
            for command in ("run", "deploy", "list", "remove", "pause", "resume", "stop",
                            "rollout deploy"):
                self.assertIn(command, out)
            self.assertEqual(err, "")

    def test_help_run(self) -> None:
        """
        C{help run} lists every server option with its environment variable.
        """
        status, out, err = run(["help", "run"])
        self.assertEqual(status, 0)
        for spec in SERVER_OPTIONS:
            self.assertIn(f"--{spec.name}", out)
            self.assertIn(f"MPROXY_{spec.env}", out)

    def test_help_commands(self) -> None:
        """
        C{help COMMAND} and C{COMMAND --help} print that command's flags to the
        output stream.
        """
        for argv in (["help", "deploy"], ["deploy", "--help"], ["deploy", "-h"]):
            status, out, err = run(argv)
            self.assertEqual(status, 0, argv)
            for flag in ("--target", "--host", "--tls", "--ssl", "--deploy-timeout",
                         "--timeout", "--health-check-path", "--drain-timeout", "--force"):
                self.assertIn(flag, out, argv)
        for argv in (["help", "rollout", "set"], ["rollout", "set", "--help"]):
            status, out, err = run(argv)
            self.assertEqual(status, 0, argv)
            self.assertIn("--percent", out)
        status, out, err = run(["help", "ls"])
        self.assertIn("--json", out)
        status, out, err = run(["help", "rollout"])
        self.assertEqual(status, 0)
        self.assertIn("rollout deploy|set|stop", out)

    def test_help_one_default_per_option(self) -> None:
        """
        Every option's help states its default at most once, durations as
        durations.
        """
        import re

        for topic in ("run", "deploy", "pause", "stop", "rollout deploy"):
            status, out, err = run(["help", *topic.split()])
            self.assertEqual(status, 0)
            options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
            for text in options:
                self.assertLessEqual(text.count("(default"), 1, (topic, text))
        status, out, err = run(["help", "run"])
        self.assertIn("(default 30s)", " ".join(out.split()))
        self.assertNotIn("30.0", out)

    def test_unknown_help_topic(self) -> None:
        """
        Help on an unknown topic is an error.
        """
        self.assertEqual(run(["help", "nope"]), (1, "", 'Error: unknown help topic "nope"\n'))

    def test_unknown_command(self) -> None:
        """
        An unknown command is an error, without a traceback.
        """
        status, out, err = run(["frobnicate"])
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith('Error: unknown command "frobnicate"'), err)
        status, out, err = run(["rollout", "frobnicate", "web"])
        self.assertEqual(status, 1)
        self.assertEqual(err, 'Error: unknown command "frobnicate" for "mproxy rollout"\n')

    def test_unknown_flag(self) -> None:
        """
        An unknown flag is C{Error: ...} and exit status 1.
        """
        self.assertEqual(
            run(["deploy", "web-1:3000", "--bogus"]),
            (1, "", "Error: unrecognized arguments: --bogus\n"),
        )
        status, out, err = run(["list", "--bogus"])
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("Error: "))

    def test_missing_argument(self) -> None:
        """
        A missing positional argument is an error.
        """
        status, out, err = run(["deploy"])
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("Error: "), err)
        self.assertIn("TARGET|SERVICE", err)
        status, out, err = run(["pause"])
        self.assertEqual(status, 1)
        self.assertIn("SERVICE", err)

    def test_bad_values(self) -> None:
        """
        Values that do not parse are errors naming the flag.
        """
        status, out, err = run(["run", "--http-port", "abc"])
        self.assertEqual((status, err), (1, "Error: argument --http-port: invalid port 'abc'\n"))
        status, out, err = run(["deploy", "web:1", "--deploy-timeout", "soon"])
        self.assertEqual(status, 1)
        self.assertIn("invalid duration 'soon'", err)
        status, out, err = run(["deploy", "web:1", "--tls=maybe"])
        self.assertEqual(status, 1)
        self.assertIn('invalid argument "maybe" for "--tls" flag', err)
        status, out, err = run(["deploy", "web:1", "--buffer-memory", "-1"])
        self.assertEqual(status, 1)
        self.assertIn("must not be negative", err)

    def test_invalid_target(self) -> None:
        """
        An invalid target is refused before contacting the server.
        """
        self.assertEqual(
            run(["deploy", "bad_target!"], FakeReactor(server=False)),
            (1, "", "Error: invalid target 'bad_target!': " + ALLOWED + "\n"),
        )


def parse_deploy(*argv: str) -> Any:
    return deploy_request(parsing.deploy_command().parse(list(argv)))


class DeployParsingTests(SynchronousTestCase):
    def test_retry_timeout(self) -> None:
        """
        C{--retry-timeout DURATION} goes into the target options (so the
        state file keeps it); help lists it with its default.
        """
        req = parse_deploy("web:1", "--retry-timeout", "10s")
        self.assertEqual(req.target_options.retry_timeout, 10.0)
        self.assertEqual(parse_deploy("web:1", "--retry-timeout", "1m30s")
                         .target_options.retry_timeout, 90.0)
        help_text = parsing.deploy_command().parser.format_help()
        self.assertIn("--retry-timeout DURATION", help_text)
        self.assertIn("(default 0s)", help_text.split("--retry-timeout")[1].split("--")[0])

    def test_seed_spelling(self) -> None:
        """
        C{deploy HOST:PORT}: the argument is the target, the service is
        C{default}, or the first host (lower-cased) when hosts are given.
        """
        req = parse_deploy("web-1:3000")
        self.assertEqual((req.service, req.targets), ("default", ("web-1:3000",)))
        self.assertEqual(req.options.hosts, ("",))
        req = parse_deploy("web-1:3000", "--host", "A")
        self.assertEqual((req.service, req.targets), ("a", ("web-1:3000",)))
        req = parse_deploy("web-1:3000", "--host", "App.Example.com", "--host", "b.example.com")
        self.assertEqual(req.service, "app.example.com")
        self.assertEqual(req.options.hosts, ("app.example.com", "b.example.com"))

    def test_kamal_spelling(self) -> None:
        """
        With C{--target} the argument is the service; targets may be repeated
        and comma-separated.
        """
        req = parse_deploy("app", "--target", "a-1:1,b-1:2", "--target", "c-1:3")
        self.assertEqual(req.service, "app")
        self.assertEqual(req.targets, ("a-1:1", "b-1:2", "c-1:3"))
        req = parse_deploy("app", "--target=a-1:1", "--read-target", "r-1:1,r-2:2")
        self.assertEqual(req.readers, ("r-1:1", "r-2:2"))

    def test_defaults(self) -> None:
        """
        Flags not given take the defaults of mproxy.spec.
        """
        req = parse_deploy("web:1")
        self.assertEqual(req.deploy_timeout, 30.0)
        self.assertEqual(req.drain_timeout, 30.0)
        self.assertFalse(req.force)
        hc = req.target_options.health_check
        self.assertEqual((hc.path, hc.interval, hc.timeout, hc.port, hc.host),
                         ("/up", 1.0, 5.0, 0, ""))
        self.assertEqual(req.target_options.target_timeout, 30.0)
        self.assertEqual(req.target_options.buffer_memory, 1 << 20)
        self.assertTrue(req.options.strip_prefix)
        self.assertTrue(req.options.tls_redirect)
        self.assertFalse(req.options.tls_enabled)
        self.assertEqual(req.options.writer_affinity_timeout, 1.0)
        self.assertEqual(req.target_options.retry_timeout, 0.0)

    def test_ssl_is_tls(self) -> None:
        """
        C{--ssl} is C{--tls}, bare or with a value; C{--tls=false} is off.
        """
        for flag in ("--ssl", "--tls", "--ssl=true", "--tls=1"):
            req = parse_deploy("web:1", "--host", "a.com", flag)
            self.assertTrue(req.options.tls_enabled, flag)
        for flag in ("--tls=false", "--ssl=false", "--tls=0"):
            req = parse_deploy("web:1", "--host", "a.com", flag)
            self.assertFalse(req.options.tls_enabled, flag)
        req = parse_deploy("web:1", "--host", "a.com", "--ssl-staging")
        self.assertTrue(req.options.tls_staging)

    def test_timeout_alias(self) -> None:
        """
        C{--timeout} is C{--deploy-timeout}; durations use Go syntax or seconds.
        """
        self.assertEqual(parse_deploy("web:1", "--timeout", "5s").deploy_timeout, 5.0)
        self.assertEqual(parse_deploy("web:1", "--deploy-timeout=1m30s").deploy_timeout, 90.0)
        self.assertEqual(parse_deploy("web:1", "--timeout", "0.5").deploy_timeout, 0.5)
        self.assertEqual(parse_deploy("web:1", "--drain-timeout", "500ms").drain_timeout, 0.5)

    def test_flags(self) -> None:
        """
        The other deploy flags reach the request.
        """
        req = parse_deploy(
            "web:1", "--path-prefix", "api,/app/", "--strip-path-prefix=false", "--force",
            "--health-check-path", "/hc", "--health-check-interval", "2s",
            "--health-check-timeout", "3s", "--health-check-port", "9000",
            "--health-check-host", "h.internal", "--target-timeout", "10s",
            "--buffer-requests", "--max-request-body", "100", "--buffer-responses",
            "--max-response-body", "200", "--buffer-memory", "300",
            "--log-request-header", "X-A,X-B", "--log-response-header", "X-C",
            "--exclude-metrics-path", "/up", "--client-ip-header", "CF-Connecting-IP",
            "--scope-cookie-paths", "--writer-affinity-timeout", "250ms",
            "--read-target-websockets",
        )
        self.assertEqual(req.options.path_prefixes, ("/api", "/app"))
        self.assertFalse(req.options.strip_prefix)
        self.assertTrue(req.force)
        hc = req.target_options.health_check
        self.assertEqual((hc.path, hc.interval, hc.timeout, hc.port, hc.host),
                         ("/hc", 2.0, 3.0, 9000, "h.internal"))
        to = req.target_options
        self.assertEqual(
            (to.target_timeout, to.buffer_requests, to.max_request_body, to.buffer_responses,
             to.max_response_body, to.buffer_memory),
            (10.0, True, 100, True, 200, 300),
        )
        self.assertEqual(to.log_request_headers, ("X-A", "X-B"))
        self.assertEqual(to.log_response_headers, ("X-C",))
        self.assertTrue(to.scope_cookie_paths)
        self.assertEqual(req.options.exclude_metrics_paths, ("/up",))
        self.assertEqual(req.options.client_ip_header, "CF-Connecting-IP")
        self.assertEqual(req.options.writer_affinity_timeout, 0.25)
        self.assertTrue(req.options.read_targets_accept_websockets)

    def test_max_body_needs_buffering(self) -> None:
        """
        A maximum body size needs the matching buffering.
        """
        with self.assertRaises(InvalidOptions) as cm:
            parse_deploy("web:1", "--max-request-body", "10")
        self.assertEqual(str(cm.exception),
                         "max-request-body can only be set when request buffering is enabled")
        with self.assertRaises(InvalidOptions) as cm:
            parse_deploy("web:1", "--max-response-body", "10")
        self.assertEqual(str(cm.exception),
                         "max-response-body can only be set when response buffering is enabled")
        parse_deploy("web:1", "--max-request-body", "10", "--buffer-requests")
        with self.assertRaises(InvalidOptions):
            parse_deploy("web:1", "--max-request-body", "0")

    def test_max_body_with_buffering_given_as_false(self) -> None:
        """
        As Kamal sends it: C{--buffer-requests=false --max-request-body=N}
        (and the same for responses) is accepted, since the buffering flag was
        given; nothing is buffered, so the limit is not enforced.
        """
        req = parse_deploy("web:1", "--buffer-requests=false", "--max-request-body=10",
                           "--buffer-responses=false", "--max-response-body=20")
        to = req.target_options
        self.assertEqual(
            (to.buffer_requests, to.max_request_body, to.buffer_responses,
             to.max_response_body),
            (False, 10, False, 20),
        )
        self.assertEqual(
            run(["deploy", "web:1", "--max-request-body", "10"]),
            (1, "", "Error: max-request-body can only be set when request buffering is "
                    "enabled\n"),
        )

    def test_empty_target_refused(self) -> None:
        """
        C{--target ''} is refused, not taken for the seed spelling (which
        would deploy a target named after the service).
        """
        for argv in (["deploy", "app", "--target", ""], ["deploy", "app", "--target=,"]):
            self.assertEqual(
                run(argv),
                (1, "", "Error: --target is empty: give at least one host:port\n"),
            )

    def test_duplicate_targets_merged(self) -> None:
        """
        A target given twice is deployed once.
        """
        req = parse_deploy("app", "--target", "aa:1,aa:1", "--target", "bb:2,aa:1")
        self.assertEqual(req.targets, ("aa:1", "bb:2"))

    def test_timeouts_and_negative_durations(self) -> None:
        """
        C{--deploy-timeout 0} is refused with a clear message (it would fail
        even a healthy target); a negative duration is named as such, also
        when written as a separate word after its flag.
        """
        self.assertEqual(
            run(["deploy", "web:1", "--deploy-timeout", "0"]),
            (1, "", "Error: deploy-timeout must be greater than zero\n"),
        )
        for argv in (["deploy", "web:1", "--drain-timeout", "-1s"],
                     ["deploy", "web:1", "--drain-timeout=-1s"]):
            self.assertEqual(
                run(argv),
                (1, "", "Error: argument --drain-timeout: invalid duration '-1s': must not be "
                        "negative\n"),
            )
        status, out, err = run(["pause", "web", "--max-pause", "-5"])
        self.assertEqual((status, err), (1, "Error: argument --max-pause: invalid duration "
                                            "'-5': must not be negative\n"))

    def test_forward_headers_default(self) -> None:
        """
        Forwarding client X-Forwarded-* headers defaults to the opposite of TLS;
        an explicit flag wins.
        """
        self.assertTrue(parse_deploy("web:1").target_options.forward_headers)
        self.assertFalse(
            parse_deploy("web:1", "--host", "a.com", "--tls").target_options.forward_headers
        )
        self.assertTrue(
            parse_deploy("web:1", "--host", "a.com", "--tls", "--forward-headers")
            .target_options.forward_headers
        )
        self.assertFalse(
            parse_deploy("web:1", "--forward-headers=false").target_options.forward_headers
        )

    def test_validation(self) -> None:
        """
        Service options are validated on the client, with kamal-proxy's
        messages.
        """
        self.assertEqual(
            run(["deploy", "web:1", "--tls"]),
            (1, "", "Error: service options invalid: host must be set when using TLS\n"),
        )
        status, out, err = run(["deploy", "web:1", "--host", "a.com", "--canonical-host",
                                "b.com"])
        self.assertEqual(status, 1)
        self.assertIn("canonical-host 'b.com' must be present in the hosts list: [a.com]", err)
        with self.assertRaises(InvalidOptions):
            parse_deploy("web:1", "--health-check-interval", "0s")

    def test_certificate_paths_absolute(self) -> None:
        """
        Certificate paths are made absolute on the client.
        """
        req = parse_deploy("web:1", "--host", "a.com", "--tls", "--tls-certificate-path",
                           "c.pem", "--tls-private-key-path", "k.pem")
        self.assertEqual(req.options.tls_certificate_path, os.path.abspath("c.pem"))
        self.assertEqual(req.options.tls_private_key_path, os.path.abspath("k.pem"))


class TableTests(SynchronousTestCase):
    ROWS = [
        {"service": "api", "hosts": ["api.example.com", "b.com"], "paths": ["/api", "/v2"],
         "targets": ["api-1:3000", "api-2:3000"], "state": "running", "tls": True,
         "certificates": {}},
        {"service": "default", "hosts": [], "paths": ["/"], "targets": ["web-1:3000"],
         "state": "paused", "tls": False},
    ]

    def test_plain(self) -> None:
        """
        Without colour, columns are padded to their widest cell and separated
        by two spaces; no hosts shows as C{*}.
        """
        self.assertEqual(
            format_table(self.ROWS, color=False),
            "Service  Host                   Path      Target                  State    TLS\n"
            "api      api.example.com,b.com  /api,/v2  api-1:3000, api-2:3000  running  yes\n"
            "default  *                      /         web-1:3000              paused   no\n",
        )

    def test_empty(self) -> None:
        """
        With no services the table says so.
        """
        self.assertEqual(format_table([], color=False), NO_SERVICES)
        self.assertEqual(
            NO_SERVICES, "No services deployed (deploy one with `mproxy deploy HOST:PORT`)\n"
        )

    def test_health_and_rollout(self) -> None:
        """
        Each target shows its health; a Rollout column appears when a service
        has a rollout slot, with its targets, their health and the split.
        """
        rows = [
            dict(self.ROWS[1], health={"web-1:3000": "healthy"}, rollout={
                "targets": ["canary:3000"], "health": {"canary:3000": "unhealthy"},
                "percent": 10, "allowlist": ["vip", "beta"]}),
            dict(self.ROWS[1], service="other", health={"web-1:3000": "adding"},
                 rollout={"targets": ["c2:1"], "health": {}, "percent": None,
                          "allowlist": []}),
            dict(self.ROWS[1], service="plain", rollout=None),
        ]
        self.assertEqual(
            format_table(rows, color=False),
            "Service  Host  Path  Target                State   TLS  Rollout\n"
            "default  *     /     web-1:3000 (healthy)  paused  no   canary:3000 (unhealthy); "
            "10%, allowlist vip,beta\n"
            "other    *     /     web-1:3000 (adding)   paused  no   c2:1; no traffic\n"
            "plain    *     /     web-1:3000            paused  no   -\n",
        )

    def test_health_since_and_error(self) -> None:
        """
        With the details of each target's health, the Target cell says since
        when, and why an unhealthy one is.
        """
        rows = [dict(self.ROWS[1], targets=["a:1", "b:2"],
                     health={"a:1": "healthy", "b:2": "unhealthy"},
                     target_health={
                         "a:1": {"health": "healthy", "since": "2026-12-01T12:00:00Z",
                                 "last_error": "request timed out"},
                         "b:2": {"health": "unhealthy", "since": "2026-12-01T12:20:01Z",
                                 "last_error": "Connection was refused"}})]
        self.assertIn(
            "a:1 (healthy since 2026-12-01 12:00:00Z), "
            "b:2 (unhealthy since 2026-12-01 12:20:01Z: Connection was refused)",
            format_table(rows, color=False),
        )

    def test_color(self) -> None:
        """
        On a terminal the header is italic bright blue and the first column
        bold blue.
        """
        text = format_table(self.ROWS, color=True)
        lines = text.splitlines()
        self.assertTrue(lines[0].startswith("\x1b[3;94mService"), lines[0])
        self.assertTrue(lines[1].startswith("\x1b[1;34mapi    "), lines[1])
        self.assertIn("\x1b[0m", lines[1])

    def test_certificate_status(self) -> None:
        """
        A TLS service with certificate states shows them.
        """
        rows = [dict(self.ROWS[0], certificates={"api.example.com": "valid"})]
        self.assertIn("yes (valid)", format_table(rows, color=False))

    def test_certificate_status_per_host(self) -> None:
        """
        When the hosts' certificate states differ, each host is named with
        its state.
        """
        certs = {"api.example.com": "valid until X", "b.com": "pending (no route)"}
        rows = [dict(self.ROWS[0], certificates=certs)]
        self.assertIn(
            "yes (api.example.com: valid until X; b.com: pending (no route))",
            format_table(rows, color=False),
        )


class ProgressPrinterTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """
        When not on a terminal, at most one line per phase is printed.
        """
        out = StringIO()
        p = ProgressPrinter(out, environ={})
        p("health", "waiting for a:1")
        p("health-result", "a:1: unexpected status (500)")
        p("health-result", "a:1: healthy")
        p("switched", "traffic switched to a:1")
        p("done", "")
        self.assertEqual(
            out.getvalue(),
            "waiting for a:1\na:1: unexpected status (500)\ntraffic switched to a:1\n",
        )

    def test_tty(self) -> None:
        """
        On a terminal the status line is rewritten in place and cleared at the
        end.
        """

        class TTY(StringIO):
            def isatty(self) -> bool:
                return True

        out = TTY()
        p = ProgressPrinter(out, environ={})
        p("health", "waiting for a:1")
        p("health-result", "a:1: ok")
        p("done", "")
        self.assertEqual(
            out.getvalue(),
            "\rwaiting for a:1" "\ra:1: ok" + " " * 8 + "\r" + " " * 7 + "\r",
        )
        out = TTY()
        p = ProgressPrinter(out, environ={})
        p("health", "waiting for a:1")
        p.summary("web: now serving a:1 (took 1.0s)")
        self.assertEqual(out.getvalue(), "\rwaiting for a:1\r" + " " * 15
                         + "\rweb: now serving a:1 (took 1.0s)\n")

    def test_dumb_terminal_and_no_color(self) -> None:
        """
        C{TERM=dumb} turns off in-place updates and colours; C{NO_COLOR}
        turns off colours only; neither is used off a terminal.
        """

        class TTY(StringIO):
            def isatty(self) -> bool:
                return True

        self.assertTrue(can_rewrite(TTY(), {}) and can_colour(TTY(), {}))
        self.assertFalse(can_rewrite(TTY(), {"TERM": "dumb"}))
        self.assertFalse(can_colour(TTY(), {"TERM": "dumb"}))
        self.assertTrue(can_rewrite(TTY(), {"NO_COLOR": "1"}))
        self.assertFalse(can_colour(TTY(), {"NO_COLOR": "1"}))
        self.assertFalse(can_rewrite(StringIO(), {}) or can_colour(StringIO(), {}))
        out = TTY()
        p = ProgressPrinter(out, environ={"TERM": "dumb"})
        p("health", "waiting for a:1")
        p("health", "waiting for a:1 again")
        p("done", "")
        self.assertEqual(out.getvalue(), "waiting for a:1\n")

    def test_summary(self) -> None:
        """
        The summary of a deploy names the service, what now serves, how long
        it took and what the drain did.
        """
        self.assertEqual(
            deploy_summary("web", {"targets": ["a:1", "b:2"], "drained": 0, "cut": 0}, 2.345),
            "web: now serving a:1, b:2 (took 2.3s)",
        )
        self.assertEqual(
            deploy_summary("web", {"targets": ["a:1"], "drained": 5, "cut": 1}, 31),
            "web: now serving a:1 (took 31.0s; drained 5 requests, 1 cut at the drain "
            "deadline)",
        )
        self.assertEqual(
            deploy_summary("web", {"targets": ["c:1"], "drained": 0, "cut": 0}, 1, rollout=True),
            "web: rollout targets c:1 ready (took 1.0s); send traffic with `mproxy rollout set`",
        )


class ClientCommandTests(SynchronousTestCase):
    """
    Whole commands against an in-memory server.
    """

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.socket = os.path.join(self.mktemp(), "mproxy.sock")

    def cli(self, *argv: str) -> tuple[int, str, str]:
        return run(list(argv) + ["--socket", self.socket], self.reactor)

    def test_server_not_running(self) -> None:
        """
        Without a server: C{Error: cannot connect ...} naming the socket, and
        exit status 1.
        """
        reactor = FakeReactor(server=False)
        for argv in (["list"], ["deploy", "web-1:3000"], ["remove", "web"]):
            status, out, err = run(argv + ["--socket", self.socket], reactor)
            self.assertEqual(status, 1)
            self.assertTrue(
                err.startswith(
                    f"Error: cannot connect to mproxy at {self.socket}: "
                    "No such file or directory"
                ),
                err,
            )
            self.assertNotIn("Traceback", err)
            reactor = FakeReactor(server=False)

    def test_socket_from_environment(self) -> None:
        """
        Without C{--socket} the client uses C{$MPROXY_SOCKET}.
        """
        old = os.environ.get("MPROXY_SOCKET")

        def restore() -> None:
            if old is None:
                os.environ.pop("MPROXY_SOCKET", None)
            else:
                os.environ["MPROXY_SOCKET"] = old

        self.addCleanup(restore)
        os.environ["MPROXY_SOCKET"] = "/run/x/mproxy.sock"
        run(["list"], self.reactor)
        self.assertEqual(self.reactor.paths, ["/run/x/mproxy.sock"])

    def test_deploy_seed_spelling(self) -> None:
        """
        C{deploy web-1:3000} deploys to the C{default} service; a second
        deploy replaces the target.
        """
        status, out, err = self.cli("deploy", "web-1:3000")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.reactor.paths, [self.socket])
        s = self.reactor.router.services["default"]
        self.assertEqual(s.active.addresses, ["web-1:3000"])
        self.assertEqual(self.cli("deploy", "web-2:3000")[0], 0)
        self.assertEqual(s.active.addresses, ["web-2:3000"])
        self.assertEqual(list(self.reactor.router.services), ["default"])

    def test_deploy_host(self) -> None:
        """
        C{deploy web-1:3000 --host A} deploys service C{a} on host C{a}.
        """
        self.assertEqual(self.cli("deploy", "web-1:3000", "--host", "A")[0], 0)
        s = self.reactor.router.services["a"]
        self.assertEqual(s.options.hosts, ("a",))

    def test_deploy_kamal_spelling(self) -> None:
        """
        C{deploy app --target a:1,b:2 --target c:3} deploys three targets to
        C{app}.
        """
        status, out, err = self.cli("deploy", "app", "--target", "aa:1,bb:2", "--target",
                                    "cc:3")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.reactor.router.services["app"].active.addresses,
                         ["aa:1", "bb:2", "cc:3"])

    def test_deploy_progress(self) -> None:
        """
        Off a terminal, a deploy prints one plain line per phase.
        """
        status, out, err = self.cli("deploy", "web-1:3000")
        lines = out.splitlines()
        self.assertEqual(len(lines), len(set(lines)))
        self.assertIn("waiting for web-1:3000 to become healthy", lines)
        self.assertIn("traffic switched to web-1:3000", lines)
        self.assertTrue(lines[-1].startswith("default: now serving web-1:3000 (took "),
                        lines[-1])

    def test_deploy_unhealthy(self) -> None:
        """
        A target that never becomes healthy fails the deploy with the timeout
        and the last health error, and exit status 1.
        """
        self.reactor.probe.status["web-1:3000"] = 503
        status, out, err = self.cli("deploy", "web-1:3000", "--timeout", "3s")
        self.assertEqual(status, 1)
        self.assertEqual(
            err,
            "Error: target failed to become healthy within configured timeout (3s): "
            "unexpected status (503)\n",
        )
        self.assertEqual(self.reactor.router.services, {})

    def test_conflict(self) -> None:
        """
        A host conflict is reported as an error.
        """
        self.assertEqual(self.cli("deploy", "web-1:3000", "--host", "a.com")[0], 0)
        status, out, err = self.cli("deploy", "other", "--target", "web-2:3000", "--host",
                                    "a.com")
        self.assertEqual((status, err), (1, "Error: host settings conflict with another service: host a.com is served by "
                 "service a.com\n"))

    def test_list(self) -> None:
        """
        C{list} prints the table, C{ls --json} the rows as JSON.
        """
        self.cli("deploy", "web-1:3000")
        self.cli("deploy", "api", "--target", "api-1:3000", "--host", "api.example.com")
        status, out, err = self.cli("list")
        self.assertEqual(status, 0)
        self.assertEqual(
            out,
            "Service  Host             Path  Target                                           "
            "State    TLS\n"
            "api      api.example.com  /     api-1:3000 (healthy since 1970-01-01 00:00:00Z)  "
            "running  no\n"
            "default  *                /     web-1:3000 (healthy since 1970-01-01 00:00:00Z)  "
            "running  no\n",
        )
        status, out, err = self.cli("ls", "--json")
        rows = json.loads(out)
        self.assertEqual([r["service"] for r in rows], ["api", "default"])

    def test_remove(self) -> None:
        """
        C{remove} and C{rm} remove a service; an unknown one is an error.
        """
        self.cli("deploy", "web-1:3000")
        self.assertEqual(self.cli("rm", "default"), (0, "", ""))
        self.assertEqual(self.reactor.router.services, {})
        self.assertEqual(self.cli("remove", "default"), (1, "", "Error: service not found: default\n"))

    def test_pause_stop_resume(self) -> None:
        """
        C{pause}, C{stop} and C{resume} change the service state.
        """
        self.cli("deploy", "web-1:3000")
        s = self.reactor.router.services["default"]
        status, out, err = self.cli("pause", "default", "--max-pause", "1m")
        self.assertEqual((status, out), (0, "draining 0 requests from default\n"))
        self.assertEqual((s.state_name, s.pause.max_pause), ("paused", 60.0))
        status, out, err = self.cli("stop", "default", "--message", "bye")
        self.assertEqual((status, out), (0, "draining 0 requests from default\n"))
        self.assertEqual((s.state_name, s.pause.stop_message), ("stopped", "bye"))
        self.assertEqual(self.cli("resume", "default")[0], 0)
        self.assertEqual(s.state_name, "running")
        self.assertEqual(self.cli("pause", "nope"), (1, "", "Error: service not found: nope\n"))

    def test_rollout(self) -> None:
        """
        The rollout subcommands work, with kamal-proxy's errors.
        """
        self.cli("deploy", "web-1:3000")
        self.assertEqual(self.cli("rollout", "set", "default", "--percent", "10"),
                         (1, "", "Error: rollout target not set\n"))
        status, out, err = self.cli("rollout", "set", "default")
        self.assertEqual(
            (status, err),
            (1, "Error: at least one of the flags in the group [percent list] is required\n"),
        )
        self.assertEqual(self.cli("rollout", "deploy", "default", "--target", "canary:3000")[0],
                         0)
        s = self.reactor.router.services["default"]
        self.assertEqual(s.rollout.addresses, ["canary:3000"])
        self.assertEqual(
            self.cli("rollout", "set", "default", "--percent", "25", "--list", "a,b")[0], 0
        )
        self.assertEqual((s.split.percentage, s.split.allowlist), (25, ("a", "b")))
        self.assertEqual(self.cli("rollout", "stop", "default")[0], 0)
        self.assertIsNone(s.split)
        self.assertEqual(self.cli("rollout", "stop", "nope"),
                         (1, "", "Error: service not found: nope\n"))
        status, out, err = self.cli("rollout", "deploy", "default")
        self.assertEqual((status, err), (1, 'Error: required flag(s) "target" not set\n'))
