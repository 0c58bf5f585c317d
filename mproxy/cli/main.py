"""
The C{mproxy} console script.

Every expected failure prints C{Error: <message>} on stderr and exits 1; no
traceback reaches the user for a bad flag, an unreachable server or a failed
deploy.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Callable, Sequence

from twisted.internet.defer import inlineCallbacks
from twisted.protocols import amp

import mproxy
from mproxy.cli import parsing
from mproxy.cli.parsing import UsageError
from mproxy.config import socket_path
from mproxy.control import commands as c
from mproxy.errors import InvalidOptions, MproxyError
from mproxy.spec import (
    DeployRequest,
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
)

COMMANDS: dict[str, Callable[[], parsing.Command]] = {
    "run": parsing.run_command,
    "deploy": parsing.deploy_command,
    "remove": lambda: parsing.simple_command("remove", "Remove a service"),
    "list": parsing.list_command,
    "pause": parsing.pause_command,
    "resume": lambda: parsing.simple_command("resume", "Resume a paused or stopped service"),
    "stop": parsing.stop_command,
    "rollout deploy": parsing.rollout_deploy_command,
    "rollout set": parsing.rollout_set_command,
    "rollout stop": parsing.rollout_stop_command,
}
ALIASES = {"rm": "remove", "ls": "list"}

OVERVIEW = f"""\
mproxy {mproxy.__version__}: an HTTP proxy for zero-downtime deployments

Usage:
  mproxy COMMAND [options]

Commands:
  run                 Run the proxy server in the foreground
  deploy              Deploy a target to a service (waits for health, switches, drains)
  list (ls)           List the services
  remove (rm)         Remove a service
  pause               Hold a service's requests until it is resumed
  resume              Resume a paused or stopped service
  stop                Answer a service's requests with a 503 page
  rollout deploy      Deploy targets to a service's rollout slot
  rollout set         Send a share of traffic to the rollout slot
  rollout stop        Send all traffic back to the active slot
  help [COMMAND]      Show help for a command

Flags:
  --version           Print the version
  -h, --help          Show this help

Examples:
  mproxy run --http-port 8080
  mproxy deploy web-1:3000
  mproxy deploy web-1:3000 --host app1.example.com --ssl
  mproxy deploy app --target web-1:3000,web-2:3000 --host app.example.com
  mproxy list
"""


class Streams:
    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out = out
        self.err = err


def fail(streams: Streams, message: str) -> int:
    streams.err.write(f"Error: {message}\n")
    streams.err.flush()
    return 1


def split_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    if not argv:
        return None, []
    first = ALIASES.get(argv[0], argv[0])
    if first == "rollout":
        if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
            return "rollout", list(argv[1:])
        return f"rollout {argv[1]}", list(argv[2:])
    return first, list(argv[1:])


def _given(**values: Any) -> dict[str, Any]:
    """
    Only the flags given on the command line: the others take the defaults
    of L{mproxy.spec}.
    """
    return {k: v for k, v in values.items() if v is not None}


def deploy_request(ns: Any) -> DeployRequest:
    """
    Turn parsed C{deploy} flags into a L{DeployRequest}, applying both
    spellings (C{deploy HOST:PORT} and C{deploy SERVICE --target ...}).

    Only the checks about flags themselves are made here; every check of the
    values is the request's own (L{DeployRequest.validate}), which the server
    runs too.

    @raise InvalidOptions: for any invalid combination.
    """
    if ns.target is not None:
        if not ns.target:
            raise InvalidOptions("--target is empty: give at least one host:port")
        service = ns.positional
        targets = tuple(ns.target)
    else:
        targets = (ns.positional,)
        service = ns.host[0].lower() if ns.host else "default"
    # Whether the buffering flag was given, not its value: Kamal sends
    # --buffer-requests=false --max-request-body=N, and the limit is then
    # simply not enforced (nothing is buffered).
    if ns.max_request_body is not None and ns.buffer_requests is None:
        raise InvalidOptions("max-request-body can only be set when request buffering is enabled")
    if ns.max_response_body is not None and ns.buffer_responses is None:
        raise InvalidOptions(
            "max-response-body can only be set when response buffering is enabled"
        )
    tls = bool(ns.tls)
    options = ServiceOptions(
        hosts=ns.host or (),
        path_prefixes=ns.path_prefix or (),
        tls_enabled=tls,
        canonical_host=(ns.canonical_host or "").lower(),
        error_pages=os.path.abspath(ns.error_pages) if ns.error_pages else "",
        **_given(
            strip_prefix=ns.strip_path_prefix,
            tls_certificate_path=_abspath(ns.tls_certificate_path),
            tls_private_key_path=_abspath(ns.tls_private_key_path),
            tls_on_demand_url=ns.tls_on_demand_url,
            tls_redirect=ns.tls_redirect,
            tls_staging=ns.tls_staging,
            writer_affinity_timeout=ns.writer_affinity_timeout,
            read_targets_accept_websockets=ns.read_target_websockets,
            exclude_metrics_paths=ns.exclude_metrics_path,
            client_ip_header=ns.client_ip_header,
        ),
    )
    health = HealthCheckConfig(
        **_given(
            path=ns.health_check_path,
            port=ns.health_check_port,
            interval=ns.health_check_interval,
            timeout=ns.health_check_timeout,
            host=ns.health_check_host,
        )
    )
    target_options = TargetOptions(
        health_check=health,
        # X-Forwarded-* from clients are trusted by default only without TLS.
        forward_headers=(not tls) if ns.forward_headers is None else ns.forward_headers,
        **_given(
            target_timeout=ns.target_timeout,
            buffer_requests=ns.buffer_requests,
            buffer_responses=ns.buffer_responses,
            buffer_memory=ns.buffer_memory,
            max_request_body=ns.max_request_body,
            max_response_body=ns.max_response_body,
            log_request_headers=ns.log_request_header,
            log_response_headers=ns.log_response_header,
            scope_cookie_paths=ns.scope_cookie_paths,
        ),
    )
    req = DeployRequest(
        service=service,
        targets=targets,
        readers=tuple(ns.read_target or ()),
        options=options,
        target_options=target_options,
        **_given(
            deploy_timeout=ns.deploy_timeout, drain_timeout=ns.drain_timeout, force=ns.force
        ),
    )
    req.validate()
    return req


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class ProgressPrinter:
    """
    Shows what a waiting command is doing: one rewritten status line on a
    terminal, at most one plain line per phase otherwise.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.seen: set[str] = set()
        self.width = 0

    def __call__(self, phase: str, detail: str) -> None:
        if phase == "done":
            self.finish()
            return
        text = detail or phase
        if self.tty:
            line = text[:200]
            pad = max(0, self.width - len(line))
            self.out.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            if phase in self.seen:
                return
            self.seen.add(phase)
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0


def format_table(rows: list[dict[str, Any]], color: bool) -> str:
    header = ["Service", "Host", "Path", "Target", "State", "TLS"]
    body = []
    for r in rows:
        tls = "yes" if r["tls"] else "no"
        certs = r.get("certificates") or {}
        if r["tls"] and certs:
            # one state for all hosts: just the state; else which host has which
            by_state: dict[str, list[str]] = {}
            for host in r["hosts"]:
                if host in certs:
                    by_state.setdefault(certs[host], []).append(host)
            if len(by_state) == 1:
                tls = f"yes ({next(iter(by_state))})"
            elif by_state:
                tls = "yes (" + "; ".join(
                    f"{','.join(hosts)}: {state}" for state, hosts in by_state.items()
                ) + ")"
        body.append(
            [
                r["service"],
                ",".join(r["hosts"]) or "*",
                ",".join(r["paths"]),
                ",".join(r["targets"]),
                r["state"],
                tls,
            ]
        )
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]

    def line(cells: list[str], styles: list[str]) -> str:
        parts = []
        for cell, w, style in zip(cells, widths, styles):
            text = str(cell).ljust(w)
            parts.append(f"\x1b[{style}m{text}\x1b[0m" if color and style else text)
        return "  ".join(parts).rstrip() if not color else "  ".join(parts)

    out = [line(header, ["3;94"] * len(header))]
    for row in body:
        out.append(line(row, ["1;34"] + [""] * (len(row) - 1)))
    return "\n".join(out) + "\n"


@inlineCallbacks
def client_command(reactor: Any, name: str, ns: Any, streams: Streams) -> Any:
    from mproxy.control.client import connect

    path = socket_path(ns.socket or "")
    printer = ProgressPrinter(streams.out)
    if name == "deploy":
        req = deploy_request(ns)
        client = yield connect(reactor, path, printer)
        try:
            yield client.deploy(req)
        finally:
            printer.finish()
        return
    client = yield connect(reactor, path, printer)
    try:
        if name == "list":
            rows = yield client.list_services()
            if ns.json:
                streams.out.write(json.dumps(rows, indent=2) + "\n")
            else:
                streams.out.write(format_table(rows, _isatty(streams.out)))
        elif name == "remove":
            yield client.call(c.Remove, service=ns.service)
        elif name == "pause":
            yield client.call(
                c.Pause, service=ns.service,
                **_given(drain_timeout=ns.drain_timeout, max_pause=ns.max_pause),
            )
        elif name == "stop":
            yield client.call(
                c.Stop, service=ns.service,
                **_given(drain_timeout=ns.drain_timeout, message=ns.message),
            )
        elif name == "resume":
            yield client.call(c.Resume, service=ns.service)
        elif name == "rollout deploy":
            if not ns.target:
                raise InvalidOptions('required flag(s) "target" not set')
            yield client.call(
                c.RolloutDeploy, service=ns.service, targets=ns.target,
                **_given(readers=ns.read_target, deploy_timeout=ns.deploy_timeout,
                         drain_timeout=ns.drain_timeout),
            )
        elif name == "rollout set":
            if ns.percent is None and ns.list is None:
                raise InvalidOptions(
                    "at least one of the flags in the group [percent list] is required"
                )
            yield client.call(
                c.RolloutSet, service=ns.service, percentage=ns.percent or 0,
                allowlist=ns.list or [],
            )
        elif name == "rollout stop":
            yield client.call(c.RolloutStop, service=ns.service)
    finally:
        printer.finish()
        client.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def show_help(topic: str | None, streams: Streams) -> int:
    if topic is None:
        streams.out.write(OVERVIEW)
        return 0
    topic = ALIASES.get(topic, topic)
    if topic == "rollout":
        streams.out.write(
            "Usage:\n  mproxy rollout deploy|set|stop SERVICE [options]\n\n"
            "Subcommands:\n  deploy  Deploy targets to the rollout slot\n"
            "  set     Send a share of traffic to the rollout slot\n"
            "  stop    Send all traffic back to the active slot\n"
        )
        return 0
    factory = COMMANDS.get(topic)
    if factory is None:
        return -1
    streams.out.write(factory().help())
    return 0


def main(argv: Sequence[str], streams: Streams | None = None, reactor: Any = None) -> int:
    """
    Run one command; returns the exit status.
    """
    streams = streams or Streams(sys.stdout, sys.stderr)
    name, rest = split_command(argv)
    if name is None or name in ("-h", "--help"):
        return show_help(None, streams)
    if name == "--version" or name == "version":
        streams.out.write(f"mproxy {mproxy.__version__}\n")
        return 0
    if name == "help":
        topic = " ".join(rest) if rest else None
        status = show_help(topic, streams)
        if status < 0:
            return fail(streams, f'unknown help topic "{topic}"')
        return status
    if name == "rollout":
        return show_help("rollout", streams)
    factory = COMMANDS.get(name)
    if factory is None and name.startswith("rollout "):
        sub = name.split(" ", 1)[1]
        return fail(streams, f'unknown command "{sub}" for "mproxy rollout"')
    if factory is None:
        return fail(streams, f'unknown command "{name}" for "mproxy" (see `mproxy help`)')
    cmd = factory()
    if "-h" in rest or "--help" in rest:
        streams.out.write(cmd.help())
        return 0
    try:
        ns = cmd.parse(rest)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        return fail(streams, str(e))
    if name == "run":
        from mproxy.server import run_server

        return run_server(ns, streams)
    if name == "deploy":
        try:
            deploy_request(ns)
        except MproxyError as e:
            return fail(streams, str(e))
    return _run_client(name, ns, streams, reactor)


def _run_client(name: str, ns: Any, streams: Streams, reactor: Any) -> int:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    result: dict[str, int] = {}

    def done(_: object) -> None:
        result["status"] = 0

    def failed(f: Any) -> None:
        if f.check(MproxyError):
            result["status"] = fail(streams, str(f.value))
        elif f.check(amp.RemoteAmpError):
            result["status"] = fail(streams, str(f.value.description or f.value))
        elif f.check(ConnectionError, amp.ProtocolSwitched) or "ConnectionLost" in str(f.type):
            result["status"] = fail(streams, f"connection to mproxy lost: {f.getErrorMessage()}")
        else:
            result["status"] = fail(streams, f"{f.type.__name__}: {f.getErrorMessage()}")

    def start() -> None:
        d = client_command(reactor, name, ns, streams)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=True)
    return result.get("status", 1)


def run() -> None:
    """
    Console-script entry point.
    """
    try:
        status = main(sys.argv[1:])
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
